"""State handles over HTTP: rgemma's extension to the OpenAI API.

A handle is a named fixed-size state on the server (``inference.state_store``):
build it from a document of any length, sent in as many appends as needed,
then ask completions from it without resending the text. Each costs the
state's bytes (about 17 MB for 2B), whatever the document's length.

* ``POST /v1/states`` ``{"prompt"?: str | [int], "messages"?: [...], "metadata"?: {},
  "add_bos"?: true}`` -> a state object (below), after reading the prompt;
* ``POST /v1/states/{id}/append`` ``{"prompt": str | [int]}`` or ``{"messages": [...]}``
  (``"metadata"`` replaces the handle's) -> the state object, same id. Appends to
  one handle run one after another;
* ``POST /v1/states/{id}/fork`` ``{"metadata"?: {}}`` -> a copy under a new id;
* ``GET /v1/states`` (a list), ``GET /v1/states/{id}``, ``DELETE /v1/states/{id}``;
* ``GET /v1/states/{id}/file``: the handle as a snapshot file (``io.snapshot``;
  its metadata and pending tokens inside); ``POST /v1/states/file`` with such a
  file as the raw body -> a new handle;
* ``/v1/completions`` and ``/v1/chat/completions`` take ``"state": id`` (the
  prompt, or the chat's new messages, follow the handle's text; the handle
  itself does not change) and ``"save_state": true`` (n = 1): the state after
  the prompt and the answer becomes a new handle, returned as ``"state"`` in
  the response (streamed: in the chunk with the ``finish_reason``), with the
  request's ``"metadata"``.

A state object is ``{"id", "object": "state", "created", "model", "tokens",
"bytes", "pending_chars", "metadata"}``: ``tokens`` read so far, ``bytes`` the
state's size, ``pending_chars`` appended text not yet tokenized (it waits for
what follows; see ``state_store.split_stable_text``).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import weakref
from typing import Annotated, Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BeforeValidator, ValidationInfo, field_validator, model_validator

from rgemma.inference.engine import Request as EngineRequest
from rgemma.inference.state_store import (
    StateNotFound,
    StateStore,
    StoredState,
    continuation_ids,
    text_after,
)
from rgemma.io.snapshot import SnapshotError, load_state, save_state
from rgemma.serving.errors import APIError, client_error, invalid_request
from rgemma.serving.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    Messages,
    RequestModel,
    render_messages,
    small_metadata,
    valid_unicode,
)

Metadata = Annotated[dict, BeforeValidator(small_metadata)]


# ------------------------------------------------------------------ bodies
class StateTextRequest(RequestModel):
    """What ``POST /v1/states`` and ``/append`` read: a prompt (text or ids) or messages."""

    prompt: str | list[int] | None = None
    messages: Messages | None = None
    metadata: Metadata | None = None
    add_bos: bool = True

    @field_validator("prompt")
    @classmethod
    def _valid_prompt(cls, value: str | list[int], info: ValidationInfo) -> str | list[int]:
        if isinstance(value, str):
            return valid_unicode(value, "prompt")
        vocab = info.context.vocab_size
        if any(not 0 <= t < vocab for t in value):
            raise client_error(f"prompt token ids must be in [0, {vocab})")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> StateTextRequest:
        if self.prompt is not None and self.messages is not None:
            raise client_error("send 'prompt' or 'messages', not both", param="prompt")
        return self


class StateForkRequest(RequestModel):
    metadata: Metadata | None = None


# ----------------------------------------------------------------- helpers
def state_object(entry: StoredState, model_name: str, state_bytes: int) -> dict[str, Any]:
    return {
        "id": entry.id,
        "object": "state",
        "created": entry.created,
        "model": model_name,
        "tokens": entry.tokens,
        "bytes": state_bytes,
        "pending_chars": len(entry.pending_text),
        "metadata": entry.metadata,
    }


def _without_bos_text(tokenizer, text: str) -> str:
    return text.removeprefix(tokenizer.bos_token) if tokenizer.bos_token else text


def append_plan(
    tokenizer, entry: StoredState, req: StateTextRequest
) -> tuple[list[int], list[int], str]:
    """(ids to feed now, ids left pending, text left pending) for an append to ``entry``.

    The last token stays pending (see ``state_store``); a first append starts with BOS
    (``add_bos``) unless its rendered messages already do."""
    first = entry.empty
    bos = [tokenizer.bos_id] if first and req.add_bos else []
    if req.messages is not None:
        text = render_messages(tokenizer, req.messages, False)
        if not first or not req.add_bos:
            text = _without_bos_text(tokenizer, text)
        elif text.startswith(tokenizer.bos_token or "\x00"):
            bos = []
    else:
        text = req.prompt if isinstance(req.prompt, str) else None
    new, rest = text_after(tokenizer, entry, text, req.prompt or [], final=False)
    ids = bos + list(entry.pending_ids) + new
    return ids[:-1], ids[-1:], rest


def continuation_prompts(
    req: CompletionRequest | ChatCompletionRequest, entry: StoredState, tokenizer
) -> list[tuple[list[int], str]]:
    """(ids, text) of each prompt of a completion that continues ``entry``."""
    if isinstance(req, ChatCompletionRequest):
        if entry.ends_with_answer:
            if len(req.messages) != 1 or req.messages[0].role != "user":
                raise invalid_request(
                    "messages",
                    "this state ends with an answer: send only the next user message",
                )
            text = req.messages[0].content
            ids = tokenizer.next_turn_ids(entry.pending_ids, text)
            return [(ids, text)]
        text = _without_bos_text(tokenizer, render_messages(tokenizer, req.messages, True))
        return [(continuation_ids(tokenizer, entry, text=text), text)]
    prompts = []
    for p in req.prompt:
        if isinstance(p, str):
            prompts.append((continuation_ids(tokenizer, entry, text=p), p))
        else:
            prompts.append((continuation_ids(tokenizer, entry, new_ids=p), tokenizer.decode(p)))
    if any(not ids for ids, _ in prompts):
        raise invalid_request("prompt", "the state is empty and so is the prompt: nothing to read")
    return prompts


# ------------------------------------------------------------------ routes
class StateRoutes:
    """The /v1/states endpoints of a ``Server`` (``serving.app``)."""

    def __init__(self, server, store: StateStore):
        self.server, self.store = server, store
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    def object(self, entry: StoredState) -> dict[str, Any]:
        return state_object(entry, self.server.config.model_name, self.store.state_bytes)

    async def get(self, id: str) -> StoredState:
        try:
            return await asyncio.to_thread(self.store.get, id)
        except StateNotFound as e:
            raise APIError(404, str(e), param="state", code="state_not_found") from None
        except SnapshotError as e:
            raise APIError(500, str(e), kind="server_error") from None

    def lock(self, id: str) -> asyncio.Lock:
        lock = self._locks.get(id)
        if lock is None:
            lock = self._locks[id] = asyncio.Lock()
        return lock

    async def save(self, entry: StoredState) -> dict[str, Any]:
        await asyncio.to_thread(self.store.put, entry)
        return self.object(entry)

    async def append(self, request: Request, entry: StoredState, req: StateTextRequest):
        """Reads ``req`` into ``entry`` (its state changes only once the engine is done)."""
        tokenizer = self.server.tokenizer
        feed, pending, rest = await asyncio.to_thread(append_plan, tokenizer, entry, req)
        state = entry.state
        if feed:
            engine_request = EngineRequest(
                prompt_ids=feed, max_tokens=0, state=state.clone(), return_state=True
            )
            state = await self.server.run_to_state(request, engine_request)
        entry.state, entry.pending_ids, entry.pending_text = state, pending, rest
        entry.ends_with_answer = False
        if req.metadata is not None:
            entry.metadata = req.metadata
        return await self.save(entry)

    async def from_file(self, body: bytes) -> StoredState:
        """A new handle from the bytes of a snapshot file (400 if they are not one)."""

        def load() -> StoredState:
            fd, path = tempfile.mkstemp(suffix=".safetensors")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(body)
                state, metadata = load_state(path, self.server.engine.model, device="cpu")
            except SnapshotError as e:
                message = f"not a usable state file: {e}"
                raise invalid_request(None, message, "invalid_state_file") from None
            finally:
                os.unlink(path)
            if metadata["batch_size"] != 1:
                raise invalid_request(None, "the state file holds more than one row")
            try:
                entry = StoredState.from_snapshot(self.store.new_id(), state, metadata)
            except ValueError as e:
                raise invalid_request(None, str(e), "invalid_state_file") from None
            self.store.put(entry)
            return entry

        return await asyncio.to_thread(load)

    def to_file(self, entry: StoredState) -> bytes:
        fd, path = tempfile.mkstemp(suffix=".safetensors")
        os.close(fd)
        try:
            model_config = self.server.engine.model.config
            save_state(path, entry.state, model_config=model_config, extra=entry.extra())
            with open(path, "rb") as f:
                return f.read()
        finally:
            os.unlink(path)

    def add_to(self, app: FastAPI) -> None:
        parse = self.server._parse

        @app.post("/v1/states")
        async def create(request: Request):
            req = await parse(request, StateTextRequest, empty_ok=True)
            entry = await asyncio.to_thread(self.store.create, req.metadata)
            async with self.lock(entry.id):
                if req.prompt is None and req.messages is None:
                    return self.object(entry)
                return await self.append(request, entry, req)

        @app.get("/v1/states")
        async def listing():
            ids = self.store.ids()
            data = []
            for id in ids:
                try:
                    data.append(self.object(await self.get(id)))
                except APIError:
                    continue  # evicted meanwhile
            return {"object": "list", "data": data}

        @app.post("/v1/states/file")
        async def upload(request: Request):
            body = await self.server.read_body(request, 2 * self.store.state_bytes + 2**20)
            if not body:
                raise invalid_request(None, "the body is empty: send the state file's bytes")
            return self.object(await self.from_file(body))

        @app.get("/v1/states/{id}")
        async def read(id: str):
            return self.object(await self.get(id))

        @app.delete("/v1/states/{id}")
        async def delete(id: str):
            async with self.lock(id):
                if not await asyncio.to_thread(self.store.delete, id):
                    raise APIError(404, f"no state {id!r}", param="state", code="state_not_found")
            return {"id": id, "object": "state", "deleted": True}

        @app.post("/v1/states/{id}/append")
        async def append(id: str, request: Request):
            req = await parse(request, StateTextRequest)
            async with self.lock(id):
                return await self.append(request, await self.get(id), req)

        @app.post("/v1/states/{id}/fork")
        async def fork(id: str, request: Request):
            req = await parse(request, StateForkRequest, empty_ok=True)
            async with self.lock(id):
                entry = await self.get(id)
                copy = await asyncio.to_thread(self.store.fork, entry, req.metadata)
            return self.object(copy)

        @app.get("/v1/states/{id}/file")
        async def download(id: str):
            async with self.lock(id):
                entry = await self.get(id)
                data = await asyncio.to_thread(self.to_file, entry)
            return Response(
                data,
                media_type="application/octet-stream",
                headers={"content-disposition": f'attachment; filename="{id}.safetensors"'},
            )
