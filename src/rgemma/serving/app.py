"""An OpenAI-compatible HTTP server over the continuous-batching engine.

    app = create_app(engine, tokenizer, ServerConfig(model_name="demo"))

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
* ``GET /``: a chat page in the browser (``web.py``; its files need no API key).
* ``GET /tokenizer_info``, ``POST /tokenize``, ``POST /detokenize`` (vLLM's
  shapes): lm-eval's ``local-completions`` finds them and tokenizes with the
  server's own tokenizer (its "remote" tokenizer backend).

The request bodies are the pydantic models of ``protocol.py``; responses are
built by ``formatting.py``. Streaming is Server-Sent Events (``data: {...}``
chunks, then ``data: [DONE]``). Errors are OpenAI's JSON ``{"error":
{"message", "type", "param", "code"}}``: 400 for invalid fields (named in
``param``) and malformed JSON, 401 for a missing / wrong API key (every path
but /health, /metrics and the chat page's files), 413 for bodies over the limit, 503 (with
``Retry-After``) when the engine's queue is full. A client that disconnects
cancels its request, freeing its rows at once (a non-streamed request notices
within ``DISCONNECT_POLL_S``, however fast its tokens come).

Hostile or mistaken input is refused before it costs anything: bodies over
``max_body_bytes`` (413), JSON nested too deeply (400), prompt texts of more
than ``max_prompt_tokens`` x ``protocol.PROMPT_BYTES_PER_TOKEN`` bytes (400,
before tokenizing), requests over the per-request budgets of tokens and of
log-probabilities (400, see ``ServerConfig``). Parsing, validation,
tokenization and the building of large responses run in worker threads, so
one big request never stalls /health or the live streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import gc
import hmac
import json
import socket
import threading
import time
from collections.abc import AsyncIterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from rgemma.inference.engine import EngineError, QueueFull, RequestError
from rgemma.inference.sampling import generation_defaults
from rgemma.inference.state_store import StateStore, StoredState
from rgemma.serving import DEFAULT_HOST
from rgemma.serving.errors import APIError
from rgemma.serving.formatting import EventStream, ResponseFormatter, TokenTexts, sse
from rgemma.serving.metrics import ResponseCounter, ServerMetrics
from rgemma.serving.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    RequestLimits,
    RequestModel,
    TokenizeRequest,
    api_error_from_validation,
)
from rgemma.serving.states import StateRoutes, continuation_prompts
from rgemma.serving.web import WEB_PATHS, add_web_routes
from rgemma.state import State

DISCONNECT_POLL_S = 0.2  # how often a running request checks that its client is still there
# the only paths that need no API key (the chat page's files hold no data)
OPEN_PATHS = ("/health", "/metrics", *WEB_PATHS)


@dataclasses.dataclass
class ServerConfig:
    """What the HTTP layer accepts.

    model_name: the id listed by /v1/models (requests may name any model).
    api_key: when set, every path but /health, /metrics and the chat page (``OPEN_PATHS``) needs
      ``Authorization: Bearer <api_key>``.
    max_tokens_limit: largest ``max_tokens`` a request may ask for.
    max_prompt_tokens: longest prompt (in tokens) accepted; prompt texts of more than
      max_prompt_tokens x ``protocol.PROMPT_BYTES_PER_TOKEN`` (32) bytes are refused
      without being tokenized.
    max_body_bytes: larger request bodies get 413.
    max_request_tokens: most tokens one request may cost, its prompt tokens plus n x
      max_tokens per prompt (more: 400).
    max_logprob_entries: most log-probabilities one request may return, (echoed prompt
      tokens + max_tokens per prompt) x n x (1 + logprobs) (more: 400). 2M entries is
      about 50 MB of JSON.
    retry_after_s: the Retry-After of a 503 (queue full).
    """

    model_name: str = "rgemma"
    api_key: str | None = None
    max_tokens_limit: int = 2048
    max_prompt_tokens: int = 8192
    max_body_bytes: int = 4 * 2**20
    max_request_tokens: int = 2**20
    max_logprob_entries: int = 2_000_000
    retry_after_s: int = 1


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class Server:
    """The HTTP layer over one started engine: ``Server(engine, tokenizer, config).app``;
    ``states``: the store of the state handles (default: in RAM, 1 GiB)."""

    def __init__(
        self,
        engine,
        tokenizer,
        config: ServerConfig | None = None,
        states: StateStore | None = None,
    ):
        self.engine, self.tokenizer = engine, tokenizer
        # state handles (states.py): RAM only unless the caller gives a store with a disk tier
        self.states = states if states is not None else StateStore(engine.model)
        self.state_routes = StateRoutes(self, self.states)
        # sampling defaults of the model's generation_config.json (request fields win)
        self.defaults = generation_defaults(getattr(tokenizer, "generation_config", {}))
        self.config = config = config or ServerConfig()
        self.limits = RequestLimits(
            max_tokens=config.max_tokens_limit,
            max_prompt_tokens=config.max_prompt_tokens,
            max_n=engine.config.max_batch,
            max_prompts=engine.config.max_queue,
            vocab_size=engine.vocab_size,
            max_request_tokens=config.max_request_tokens,
            max_logprob_entries=config.max_logprob_entries,
        )
        self.tokens = TokenTexts(tokenizer)
        self.metrics = ServerMetrics(engine)
        self.started = time.time()
        self.app = self._build()

    # -------------------------------------------------------------- routes
    def _build(self) -> FastAPI:
        app = FastAPI(title="rgemma", docs_url=None, redoc_url=None, openapi_url=None)
        config = self.config

        @app.exception_handler(APIError)
        async def api_error(_, e: APIError):
            return _error_response(e)

        @app.exception_handler(ValidationError)
        async def invalid_field(_, e: ValidationError):
            return _error_response(api_error_from_validation(e))

        @app.exception_handler(HTTPException)
        async def http_error(_, e: HTTPException):
            return _error_response(APIError(e.status_code, str(e.detail)))

        @app.exception_handler(Exception)
        async def internal_error(_, e: Exception):
            # Starlette answers this outside the middleware stack: count it here.
            self.metrics.count_response(500)
            return _error_response(
                APIError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error")
            )

        @app.get("/health")
        async def health():
            if not self.engine.alive:
                return JSONResponse({"status": "engine stopped"}, status_code=503)
            return {"status": "ok"}

        @app.get("/metrics")
        async def metrics():
            return Response(self.metrics.render(), media_type=self.metrics.content_type)

        @app.get("/v1/models")
        async def models():
            return {
                "object": "list",
                "data": [
                    {
                        "id": config.model_name,
                        "object": "model",
                        "created": int(self.started),
                        "owned_by": "rgemma",
                    }
                ],
            }

        @app.get("/tokenizer_info")
        async def tokenizer_info():
            tok = self.tokenizer
            info = {
                "tokenizer_class": "rgemma",
                "bos_token": tok.bos_token,
                "eos_token": tok.eos_token,
                "pad_token": tok.id_to_piece(tok.pad_id),
                "model_max_length": config.max_prompt_tokens,
            }
            if getattr(tok, "chat_template", None):
                info["chat_template"] = tok.chat_template
            return info

        @app.post("/tokenize")
        async def tokenize(request: Request):
            req = await self._parse(request, TokenizeRequest)

            def answer() -> Response:  # megabytes of text -> millions of ids: off the loop
                ids = req.encode(self.tokenizer)
                body = (
                    f'{{"tokens":{_json_ints(ids)},"count":{len(ids)},'
                    f'"max_model_len":{config.max_prompt_tokens}}}'
                )
                return Response(body, media_type="application/json")

            return await asyncio.to_thread(answer)

        @app.post("/detokenize")
        async def detokenize(request: Request):
            req = await self._parse(request, DetokenizeRequest)
            return {"prompt": await asyncio.to_thread(self.tokenizer.decode, req.tokens)}

        @app.post("/v1/completions")
        async def completions(request: Request):
            return await self._complete(request, await self._parse(request, CompletionRequest))

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            req = await self._parse(request, ChatCompletionRequest)
            return await self._complete(request, req)

        self.state_routes.add_to(app)
        add_web_routes(app)  # GET /: the chat page (web.py)
        app.add_middleware(ApiKeyGuard, api_key=config.api_key)
        app.add_middleware(ResponseCounter, metrics=self.metrics)  # outermost: counts 401s
        return app

    # ------------------------------------------------------------- serving
    async def _parse(
        self, request: Request, model: type[RequestModel], empty_ok: bool = False
    ) -> RequestModel:
        """The body validated by ``model`` (ValidationError: answered as a 400); with
        ``empty_ok`` no body at all means ``{}`` (every field optional). Parsing and
        validating megabytes takes a while: done in a worker thread."""
        body = await _read_body(request, self.config.max_body_bytes)
        if empty_ok and not body:
            body = b"{}"
        return await asyncio.to_thread(_validate, model, body, self.limits)

    async def read_body(self, request: Request, limit: int) -> bytes:
        """The raw body (413 over ``limit`` bytes)."""
        return await _read_body(request, limit)

    async def run_to_state(self, request: Request, engine_request) -> State:
        """Runs a ``return_state`` request with ``max_tokens`` 0 (reading a prompt into
        a state) and returns the state; 499 if the client left, 500 if it failed."""
        run = self._start([engine_request])
        state, error = None, None
        try:
            async with contextlib.aclosing(run.batches(request)) as batches:
                async for batch in batches:
                    for _, event in batch:
                        state = event.state if event.state is not None else state
                        error = event.error or error
        finally:
            run.cancel()
        if run.client_gone:
            raise APIError(499, "the client closed the request")
        if error or state is None:
            raise APIError(500, error or "no state came back", kind="server_error")
        return state

    def _check_alive(self) -> None:
        if not self.engine.alive:
            raise APIError(
                503, "the engine is not running", code="engine_unavailable", kind="server_error"
            )

    def _start(self, engine_requests: list) -> _Run:
        """Submits the requests as one _Run (503 with Retry-After when the queue is full)."""
        self._check_alive()
        try:
            return _Run(self.engine, engine_requests, asyncio.get_running_loop())
        except APIError as e:
            if e.status == 503:
                e.headers = {"Retry-After": str(self.config.retry_after_s)}
            raise

    def _prepare(
        self, req: CompletionRequest | ChatCompletionRequest, entry: StoredState | None = None
    ) -> ResponseFormatter:
        """Tokenizes the prompts (after ``entry``'s text, if given), checks the budgets,
        sets up the response (worker thread)."""
        if entry is None:
            prompts = req.encode_prompts(self.tokenizer, self.limits)
        else:
            prompts = continuation_prompts(req, entry, self.tokenizer)
        req.check_budgets(prompts, self.limits)
        req.prepare_grammar(self.tokenizer, self.engine.vocab_size)  # response_format
        return ResponseFormatter(
            isinstance(req, ChatCompletionRequest),
            self.config.model_name,
            self.tokens,
            prompts,
            req.n,
            echo=req.echo,
            logprobs=req.num_logprobs,
            max_tokens=req.max_tokens,
        )

    async def _complete(self, request: Request, req: CompletionRequest | ChatCompletionRequest):
        """Runs a completion request on the engine: the whole response, or its stream."""
        entry = await self.state_routes.get(req.state) if req.state is not None else None
        fmt = await asyncio.to_thread(self._prepare, req, entry)
        self._check_alive()
        try:
            requests = req.to_engine_requests([ids for ids, _ in fmt.prompts], self.defaults)
        except RequestError as e:
            raise APIError(400, str(e)) from None
        for r in requests:
            r.state = entry.state.clone() if entry is not None else None
            r.return_state = req.save_state
        saver = _StateSaver(self, req, isinstance(req, ChatCompletionRequest))
        run = self._start(requests)
        if req.stream:
            return EventStream(
                self._stream(request, run, fmt, req.include_usage, saver), on_close=run.cancel
            )
        try:
            async with contextlib.aclosing(run.batches(request)) as batches:
                async for batch in batches:
                    for p, event in batch:
                        fmt.apply(p, event)
                        await saver.take(event)
        finally:
            run.cancel()
        if run.client_gone:
            return Response(status_code=499)
        if fmt.error:
            return _error_response(APIError(500, fmt.error, kind="server_error"))
        # Up to max_logprob_entries: megabytes of JSON, built off the event loop.
        return await asyncio.to_thread(lambda: JSONResponse(saver.added(fmt.response())))

    async def _stream(
        self,
        request: Request,
        run: _Run,
        fmt: ResponseFormatter,
        include_usage: bool,
        saver: _StateSaver,
    ) -> AsyncIterator[bytes]:
        try:
            if fmt.chat:
                yield sse(fmt.role_chunk())
            async with contextlib.aclosing(run.batches(request)) as batches:
                async for batch in batches:
                    out = b""  # everything that arrived: one write
                    for p, event in batch:
                        choices = fmt.apply(p, event)
                        saved = await saver.take(event)
                        if choices or saved:
                            out += sse(
                                saver.added(fmt.chunk(choices)) if saved else fmt.chunk(choices)
                            )
                        if fmt.error:
                            out += sse(APIError(500, fmt.error, kind="server_error").body())
                            break
                    if out:
                        yield out
                    if fmt.error:
                        break
            if include_usage and not fmt.error:
                yield sse(fmt.chunk([], fmt.usage()))
            yield sse("[DONE]")
        finally:
            run.cancel()  # the client left, or we are done: free the rows now


def create_app(
    engine, tokenizer, config: ServerConfig | None = None, states: StateStore | None = None
) -> FastAPI:
    """The FastAPI app serving ``engine`` (which must be started)."""
    return Server(engine, tokenizer, config, states).app


class _StateSaver:
    """``save_state``: makes the handle from the finishing event's state, and adds its
    state object to the response (or to the stream's chunk with the finish_reason)."""

    def __init__(self, server: Server, req, chat: bool):
        self.server, self.req, self.chat = server, req, chat
        self.object: dict | None = None

    async def take(self, event) -> bool:
        """True if ``event`` carried the final state (now saved)."""
        if getattr(event, "state", None) is None or not self.req.save_state:
            return False
        store = self.server.states
        entry = StoredState(
            store.new_id(),
            event.state,
            pending_ids=[event.token_id],
            metadata=self.req.metadata or {},
            ends_with_answer=self.chat,
        )
        self.object = await self.server.state_routes.save(entry)
        return True

    def added(self, body: dict) -> dict:
        if self.object is not None:
            body["state"] = self.object
        return body


# ============================================================ engine bridge
class _Run:
    """The engine requests of one HTTP request, their events funnelled into one asyncio queue."""

    def __init__(self, engine, requests: list, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.handles = []
        self.open = len(requests)
        self.client_gone = False
        try:
            for i, r in enumerate(requests):
                self.handles.append(engine.submit(r, on_event=functools.partial(self._push, i)))
        except QueueFull as e:
            self.cancel()
            raise APIError(
                503, f"server busy: {e}; retry later", code="queue_full", kind="server_overloaded"
            ) from None
        except RequestError as e:
            self.cancel()
            raise APIError(400, str(e)) from None
        except EngineError as e:
            self.cancel()
            raise APIError(503, str(e), code="engine_unavailable", kind="server_error") from None

    def _push(self, i: int, event) -> None:  # engine thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (i, event))

    async def batches(self, request: Request) -> AsyncIterator[list[tuple[int, object]]]:
        """Lists of (prompt index, Event), all that have arrived, until every engine
        request ended; stops (cancelling the engine requests) if the client left.

        The client is checked every DISCONNECT_POLL_S by a task of its own, whether or not
        events flow: tokens of an abandoned request can come for minutes."""
        watcher = asyncio.create_task(self._watch(request))
        try:
            while self.open:
                items = [await self.queue.get()]
                while not self.queue.empty():
                    items.append(self.queue.get_nowait())
                if self.client_gone:
                    return
                batch = [(i, event) for i, event in items if event is not None]
                self.open -= len(items) - len(batch)  # None: that engine request ended
                if batch:
                    yield batch
        finally:
            watcher.cancel()

    async def _watch(self, request: Request) -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)
        self.client_gone = True
        self.cancel()
        self.queue.put_nowait((-1, None))  # wakes batches()

    def cancel(self) -> None:
        for h in self.handles:
            h.cancel()


# ============================================================ HTTP plumbing
class ApiKeyGuard:
    """ASGI middleware: ``Authorization: Bearer <api_key>`` on every path but OPEN_PATHS."""

    def __init__(self, app, api_key: str | None):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send):
        if (
            scope["type"] == "http"
            and self.api_key
            and scope["path"] not in OPEN_PATHS
            and not self._authorized(scope)
        ):
            err = APIError(
                401,
                "invalid or missing API key (send Authorization: Bearer KEY)",
                code="invalid_api_key",
            )
            return await _send_json(send, 401, err.body(), {"www-authenticate": "Bearer"})
        await self.app(scope, receive, send)

    def _authorized(self, scope) -> bool:
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, token = auth.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), self.api_key.encode()
        )


async def _send_json(send, status: int, body: dict, headers: dict | None = None) -> None:
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body: 413 over ``limit`` bytes."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise APIError(413, f"request body over {limit} bytes", code="body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"request body over {limit} bytes", code="body_too_large")
    return bytes(body)


def _parse_json(body: bytes) -> dict:
    """The body as a JSON object: 400 if it is not one (or is nested too deeply)."""
    try:
        data = json.loads(body)
    except RecursionError:  # e.g. b"[" * 100000: Python's parser recurses per level
        raise APIError(400, "invalid JSON: nested too deeply", code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"malformed JSON body: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(
            400, f"the JSON body must be an object, got {type(data).__name__}", code="invalid_json"
        )
    return data


def _json_ints(ids: list[int], chunk: int = 65536) -> str:
    """``json.dumps(ids)`` in pieces: one C call on millions of ids would hold the GIL (and
    so stall the event loop) for a third of a second."""
    return (
        "["
        + ",".join(json.dumps(ids[i : i + chunk])[1:-1] for i in range(0, len(ids), chunk))
        + "]"
    )


def _validate(model: type[RequestModel], body: bytes, limits: RequestLimits) -> RequestModel:
    """``body`` parsed and validated by ``model`` (runs in a worker thread)."""
    data = _parse_json(body)
    try:
        return model.model_validate(data, context=limits)
    except RecursionError:  # a deep value in a field pydantic walks
        raise APIError(400, "invalid JSON: nested too deeply", code="invalid_json") from None


# ======================================================= running it in-process
_frozen_lock = threading.Lock()
_frozen_servers = 0


@contextlib.contextmanager
def long_lived_objects_frozen(collect_first: bool = False):
    """While a server runs, the objects that exist when it starts (the model, the
    libraries) are out of the garbage collector's sight (``gc.freeze``).

    Why: a full (generation 2) collection walks every tracked object with the GIL held,
    so in a large heap it stalls the event loop and the engine for as long as it takes
    (tenths of a second per million objects), at moments no request controls. Frozen,
    they are never walked; objects made later are collected as before. ``collect_first``
    frees the garbage of start-up (loading) before it is frozen for good. Nested uses
    share one freeze, undone when the last ends.
    """
    global _frozen_servers
    with _frozen_lock:
        if _frozen_servers == 0:
            if collect_first:
                gc.collect()
            gc.freeze()
        _frozen_servers += 1
    try:
        yield
    finally:
        with _frozen_lock:
            _frozen_servers -= 1
            if _frozen_servers == 0:
                gc.unfreeze()


class ServerThread:
    """Serves ``app`` with uvicorn in a background thread (tests, benchmarks).

    with ServerThread(app) as url:       # http://127.0.0.1:<free port>
        ...
    """

    def __init__(self, app, host: str = DEFAULT_HOST, port: int = 0, log_level: str = "warning"):
        self.app, self.host, self.port, self.log_level = app, host, port, log_level
        self.server = None
        self.thread: threading.Thread | None = None
        self._frozen = contextlib.ExitStack()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> str:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app, log_level=self.log_level, access_log=False, timeout_graceful_shutdown=2
        )
        self.server = uvicorn.Server(config)
        self._frozen.enter_context(long_lived_objects_frozen())
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, name="rgemma-http", daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self._frozen.close()
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.01)
        return self.url

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
            self.thread.join(10)
        self._frozen.close()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
