"""`rgemma serve`: an OpenAI-compatible HTTP server over the continuous-batching engine.

    rgemma serve --model PATH --port 8000        # binds 127.0.0.1 unless --host says otherwise

Endpoints (shaped like vLLM's and llama.cpp's servers):

* ``GET /v1/models``
* ``POST /v1/completions``: ``prompt`` (a string, a list of strings, a list
  of token ids or a list of such lists), ``max_tokens``, ``temperature``,
  ``top_p``, ``top_k``, ``min_p``, ``repetition_penalty``, ``stop``, ``seed``,
  ``n``, ``stream`` (+ ``stream_options.include_usage``), ``logprobs`` (legacy
  format: ``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``),
  ``echo`` (with ``logprobs``: the prompt tokens' logprobs, what lm-eval's
  ``local-completions`` scores; ``max_tokens`` 0 is allowed then), ``ignore_eos``.
* ``POST /v1/chat/completions``: ``messages`` rendered with the tokenizer's
  chat format (Gemma's: turns end with ``<end_of_turn>``, a stop token),
  ``logprobs`` / ``top_logprobs``, and the sampling fields above.
* ``GET /health``, ``GET /metrics`` (Prometheus text).
* ``GET /tokenizer_info``, ``POST /tokenize``, ``POST /detokenize`` (vLLM's
  shapes): lm-eval's ``local-completions`` finds them and tokenizes with the
  server's own tokenizer (its "remote" tokenizer backend).

Streaming is Server-Sent Events (``data: {...}`` chunks, then ``data: [DONE]``).
Errors are OpenAI's JSON ``{"error": {"message", "type", "param", "code"}}``:
400 for invalid fields (named in ``param``) and malformed JSON, 401 for a
missing / wrong ``--api-key`` bearer token (every path but /health and
/metrics), 413 for bodies over the limit, 503 (with ``Retry-After``) when the
engine's queue is full. A client that disconnects cancels its request,
freeing its rows at once.

fastapi and uvicorn are imported when the server is built, not with this
module, so ``rgemma --help`` works without them.
"""

import asyncio
import dataclasses
import functools
import hmac
import json
import math
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any, AsyncIterator, Iterable

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEMO_NAME = "demo"             # --model demo (or no --model): the bundled demo model
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 128           # stop strings are scanned at every token: keep them short
MIN_TEMPERATURE = 1e-5         # below this, sampling is greedy (as in vLLM)
DISCONNECT_POLL_S = 0.5
INSTALL_HINT = "pip install 'rgemma[serve]' (fastapi and uvicorn)"


# ===================================================================== config
@dataclasses.dataclass
class ServerConfig:
    """What the HTTP layer accepts.

    model_name: the id listed by /v1/models (requests may name any model).
    api_key: when set, every path but /health and /metrics needs
      ``Authorization: Bearer <api_key>``.
    max_tokens_limit: largest ``max_tokens`` a request may ask for.
    max_prompt_tokens: longest prompt (in tokens) accepted.
    max_body_bytes: larger request bodies get 413.
    retry_after_s: the Retry-After of a 503 (queue full).
    """

    model_name: str = "rgemma"
    api_key: str | None = None
    max_tokens_limit: int = 2048
    max_prompt_tokens: int = 8192
    max_body_bytes: int = 4 * 2**20
    retry_after_s: int = 1


class APIError(Exception):
    """An error answered as OpenAI's JSON error object with ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code, self.kind, self.headers = code, kind, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


def _invalid(param: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


# ============================================================ field checking
_MISSING = object()


def _int(body: dict, name: str, default, lo: int, hi: int) -> int | None:
    """An integer field in [lo, hi]; ``default`` when absent or null."""
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise _invalid(name, f"'{name}' must be an integer, got {type(v).__name__}",
                       "invalid_type")
    if not lo <= v <= hi:
        raise _invalid(name, f"'{name}' must be in [{lo}, {hi}], got {v}")
    return v


def _number(body: dict, name: str, default: float, lo: float, hi: float, *,
            open_low: bool = False) -> float:
    """A finite number field in [lo, hi] (or (lo, hi] with ``open_low``)."""
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _invalid(name, f"'{name}' must be a number, got {type(v).__name__}",
                       "invalid_type")
    if not math.isfinite(v) or v > hi or v < lo or (open_low and v == lo):
        low = "(" if open_low else "["
        raise _invalid(name, f"'{name}' must be in {low}{lo}, {hi}], got {v}")
    return float(v)


def _bool(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _invalid(name, f"'{name}' must be a boolean, got {type(v).__name__}",
                       "invalid_type")
    return v


def _stop_strings(body: dict) -> list[str]:
    """``stop``: null, a string, or a list of non-empty strings."""
    v = body.get("stop")
    if v is None:
        return []
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise _invalid("stop", "'stop' must be a string or a list of strings", "invalid_type")
    if len(items) > MAX_STOP_STRINGS:
        raise _invalid("stop", f"'stop' may hold at most {MAX_STOP_STRINGS} strings")
    if any(not s or len(s) > MAX_STOP_CHARS for s in items):
        raise _invalid("stop", f"'stop' strings must have 1 to {MAX_STOP_CHARS} characters")
    return [_utf8(s, "stop") for s in items]


def _utf8(text: str, param: str) -> str:
    """``text`` if it is valid Unicode (JSON can carry lone surrogates, which are not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _invalid(param, f"'{param}' holds invalid Unicode (a lone surrogate)") from None
    return text


def _unsupported(body: dict) -> None:
    """Fields we do not implement are refused unless they are at their no-op value."""
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise _invalid(name, f"'{name}' is not supported (use repetition_penalty)",
                           "unsupported")
    if body.get("logit_bias"):
        raise _invalid("logit_bias", "'logit_bias' is not supported", "unsupported")
    if body.get("suffix"):
        raise _invalid("suffix", "'suffix' is not supported", "unsupported")
    if body.get("tools"):
        raise _invalid("tools", "'tools' are not supported", "unsupported")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _invalid("model", "'model' must be a string", "invalid_type")


@dataclasses.dataclass
class _Common:
    """Fields shared by both endpoints, checked."""

    max_tokens: int
    params: Any          # SamplingParams
    seed: int | None
    n: int
    stop: list[str]
    stream: bool
    include_usage: bool
    ignore_eos: bool


def _common(body: dict, cfg: ServerConfig, max_n: int, vocab: int, *,
            max_tokens_default: int, min_max_tokens: int, max_tokens_names: tuple) -> _Common:
    from rgemma.inference.engine import sampling_params
    max_tokens = max_tokens_default
    for name in max_tokens_names:
        if body.get(name) is not None:
            max_tokens = _int(body, name, None, -2**63, 2**63)
            if max_tokens < min_max_tokens:
                raise _invalid(name, f"'{name}' must be >= {min_max_tokens}, got {max_tokens}")
            if max_tokens > cfg.max_tokens_limit:
                raise _invalid(name, f"'{name}' is {max_tokens}, over this server's limit "
                                     f"of {cfg.max_tokens_limit}", "max_tokens_too_large")
            break
    top_k = _int(body, "top_k", 0, -1, vocab)
    temperature = _number(body, "temperature", 1.0, 0.0, 100.0)
    params = sampling_params(
        temperature=temperature if temperature >= MIN_TEMPERATURE else 0.0,
        top_k=max(top_k, 0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, open_low=True),
        min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.0, 100.0, open_low=True))
    n = _int(body, "n", 1, 1, max_n)
    best_of = _int(body, "best_of", n, 1, max_n)
    if best_of != n:
        raise _invalid("best_of", "'best_of' other than n is not supported", "unsupported")
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise _invalid("stream_options", "'stream_options' is only allowed with stream: true")
        if not isinstance(options, dict):
            raise _invalid("stream_options", "'stream_options' must be an object", "invalid_type")
        include_usage = _bool(options, "include_usage")
    _unsupported(body)
    return _Common(max_tokens=max_tokens, params=params,
                   seed=_int(body, "seed", None, -2**63, 2**64 - 1), n=n,
                   stop=_stop_strings(body), stream=stream, include_usage=include_usage,
                   ignore_eos=_bool(body, "ignore_eos"))


def _prompts(body: dict, tokenizer, vocab: int, max_prompts: int) -> list[tuple[list[int], str]]:
    """``prompt`` as a list of (token ids, prompt text)."""
    p = body.get("prompt", _MISSING)
    if p is _MISSING or p is None:
        raise _invalid("prompt", "'prompt' is required", "missing_required_parameter")
    if isinstance(p, str):
        items = [p]
    elif isinstance(p, list) and p and all(_is_token(t) for t in p):
        items = [p]
    elif isinstance(p, list) and p and (all(isinstance(x, str) for x in p) or all(
            isinstance(x, list) and x and all(_is_token(t) for t in x) for x in p)):
        items = p
    else:
        raise _invalid("prompt", "'prompt' must be a string, a list of strings, a non-empty "
                                 "list of token ids or a list of such lists", "invalid_type")
    if len(items) > max_prompts:
        raise _invalid("prompt", f"at most {max_prompts} prompts per request")
    out = []
    for item in items:
        if isinstance(item, str):
            out.append((tokenizer.encode(_utf8(item, "prompt"), add_bos=True), item))
            continue
        if any(not 0 <= t < vocab for t in item):
            raise _invalid("prompt", f"prompt token ids must be in [0, {vocab})")
        out.append((list(item), tokenizer.decode(item)))
    return out


def _is_token(t) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


CHAT_ROLE_ALIASES = {"developer": "system"}


def _messages(body: dict) -> list[dict]:
    """``messages`` as [{"role", "content": str}], content parts joined."""
    msgs = body.get("messages")
    if msgs is None:
        raise _invalid("messages", "'messages' is required", "missing_required_parameter")
    if not isinstance(msgs, list) or not msgs:
        raise _invalid("messages", "'messages' must be a non-empty list", "invalid_type")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise _invalid("messages", f"messages[{i}] must be an object", "invalid_type")
        role = CHAT_ROLE_ALIASES.get(m.get("role"), m.get("role"))
        if role not in ("system", "user", "assistant"):
            raise _invalid("messages", f"messages[{i}]: unknown role {m.get('role')!r} "
                                       "(expected system, user or assistant)", "invalid_role")
        out.append({"role": role, "content": _utf8(_content(m.get("content"), i), "messages")})
    return out


def _content(content, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
            for p in content):
        return "".join(p["text"] for p in content)
    raise _invalid("messages", f"messages[{i}].content must be a string or a list of text "
                               "parts", "invalid_type")


# ============================================================ engine bridge
class _Run:
    """The engine requests of one HTTP request, their events funnelled into one asyncio queue."""

    def __init__(self, engine, requests: list, loop: asyncio.AbstractEventLoop):
        from rgemma.inference.engine import EngineError, QueueFull, RequestError
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.handles = []
        self.open = len(requests)
        try:
            for i, r in enumerate(requests):
                self.handles.append(engine.submit(r, on_event=functools.partial(self._push, i)))
        except QueueFull as e:
            self.cancel()
            raise APIError(503, f"server busy: {e}; retry later", code="queue_full",
                           kind="server_overloaded") from None
        except RequestError as e:
            self.cancel()
            raise APIError(400, str(e)) from None
        except EngineError as e:
            self.cancel()
            raise APIError(503, str(e), code="engine_unavailable", kind="server_error") from None

    def _push(self, i: int, event) -> None:          # engine thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (i, event))

    async def batches(self, request) -> AsyncIterator[list[tuple[int, Any]]]:
        """Lists of (prompt index, Event), all that have arrived, until every engine
        request ended; stops if the client left."""
        while self.open:
            try:
                items = [self.queue.get_nowait()]
            except asyncio.QueueEmpty:
                try:
                    items = [await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_S)]
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        self.cancel()
                        return
                    continue
            while not self.queue.empty():
                items.append(self.queue.get_nowait())
            batch = [(i, event) for i, event in items if event is not None]
            self.open -= len(items) - len(batch)         # None: that engine request ended
            if batch:
                yield batch

    def cancel(self) -> None:
        for h in self.handles:
            h.cancel()


# ================================================================ responses
class _Tokens:
    """Token id -> its text (for logprobs), cached."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}          # at most one entry per vocabulary id

    def text(self, token_id: int) -> str:
        s = self._texts.get(token_id)
        if s is None:
            s = self._texts[token_id] = self.tokenizer.decode([token_id], skip_special=False)
        return s

    def offsets(self, ids: list[int]) -> list[int]:
        """Character offset of each token in the (skip-special) decoded text of ``ids``."""
        decoder = self.tokenizer.stream_decoder()
        out, at = [], 0
        for t in ids:
            out.append(at)
            at += len(decoder.feed(t))
        return out


@dataclasses.dataclass
class _ChoiceOut:
    """One choice of the response as it builds up."""

    index: int
    text: str = ""
    tokens: int = 0
    finish_reason: str | None = None
    lp_tokens: list = dataclasses.field(default_factory=list)    # (id, logprob, top, offset)


class _Formatter:
    """Turns engine Events into OpenAI JSON, for one endpoint, streamed or not."""

    def __init__(self, chat: bool, model: str, tokens: _Tokens, prompts: list, n: int, *,
                 echo: bool = False, logprobs: int | None = None, max_tokens: int = 1):
        self.chat, self.model, self.tok = chat, model, tokens
        self.max_tokens = max_tokens
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.prompts, self.n, self.echo, self.logprobs = prompts, n, echo, logprobs
        self.choices = [_ChoiceOut(i) for i in range(len(prompts) * n)]
        self.prompt_tokens = [len(ids) for ids, _ in prompts]
        self.cached_tokens = 0
        self.error: str | None = None

    # -- events
    def apply(self, p: int, event) -> list[dict]:
        """Updates the choices with ``event`` of prompt ``p``; returns stream chunk choices."""
        from rgemma.inference.engine import ERROR, PROMPT
        if event.kind == ERROR:
            self.error = event.error
            return []
        if event.kind == PROMPT:
            self.cached_tokens += event.cached_tokens
            return self._prompt_chunks(p, event) if (self.echo and not self.chat) else []
        c = self.choices[p * self.n + event.index]
        c.tokens += 1
        before = len(c.text)
        c.text += event.text
        entry = None
        if self.logprobs is not None and not isinstance(event.stop, int):
            entry = (event.token_id, event.logprob, event.top_logprobs, self._offset(p, before))
            c.lp_tokens.append(entry)
        if event.finish_reason:
            c.finish_reason = event.finish_reason
        if not (event.text or entry or event.finish_reason):
            return []
        return [self._chunk_choice(c.index, event.text, [entry] if entry else [],
                                   event.finish_reason)]

    def _offset(self, p: int, before: int) -> int:
        return before + (len(self.prompts[p][1]) if self.echo else 0)

    def _prompt_chunks(self, p: int, event) -> list[dict]:
        """Echo: the prompt (and its logprobs) as the first text of each of p's choices."""
        ids, text = self.prompts[p]
        entries = []
        if self.logprobs is not None and event.prompt_logprobs is not None:
            offsets = self.tok.offsets(ids)
            entries = list(zip(ids, event.prompt_logprobs, event.prompt_top_logprobs, offsets))
        out = []
        for j in range(self.n):
            c = self.choices[p * self.n + j]
            c.lp_tokens = entries + c.lp_tokens
            if self.max_tokens == 0:            # nothing follows the prompt
                c.finish_reason = "length"
            out.append(self._chunk_choice(c.index, text, entries, c.finish_reason))
        return out

    # -- pieces of JSON
    def _chunk_choice(self, index: int, text: str, entries: list, finish: str | None) -> dict:
        if self.chat:
            return {"index": index, "delta": {"content": text} if text else {},
                    "logprobs": self._chat_logprobs(entries) if self.logprobs is not None else None,
                    "finish_reason": finish}
        return {"index": index, "text": text,
                "logprobs": self._legacy_logprobs(entries) if self.logprobs is not None else None,
                "finish_reason": finish}

    def _legacy_logprobs(self, entries: list) -> dict:
        """OpenAI legacy completions logprobs (the sampled token is always in top_logprobs)."""
        tops = []
        for token, lp, top, _ in entries:
            if top is None:
                tops.append(None)
                continue
            d = {self.tok.text(t): v for t, v in top}
            d.setdefault(self.tok.text(token), lp)
            tops.append(d)
        return {"tokens": [self.tok.text(t) for t, *_ in entries],
                "token_logprobs": [lp for _, lp, _, _ in entries],
                "top_logprobs": tops, "text_offset": [o for *_, o in entries]}

    def _chat_logprobs(self, entries: list) -> dict:
        def item(t: int, lp: float) -> dict:
            s = self.tok.text(t)
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}
        return {"content": [{**item(t, lp), "top_logprobs": [item(a, b) for a, b in top or []]}
                            for t, lp, top, _ in entries]}

    def usage(self) -> dict:
        prompt = sum(self.prompt_tokens)
        done = sum(c.tokens for c in self.choices)
        usage = {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}
        if self.cached_tokens:
            usage["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
        return usage

    def chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        out = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
               "created": self.created, "model": self.model, "choices": choices}
        if usage is not None:
            out["usage"] = usage
        return out

    def role_chunk(self) -> dict:
        return self.chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""},
                            "logprobs": None, "finish_reason": None} for c in self.choices])

    def response(self) -> dict:
        """The whole (non-streamed) response."""
        choices = []
        for c in self.choices:
            p = c.index // self.n
            entries = c.lp_tokens
            if self.chat:
                choices.append({"index": c.index,
                                "message": {"role": "assistant", "content": c.text},
                                "logprobs": self._chat_logprobs(entries)
                                if self.logprobs is not None else None,
                                "finish_reason": c.finish_reason})
            else:
                text = (self.prompts[p][1] if self.echo else "") + c.text
                choices.append({"index": c.index, "text": text,
                                "logprobs": self._legacy_logprobs(entries)
                                if self.logprobs is not None else None,
                                "finish_reason": c.finish_reason})
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices,
                "usage": self.usage()}


@functools.cache
def _event_stream():
    """The SSE response class: Starlette's StreamingResponse that calls ``on_close``
    however it ends (done, client gone before or while streaming, server stopping)."""
    from starlette.responses import StreamingResponse

    class EventStream(StreamingResponse):
        media_type = "text/event-stream"

        def __init__(self, body, on_close):
            super().__init__(body, headers={"Cache-Control": "no-cache"})
            self.on_close = on_close

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                self.on_close()

    return EventStream


def _sse(data) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


# ====================================================================== app
OPEN_PATHS = ("/health", "/metrics")     # the only paths that need no API key


class _Guard:
    """ASGI middleware: the API key (all but OPEN_PATHS), response counts for /metrics."""

    def __init__(self, app, api_key: str | None, counts: dict):
        self.app, self.api_key, self.counts = app, api_key, counts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status = message["status"]
                self.counts[status] = self.counts.get(status, 0) + 1
            await send(message)

        if self.api_key and scope["path"] not in OPEN_PATHS and not self._authorized(scope):
            err = APIError(401, "invalid or missing API key (send Authorization: Bearer KEY)",
                           code="invalid_api_key")
            return await _send_json(counting_send, 401, err.body(),
                                    {"www-authenticate": "Bearer"})
        await self.app(scope, receive, counting_send)

    def _authorized(self, scope) -> bool:
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, token = auth.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                                  self.api_key.encode())


async def _send_json(send, status: int, body: dict, headers: dict | None = None) -> None:
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


async def _read_json(request, limit: int) -> dict:
    """The body as a JSON object: 413 over ``limit`` bytes, 400 if not a JSON object."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise APIError(413, f"request body over {limit} bytes", code="body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"request body over {limit} bytes", code="body_too_large")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"malformed JSON body: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the JSON body must be an object", code="invalid_json")
    return data


class Server:
    """The HTTP layer over one engine: ``Server(engine, tokenizer, config).app``."""

    def __init__(self, engine, tokenizer, config: "ServerConfig | None" = None):
        self.engine, self.tokenizer = engine, tokenizer
        self.config = config or ServerConfig()
        self.vocab = engine.vocab_size
        self.tokens = _Tokens(tokenizer)
        self.status_counts: dict[int, int] = {}
        self.started = time.time()
        self.app = self._build()

    # -------------------------------------------------------------- routes
    def _build(self):
        try:
            from fastapi import FastAPI, Request
            from fastapi.responses import JSONResponse, PlainTextResponse
            from starlette.exceptions import HTTPException
        except ImportError as e:
            raise RuntimeError(f"rgemma serve needs fastapi: {INSTALL_HINT}") from e
        app = FastAPI(title="rgemma", docs_url=None, redoc_url=None, openapi_url=None)

        @app.exception_handler(APIError)
        async def api_error(_, e: APIError):
            return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

        @app.exception_handler(HTTPException)
        async def http_error(_, e: HTTPException):
            return JSONResponse(APIError(e.status_code, str(e.detail)).body(),
                                status_code=e.status_code)

        @app.exception_handler(Exception)
        async def internal_error(_, e: Exception):
            return JSONResponse(APIError(500, f"internal error: {type(e).__name__}: {e}",
                                         kind="server_error").body(), status_code=500)

        @app.get("/health")
        async def health():
            if not self.engine.alive:
                return JSONResponse({"status": "engine stopped"}, status_code=503)
            return {"status": "ok"}

        @app.get("/metrics")
        async def metrics():
            return PlainTextResponse(self.metrics_text(),
                                     media_type="text/plain; version=0.0.4")

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": self.config.model_name, "object": "model",
                                                "created": int(self.started),
                                                "owned_by": "rgemma"}]}

        @app.get("/tokenizer_info")
        async def tokenizer_info():
            tok = self.tokenizer
            info = {"tokenizer_class": "rgemma", "bos_token": tok.bos_token,
                    "eos_token": tok.eos_token, "pad_token": tok.id_to_piece(tok.pad_id),
                    "model_max_length": self.config.max_prompt_tokens}
            if getattr(tok, "chat_template", None):
                info["chat_template"] = tok.chat_template
            return info

        @app.post("/tokenize")
        async def tokenize(request: Request):
            body = await _read_json(request, self.config.max_body_bytes)
            ids = self._tokenize(body)
            return {"tokens": ids, "count": len(ids),
                    "max_model_len": self.config.max_prompt_tokens}

        @app.post("/detokenize")
        async def detokenize(request: Request):
            body = await _read_json(request, self.config.max_body_bytes)
            ids = body.get("tokens")
            if not (isinstance(ids, list) and all(_is_token(t) and 0 <= t < self.vocab
                                                  for t in ids)):
                raise _invalid("tokens", f"'tokens' must be a list of token ids in "
                                         f"[0, {self.vocab})")
            return {"prompt": self.tokenizer.decode(ids)}

        @app.post("/v1/completions")
        async def completions(request: Request):
            body = await _read_json(request, self.config.max_body_bytes)
            return await self._serve(request, *self._completion_job(body))

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await _read_json(request, self.config.max_body_bytes)
            return await self._serve(request, *self._chat_job(body))

        app.add_middleware(_Guard, api_key=self.config.api_key, counts=self.status_counts)
        return app

    # ------------------------------------------------------ request checks
    def _completion_job(self, body: dict):
        cfg = self.config
        echo = _bool(body, "echo")
        common = _common(body, cfg, self.engine.config.max_batch, self.vocab,
                         max_tokens_default=min(16, cfg.max_tokens_limit),
                         min_max_tokens=0, max_tokens_names=("max_tokens",))
        if common.max_tokens == 0 and not echo:
            raise _invalid("max_tokens", "'max_tokens' must be >= 1 (0 only with echo)")
        logprobs = _int(body, "logprobs", None, 0, MAX_LOGPROBS)
        prompts = _prompts(body, self.tokenizer, self.vocab, self.engine.config.max_queue)
        self._check_lengths(prompts, "prompt")
        fmt = _Formatter(False, cfg.model_name, self.tokens, prompts, common.n, echo=echo,
                         logprobs=logprobs, max_tokens=common.max_tokens)
        prompt_lp = logprobs if (echo and logprobs is not None) else None
        return fmt, common, self._requests(prompts, common, logprobs, prompt_lp)

    def _chat_job(self, body: dict):
        cfg = self.config
        from rgemma.io.tokenizer import ChatTemplateError
        messages = _messages(body)
        common = _common(body, cfg, self.engine.config.max_batch, self.vocab,
                         max_tokens_default=cfg.max_tokens_limit, min_max_tokens=1,
                         max_tokens_names=("max_completion_tokens", "max_tokens"))
        want = _bool(body, "logprobs")
        top = _int(body, "top_logprobs", None, 0, MAX_LOGPROBS)
        if top is not None and not want:
            raise _invalid("top_logprobs", "'top_logprobs' needs 'logprobs': true")
        if _bool(body, "echo"):
            raise _invalid("echo", "'echo' is not supported for chat completions", "unsupported")
        try:
            text = self.tokenizer.render_chat(messages)
        except ChatTemplateError as e:
            raise _invalid("messages", str(e)) from None
        prompts = [(self.tokenizer.encode(text, add_bos=False), text)]
        self._check_lengths(prompts, "messages")
        logprobs = (top or 0) if want else None
        fmt = _Formatter(True, cfg.model_name, self.tokens, prompts, common.n, logprobs=logprobs)
        return fmt, common, self._requests(prompts, common, logprobs, None)

    def _tokenize(self, body: dict) -> list[int]:
        """``/tokenize`` (vLLM's shape): ``prompt`` text or chat ``messages``."""
        from rgemma.io.tokenizer import ChatTemplateError
        special = _bool(body, "add_special_tokens", True)
        if body.get("messages") is not None:
            try:
                text = self.tokenizer.render_chat(_messages(body),
                                                  _bool(body, "add_generation_prompt", True))
            except ChatTemplateError as e:
                raise _invalid("messages", str(e)) from None
            return self.tokenizer.encode(text, add_bos=False)
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise _invalid("prompt", "'prompt' must be a string", "invalid_type")
        return self.tokenizer.encode(_utf8(prompt, "prompt"), add_bos=special)

    def _check_lengths(self, prompts: list, param: str) -> None:
        for ids, _ in prompts:
            if len(ids) > self.config.max_prompt_tokens:
                raise _invalid(param, f"the prompt has {len(ids)} tokens, over this server's "
                                      f"limit of {self.config.max_prompt_tokens}",
                               "context_length_exceeded")

    def _requests(self, prompts: list, c: _Common, logprobs, prompt_logprobs) -> list:
        from rgemma.inference.engine import Request
        return [Request(prompt_ids=ids, max_tokens=c.max_tokens, params=c.params, seed=c.seed,
                        n=c.n, stop_ids=[] if c.ignore_eos else None, stop_strings=c.stop,
                        logprobs=logprobs, prompt_logprobs=prompt_logprobs)
                for ids, _ in prompts]

    # ------------------------------------------------------------- serving
    async def _serve(self, request, fmt: _Formatter, common: _Common, requests: list):
        from fastapi.responses import JSONResponse, Response
        if not self.engine.alive:
            raise APIError(503, "the engine is not running", code="engine_unavailable",
                           kind="server_error")
        try:
            run = _Run(self.engine, requests, asyncio.get_running_loop())
        except APIError as e:
            if e.status == 503:
                e.headers = {"Retry-After": str(self.config.retry_after_s)}
            raise
        if common.stream:
            return _event_stream()(self._stream(request, run, fmt, common), on_close=run.cancel)
        try:
            async for batch in run.batches(request):
                for p, event in batch:
                    fmt.apply(p, event)
        finally:
            run.cancel()
        if await request.is_disconnected():
            return Response(status_code=499)
        if fmt.error:
            return JSONResponse(APIError(500, fmt.error, kind="server_error").body(),
                                status_code=500)
        return fmt.response()

    async def _stream(self, request, run: _Run, fmt: _Formatter,
                      common: _Common) -> AsyncIterator[bytes]:
        try:
            if fmt.chat:
                yield _sse(fmt.role_chunk())
            async for batch in run.batches(request):
                out = b""                        # everything that arrived: one write
                for p, event in batch:
                    choices = fmt.apply(p, event)
                    if choices:
                        out += _sse(fmt.chunk(choices))
                    if fmt.error:
                        out += _sse(APIError(500, fmt.error, kind="server_error").body())
                        break
                if out:
                    yield out
                if fmt.error:
                    break
            if common.include_usage and not fmt.error:
                yield _sse(fmt.chunk([], fmt.usage()))
            yield _sse("[DONE]")
        finally:
            run.cancel()           # the client left, or we are done: free the rows now

    # ------------------------------------------------------------- metrics
    def metrics_text(self) -> str:
        """Prometheus text exposition of the engine's and the server's counters."""
        s = self.engine.stats()
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: Iterable[tuple[str, float]]):
            lines.append(f"# HELP rgemma_{name} {help_}")
            lines.append(f"# TYPE rgemma_{name} {kind}")
            lines.extend(f"rgemma_{name}{labels} {value:g}" for labels, value in samples)

        metric("requests_total", "counter", "Engine requests by outcome.", [
            ('{outcome="submitted"}', s.requests_submitted),
            ('{outcome="finished"}', s.requests_finished),
            ('{outcome="cancelled"}', s.requests_cancelled),
            ('{outcome="failed"}', s.requests_failed),
            ('{outcome="rejected"}', s.requests_rejected)])
        metric("http_responses_total", "counter", "HTTP responses by status code.",
               [(f'{{code="{k}"}}', v) for k, v in sorted(self.status_counts.items())])
        metric("prompt_tokens_total", "counter", "Prompt tokens prefilled.",
               [("", s.prompt_tokens)])
        metric("prompt_tokens_cached_total", "counter", "Prompt tokens reused from the prefix "
               "cache.", [("", s.prompt_tokens_cached)])
        metric("generation_tokens_total", "counter", "Tokens generated.",
               [("", s.generated_tokens)])
        metric("engine_steps_total", "counter", "Scheduler iterations.", [("", s.steps)])
        metric("queue_depth", "gauge", "Requests waiting for batch rows.", [("", s.waiting)])
        metric("prefilling_requests", "gauge", "Requests being prefilled.",
               [("", s.prefilling)])
        metric("active_slots", "gauge", "Batch rows decoding.", [("", s.active_slots)])
        metric("reserved_slots", "gauge", "Batch rows reserved by prefilling requests.",
               [("", s.reserved_slots)])
        metric("max_slots", "gauge", "Batch rows in all.", [("", s.max_slots)])
        metric("generation_tokens_per_second", "gauge", "Generated tokens per second "
               "(last 10 s).", [("", s.tokens_per_second)])
        metric("prefix_cache_entries", "gauge", "Prefix states cached.",
               [("", s.prefix_cache_entries)])
        metric("prefix_cache_bytes", "gauge", "Bytes of cached prefix states.",
               [("", s.prefix_cache_bytes)])
        metric("prefix_cache_hits_total", "counter", "Prompts that reused a cached prefix.",
               [("", s.prefix_cache_hits)])
        return "\n".join(lines) + "\n"


def create_app(engine, tokenizer, config: ServerConfig | None = None):
    """The FastAPI app serving ``engine`` (which must be started)."""
    return Server(engine, tokenizer, config).app


# ======================================================= running it in-process
class ServerThread:
    """Serves ``app`` with uvicorn in a background thread (tests, benchmarks).

        with ServerThread(app) as url:       # http://127.0.0.1:<free port>
            ...
    """

    def __init__(self, app, host: str = DEFAULT_HOST, port: int = 0, log_level: str = "warning"):
        self.app, self.host, self.port, self.log_level = app, host, port, log_level
        self.server = None
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> str:
        import uvicorn
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level=self.log_level, access_log=False,
                                timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       name="rgemma-http", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.01)
        return self.url

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
            self.thread.join(10)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ====================================================================== CLI
class _CLIError(Exception):
    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def register(subparsers) -> None:
    """Adds the ``serve`` verb."""
    p = subparsers.add_parser(
        "serve", help="serve an OpenAI-compatible HTTP API with continuous batching",
        description="Serve /v1/completions, /v1/chat/completions, /v1/models, /health and "
                    "/metrics (OpenAI-compatible) with continuous batching.")
    p.add_argument("--model", default=None, metavar="PATH_OR_NAME",
                   help="checkpoint directory or file, or 'demo' for the bundled demo model "
                        "(the default)")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="model id in /v1/models (default: the checkpoint's directory name)")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to bind (default {DEFAULT_HOST}, this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}")
    p.add_argument("--max-batch", type=int, default=8,
                   help="sequences decoded together (rows of the state; default 8)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting at most; more get 503 (default 64)")
    p.add_argument("--prefill-chunk", type=int, default=256,
                   help="prompt tokens prefilled per step between decode steps (default 256)")
    p.add_argument("--prefix-cache-mb", type=float, default=256.0,
                   help="memory for cached prompt-prefix states, 0 = off (default 256)")
    p.add_argument("--api-key", default=os.environ.get("RGEMMA_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (all paths but /health and "
                        "/metrics; default: $RGEMMA_API_KEY, else none)")
    p.add_argument("--max-tokens-limit", type=int, default=2048,
                   help="largest max_tokens a request may ask (default 2048)")
    p.add_argument("--max-prompt-tokens", type=int, default=8192,
                   help="longest prompt accepted, in tokens (default 8192)")
    p.add_argument("--max-body-mb", type=float, default=4.0,
                   help="largest request body (default 4 MB; larger gets 413)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="parameter dtype (default: the checkpoint's)")
    p.add_argument("--compute-dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="activation dtype (e.g. float32 with bfloat16 weights on CPUs)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (default: torch's choice)")
    p.add_argument("--log-level", default="info",
                   choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=run)


def run(args) -> int:
    """``rgemma serve``: returns the exit status."""
    try:
        return _serve_cli(args)
    except _CLIError as e:
        print(f"rgemma serve: error: {' '.join(str(e).split())}", file=sys.stderr)
        return e.code


def _serve_cli(args) -> int:
    _check_args(args)
    try:
        import uvicorn  # noqa: F401
        import fastapi  # noqa: F401
    except ImportError:
        raise _CLIError(f"the server needs fastapi and uvicorn: {INSTALL_HINT}") from None
    from rgemma.inference.engine import Engine, EngineConfig
    model, tokenizer, path = _load(args)
    engine = Engine(model, tokenizer, EngineConfig(
        max_batch=args.max_batch, max_queue=args.max_queue, prefill_chunk=args.prefill_chunk,
        prefix_cache_bytes=int(args.prefix_cache_mb * 2**20))).start()
    name = args.served_model_name or os.path.basename(os.path.normpath(path)) or "rgemma"
    config = ServerConfig(model_name=name, api_key=args.api_key or None,
                          max_tokens_limit=args.max_tokens_limit,
                          max_prompt_tokens=args.max_prompt_tokens,
                          max_body_bytes=int(args.max_body_mb * 2**20))
    if args.host not in ("127.0.0.1", "localhost", "::1") and not config.api_key:
        print(f"rgemma serve: warning: listening on {args.host} without --api-key",
              file=sys.stderr)
    print(f"rgemma serve: {name} on http://{args.host}:{args.port} "
          f"(batch {args.max_batch}, queue {args.max_queue})", file=sys.stderr)
    import uvicorn
    try:
        uvicorn.run(create_app(engine, tokenizer, config), host=args.host, port=args.port,
                    log_level=args.log_level, timeout_graceful_shutdown=5)
    finally:
        engine.stop()
    return 0


def _check_args(args) -> None:
    for flag, value, low in (("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 1),
                             ("--prefill-chunk", args.prefill_chunk, 1),
                             ("--max-tokens-limit", args.max_tokens_limit, 1),
                             ("--max-prompt-tokens", args.max_prompt_tokens, 1),
                             ("--port", args.port, 0)):
        if value < low:
            raise _CLIError(f"{flag} must be >= {low}, got {value}", 2)
    if args.prefix_cache_mb < 0 or args.max_body_mb <= 0:
        raise _CLIError("--prefix-cache-mb must be >= 0 and --max-body-mb > 0", 2)


def _load(args):
    """(model, tokenizer, path) for --model / --dtype / --device; _CLIError on failure."""
    import torch

    from rgemma.io import checkpoint
    path = args.model
    if not path or (path == DEMO_NAME and not os.path.exists(path)):
        path = _demo_path()
    if not os.path.exists(path):
        raise _CLIError(f"model {path!r} not found: pass --model PATH to a checkpoint")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    try:
        model, tokenizer = checkpoint.load(path, dtype=dtype, device=device, progress=False)
    except Exception as e:         # any failure to load is one line, never a traceback
        raise _CLIError(f"cannot load model {path!r}: {e}") from None
    if tokenizer is None:
        raise _CLIError(f"{path}: no tokenizer (tokenizer.model or tokenizer.json) next to "
                        "the checkpoint")
    if args.compute_dtype:
        model.set_compute_dtype(getattr(torch, args.compute_dtype))
    return model.eval(), tokenizer, path


def _demo_path() -> str:
    try:
        from rgemma.io import demo
        return str(demo.path())
    except (ImportError, OSError) as e:      # no demo module, or its files are missing
        raise _CLIError(f"no --model given and no bundled demo model ({e}); "
                        "pass --model PATH") from None


def main(argv: list[str] | None = None) -> int:
    """``python -m rgemma.server ...``: the ``serve`` verb on its own."""
    import argparse
    parser = argparse.ArgumentParser(prog="python -m rgemma.server")
    register(parser.add_subparsers(dest="verb"))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
