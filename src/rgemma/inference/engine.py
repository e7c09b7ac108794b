"""Continuous batching over fixed-size states: the scheduler behind ``rgemma serve``.

    engine = Engine(model, tokenizer, EngineConfig(max_batch=8)).start()
    handle = engine.submit(Request(prompt_ids=tokenizer.encode("Hello"), max_tokens=32))
    for event in handle:                 # Events, as they are decoded
        print(event.text, end="")
    engine.stop()

One scheduler thread owns the model. Each iteration ("step") it

1. drops cancelled requests (their rows are free before the next decode);
2. admits waiting requests, oldest first, while ``max_batch`` has room for
   their ``n`` rows (reserved until their prefill ends);
3. prefills newcomers, at most ``prefill_chunk`` prompt tokens in all per
   step, each into a private 1-row State, so one huge prompt never freezes
   the other streams; a finished prefill is copied into its n rows (n > 1
   forks the state) and samples its first token;
4. decodes one token for every running row in ONE batched model call.

The batch State of ``max_batch`` rows is allocated once. Running sequences
always occupy rows [0, k): a decode step runs on a zero-copy view of those k
rows (the model updates it in place), and a finished sequence's row is
refilled by the last running row (one row copy).

Every sequence samples with its own ``rgemma.sampling.Sampler`` (its own
parameters and seeded generator), so greedy and seeded requests give the same
tokens alone or in any batch. Choice j of a request with ``seed`` s uses seed
s + j, like ``rgemma.generate``.

Optional prefix cache (``prefix_cache_bytes`` > 0): the state after a
prompt prefix is kept (LRU, bounded bytes) and reused by later prompts that
start with it. Entries are made at the end of each prompt (a multi-turn chat
resends its history) and at the longest common prefix with a recent prompt
(e.g. a shared system prompt: the second request with it marks the split,
later ones reuse it).

Failures are per request: an exception while prefilling or sampling a
request ends that request with an "error" event. A failing batched decode
call cannot be attributed, so it fails the requests of that step; the
engine keeps running either way.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import queue
import threading
import time
from typing import Callable, Iterator, Sequence

import torch

from rgemma.inference.generate import TextStream
from rgemma.inference.sampling import Sampler, SamplingError, SamplingParams
from rgemma.state import State
from rgemma.io.tokenizer import common_prefix_length

log = logging.getLogger(__name__)

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
PROMPT_LOGITS_BYTES = 64 * 2**20    # largest [T, V] logits block when scoring prompts


class EngineError(RuntimeError):
    """The engine cannot take the request (stopped, or its queue is full)."""


class QueueFull(EngineError):
    """The waiting queue is at ``max_queue``: retry later (HTTP 503)."""


class RequestError(ValueError):
    """A request the engine cannot run (bad ids, n too large...)."""


# ===================================================================== config
@dataclasses.dataclass
class EngineConfig:
    """Sizes of the scheduler.

    max_batch: rows of the batch State (sequences decoded together).
    max_queue: requests waiting for rows at most; more are refused (QueueFull).
    prefill_chunk: prompt tokens prefilled per step, all newcomers together.
    prefix_cache_bytes: bytes of cached prefix states; 0 = no prefix cache.
    prefix_min_tokens: shortest prefix worth caching.
    """

    max_batch: int = 8
    max_queue: int = 64
    prefill_chunk: int = 256
    prefix_cache_bytes: int = 0
    prefix_min_tokens: int = 16

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "prefill_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1")


@dataclasses.dataclass
class Request:
    """One prompt to complete, with n choices.

    prompt_ids: the prompt's token ids (BOS included if wanted).
    max_tokens: tokens to generate per choice; 0 = only score the prompt.
    params: sampling parameters (greedy by default).
    seed: choice j samples with seed + j; None = random.
    n: number of choices (each takes a row of the batch).
    stop_ids: token ids that end a choice (None = the tokenizer's stop ids).
    stop_strings: strings that end a choice (cut from its text).
    logprobs: None, or report each generated token's logprob plus this many
      top alternatives (0 = the chosen token only).
    prompt_logprobs: None, or the same for every prompt token (the first
      token gets None). Such requests skip the prefix cache.
    """

    prompt_ids: Sequence[int]
    max_tokens: int = 16
    params: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    seed: int | None = None
    n: int = 1
    stop_ids: Sequence[int] | None = None
    stop_strings: Sequence[str] = ()
    logprobs: int | None = None
    prompt_logprobs: int | None = None


# ===================================================================== events
TOKEN, PROMPT, ERROR = "token", "prompt", "error"
TopLogprobs = list[tuple[int, float]]          # (token id, logprob), best first


@dataclasses.dataclass
class Event:
    """Something that happened to a request.

    kind "prompt": once, after the prefill: ``prompt_tokens``,
      ``cached_tokens`` (reused from the prefix cache) and, if asked,
      ``prompt_logprobs`` (one per prompt token, None for the first) and
      ``prompt_top_logprobs``.
    kind "token": one sampled token of choice ``index``: ``token_id``,
      ``text`` (new whole characters, stop strings held back; may be ""),
      ``logprob`` / ``top_logprobs`` if asked; ``finish_reason`` ("stop" or
      "length") on the choice's last token, with ``stop`` = the stop string
      or stop token id that ended it.
    kind "error": the request failed (``error`` says why); nothing follows.
    """

    kind: str
    index: int = 0
    text: str = ""
    token_id: int | None = None
    logprob: float | None = None
    top_logprobs: TopLogprobs | None = None
    finish_reason: str | None = None
    stop: str | int | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[TopLogprobs | None] | None = None
    error: str | None = None


@dataclasses.dataclass
class Choice:
    """The whole output of one choice (see ``RequestHandle.result``)."""

    index: int
    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top_logprobs: list[TopLogprobs] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    stop: str | int | None = None


class RequestHandle:
    """A submitted request: iterate it for Events, ``cancel()`` it, or wait for ``result()``.

    Events go to ``on_event`` when given (called on the engine thread; it must
    not block; ``None`` is passed once at the end), else to an internal queue
    that iterating the handle reads (the iteration ends after the last event).
    """

    _ids = itertools.count(1)

    def __init__(self, request: Request, on_event: Callable[[Event | None], None] | None = None,
                 wake: Callable[[], None] | None = None):
        self.id = next(self._ids)
        self.request = request
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.cancelled = False
        self.finished = False
        self._queue: queue.Queue | None = None if on_event else queue.Queue()
        self._drained = False
        self._on_event = on_event or self._queue.put
        self._wake = wake

    def cancel(self) -> None:
        """Stops the request; its rows are free before the next decode step."""
        if not self.finished and not self.cancelled:
            self.cancelled = True
            if self._wake:
                self._wake()

    def __iter__(self) -> Iterator[Event]:
        return self.events()

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """The events until the request ends (once: a second iteration yields nothing).

        Raises TimeoutError when no event comes within ``timeout`` seconds.
        """
        if self._queue is None:
            raise RuntimeError("this handle delivers its events to on_event")
        while not self._drained:
            try:
                event = self._queue.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"request {self.id}: no event in {timeout} s") from None
            if event is None:
                self._drained = True
                return
            yield event

    def result(self, timeout: float | None = None) -> tuple[list[Choice], Event | None]:
        """Blocks until done: (choices, the "prompt" event); raises EngineError on "error"."""
        choices = [Choice(i) for i in range(self.request.n)]
        prompt = None
        for event in self.events(timeout):
            if event.kind == ERROR:
                raise EngineError(event.error)
            if event.kind == PROMPT:
                prompt = event
                continue
            c = choices[event.index]
            c.text += event.text
            c.token_ids.append(event.token_id)
            if event.logprob is not None:
                c.logprobs.append(event.logprob)
            if event.top_logprobs is not None:
                c.top_logprobs.append(event.top_logprobs)
            if event.finish_reason:
                c.finish_reason, c.stop = event.finish_reason, event.stop
        return choices, prompt

    # -- engine side
    def _emit(self, event: Event | None) -> None:
        if event is not None and event.kind == TOKEN and self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        try:
            self._on_event(event)
        except Exception:       # e.g. the consumer's event loop is closed: it is gone
            self.cancelled = True

    def _close(self) -> None:
        if not self.finished:
            self.finished = True
            self._emit(None)


# =============================================================== prefix cache
class PrefixCache:
    """Token-id prefix -> (1-row State after it, logits [1, V] after it); LRU, bounded bytes."""

    def __init__(self, max_bytes: int, min_tokens: int = 16, recent: int = 16):
        self.max_bytes = max_bytes
        self.min_tokens = max(1, min_tokens)
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: collections.OrderedDict[tuple, tuple[State, torch.Tensor, int]] = \
            collections.OrderedDict()
        self._lengths: collections.Counter[int] = collections.Counter()
        self._recent: collections.deque[tuple] = collections.deque(maxlen=recent)

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, ids: Sequence[int]) -> tuple[int, State, torch.Tensor] | None:
        """The longest cached prefix of ``ids``: (its length, a state copy, logits copy)."""
        for n in sorted(self._lengths, reverse=True):
            if n > len(ids):
                continue
            key = tuple(ids[:n])
            if key in self._entries:
                self._entries.move_to_end(key)
                state, logits, _ = self._entries[key]
                self.hits += 1
                return n, state.clone(), logits.clone()
        self.misses += 1
        return None

    def split_point(self, ids: Sequence[int], start: int) -> int | None:
        """A prefix length in (start, len(ids)) shared with a recent prompt, worth caching."""
        best = 0
        for other in self._recent:
            best = max(best, common_prefix_length(ids, other))
        self._recent.append(tuple(ids))
        worth = best >= self.min_tokens and start < best < len(ids)
        return best if worth and tuple(ids[:best]) not in self._entries else None

    def store(self, ids: Sequence[int], state: State, logits: torch.Tensor) -> None:
        """Keeps copies of the state and logits after ``ids`` (evicting the oldest)."""
        key = tuple(ids)
        size = state.nbytes + logits.numel() * logits.element_size()
        if len(key) < self.min_tokens or size > self.max_bytes or key in self._entries:
            return
        while self.bytes + size > self.max_bytes:
            self._evict_oldest()
        self._entries[key] = (state.clone(), logits.clone(), size)
        self._lengths[len(key)] += 1
        self.bytes += size

    def _evict_oldest(self) -> None:
        key, (_, _, size) = self._entries.popitem(last=False)
        self.bytes -= size
        self._lengths[len(key)] -= 1
        if not self._lengths[len(key)]:
            del self._lengths[len(key)]


# ============================================================ engine internals
class _Job:
    """A request from admission to its last choice: prefill progress, then its sequences."""

    def __init__(self, handle: RequestHandle):
        self.handle = handle
        self.request = handle.request
        self.ids = list(handle.request.prompt_ids)
        self.state: State | None = None        # 1-row, while prefilling
        self.done = 0                          # prompt tokens in self.state
        self.cached = 0
        self.split: int | None = None          # prefix length to snapshot into the cache
        self.logits: torch.Tensor | None = None    # [1, V] after the whole prompt
        self.prompt_lp: list[float | None] = []
        self.prompt_top: list[TopLogprobs | None] = []
        self.open_choices = handle.request.n
        self.stop_ids: frozenset[int] = frozenset()


class _Sequence:
    """One choice being decoded in a row of the batch."""

    def __init__(self, job: _Job, index: int, sampler: Sampler, text: TextStream):
        self.job = job
        self.index = index
        self.sampler = sampler
        self.text = text
        self.generated = 0
        self.next_token = 0        # sampled, not yet fed
        self.position = len(job.ids)


@dataclasses.dataclass
class EngineStats:
    """Counters and gauges for /metrics (a snapshot)."""

    requests_submitted: int = 0
    requests_finished: int = 0
    requests_cancelled: int = 0
    requests_failed: int = 0
    requests_rejected: int = 0
    prompt_tokens: int = 0
    prompt_tokens_cached: int = 0
    generated_tokens: int = 0
    steps: int = 0
    decode_steps: int = 0
    waiting: int = 0
    prefilling: int = 0
    active_slots: int = 0
    reserved_slots: int = 0
    max_slots: int = 0
    tokens_per_second: float = 0.0
    prefix_cache_entries: int = 0
    prefix_cache_bytes: int = 0
    prefix_cache_hits: int = 0
    prefix_cache_misses: int = 0


class _RateMeter:
    """Tokens per second over the last ``window`` seconds."""

    def __init__(self, window: float = 10.0):
        self.window = window
        self._events: collections.deque[tuple[float, int]] = collections.deque()

    def add(self, n: int) -> None:
        self._events.append((time.monotonic(), n))

    def rate(self) -> float:
        now = time.monotonic()
        while self._events and self._events[0][0] < now - self.window:
            self._events.popleft()
        if not self._events:
            return 0.0
        span = max(now - self._events[0][0], 1.0)
        return sum(n for _, n in self._events) / span


# ===================================================================== engine
class Engine:
    """The continuous-batching scheduler (see the module doc).

    Args:
      model: a Griffin (eval mode; the engine only calls it from its thread).
      tokenizer: an ``rgemma.tokenizer.Tokenizer`` (text deltas, stop strings).
      config: sizes; defaults to ``EngineConfig()``.
    """

    def __init__(self, model, tokenizer, config: EngineConfig | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        self.vocab_size = model.config.vocab_size
        self.cache = (PrefixCache(self.config.prefix_cache_bytes, self.config.prefix_min_tokens)
                      if self.config.prefix_cache_bytes > 0 else None)
        self._stats = EngineStats(max_slots=self.config.max_batch)
        self._rate = _RateMeter()
        self._cond = threading.Condition()
        self._waiting: collections.deque[RequestHandle] = collections.deque()
        self._prefilling: list[_Job] = []
        self._rows: list[_Sequence] = []      # row i of self.state runs self._rows[i]
        self._reserved = 0                    # rows promised to prefilling jobs
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.state: State | None = None       # [max_batch], allocated by the thread

    # ------------------------------------------------------------ lifecycle
    def start(self) -> "Engine":
        """Starts the scheduler thread (idempotent); returns self."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="rgemma-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stops the thread; requests still in flight end with an "error" event."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -------------------------------------------------------------- clients
    def submit(self, request: Request,
               on_event: Callable[[Event | None], None] | None = None) -> RequestHandle:
        """Queues a request (thread-safe). Raises RequestError, QueueFull or EngineError."""
        self._check(request)
        handle = RequestHandle(request, on_event, wake=self._wake)
        with self._cond:
            if self._stopping or self._thread is None:
                raise EngineError("the engine is not running")
            if len(self._waiting) >= self.config.max_queue:
                self._stats.requests_rejected += 1
                raise QueueFull(f"queue full ({self.config.max_queue} requests waiting)")
            self._waiting.append(handle)
            self._stats.requests_submitted += 1
            self._cond.notify_all()
        return handle

    def stats(self) -> EngineStats:
        """A snapshot of the counters and gauges."""
        s = dataclasses.replace(self._stats)
        s.waiting = len(self._waiting)
        s.prefilling = len(self._prefilling)
        s.active_slots = len(self._rows)
        s.reserved_slots = self._reserved
        s.tokens_per_second = self._rate.rate()
        if self.cache is not None:
            s.prefix_cache_entries, s.prefix_cache_bytes = len(self.cache), self.cache.bytes
            s.prefix_cache_hits, s.prefix_cache_misses = self.cache.hits, self.cache.misses
        return s

    def _check(self, r: Request) -> None:
        ids = list(r.prompt_ids)
        if not ids:
            raise RequestError("the prompt is empty: at least one token is needed")
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size
               for t in ids):
            raise RequestError(f"prompt token ids must be integers in [0, {self.vocab_size})")
        if not 1 <= r.n <= self.config.max_batch:
            raise RequestError(f"n must be in [1, {self.config.max_batch}] (the batch size)")
        if r.max_tokens < 0:
            raise RequestError("max_tokens must be >= 0")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(r, name)
            if value is not None and not 0 <= value <= self.vocab_size:
                raise RequestError(f"{name} must be None or in [0, vocab size]")
        if not isinstance(r.params, SamplingParams):
            raise RequestError("params must be a SamplingParams")

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # ------------------------------------------------------------- the loop
    def _run(self) -> None:
        with torch.inference_mode():
            self.state = self.model.init_state(self.config.max_batch)
            while self._wait_for_work():
                try:
                    self._step()
                except Exception as e:           # a bug, not a request: keep serving
                    log.exception("engine step failed")
                    self._fail_all(f"internal error: {e}", waiting=False)
        self._fail_all("the server is shutting down")

    def _wait_for_work(self) -> bool:
        """Blocks while idle; False once stopping."""
        with self._cond:
            while not (self._stopping or self._waiting or self._prefilling or self._rows):
                self._cond.wait()
            return not self._stopping

    def _step(self) -> None:
        """One scheduler iteration: reap, admit, prefill a chunk, decode a token."""
        self._reap_cancelled()
        self._admit()
        self._prefill_some()
        if self._rows:
            self._decode()
        self._stats.steps += 1

    # ----------------------------------------------------- admit and reap
    def _free_rows(self) -> int:
        return self.config.max_batch - len(self._rows) - self._reserved

    def _admit(self) -> None:
        """Moves waiting requests to prefill, oldest first, while their rows fit (and at
        most ``max_batch`` prefill at once: each holds a 1-row state)."""
        with self._cond:
            while self._waiting and len(self._prefilling) < self.config.max_batch:
                handle = self._waiting[0]
                rows = _rows_needed(handle.request)
                if rows > self._free_rows():
                    break
                self._waiting.popleft()
                try:
                    job = self._new_job(handle)
                except Exception as e:
                    log.warning("request %d failed to start: %s", handle.id, e)
                    self._fail(handle, f"failed to start: {e}")
                    continue
                self._reserved += rows
                self._prefilling.append(job)

    def _new_job(self, handle: RequestHandle) -> _Job:
        job = _Job(handle)
        stop_ids = handle.request.stop_ids
        job.stop_ids = frozenset(self.tokenizer.stop_ids if stop_ids is None else stop_ids)
        use_cache = self.cache is not None and job.request.prompt_logprobs is None
        hit = self.cache.lookup(job.ids) if use_cache else None
        if hit is not None:
            job.done = job.cached = hit[0]
            job.state, job.logits = hit[1], hit[2]
        else:
            job.state = self.model.init_state(1)
        if use_cache:
            job.split = self.cache.split_point(job.ids, job.done)
        if job.request.prompt_logprobs is not None:
            job.prompt_lp, job.prompt_top = [None], [None]
        return job

    def _reap_cancelled(self) -> None:
        """Drops cancelled requests wherever they are."""
        with self._cond:
            gone = [h for h in self._waiting if h.cancelled]
            for h in gone:
                self._waiting.remove(h)
                self._end(h, cancelled=True)
        for job in [j for j in self._prefilling if j.handle.cancelled]:
            self._drop_job(job, cancelled=True)
        rows = {i for i, s in enumerate(self._rows)
                if s.job.handle.cancelled or s.job.handle.finished}
        if rows:
            jobs = {id(self._rows[i].job): self._rows[i].job for i in rows}
            self._remove_rows(rows)
            for job in jobs.values():
                self._end(job.handle, cancelled=True)

    def _drop_job(self, job: _Job, *, cancelled: bool = False, error: str | None = None) -> None:
        """Removes a prefilling job, releasing its reserved rows."""
        self._prefilling.remove(job)
        self._reserved -= _rows_needed(job.request)
        job.state = job.logits = None
        if error is not None:
            self._fail(job.handle, error)
        else:
            self._end(job.handle, cancelled=cancelled)

    def _end(self, handle: RequestHandle, *, cancelled: bool = False) -> None:
        if handle.finished:
            return
        if cancelled:
            self._stats.requests_cancelled += 1
        else:
            self._stats.requests_finished += 1
        handle._close()

    def _fail(self, handle: RequestHandle, message: str) -> None:
        if handle.finished:
            return
        self._stats.requests_failed += 1
        handle._emit(Event(ERROR, error=message))
        handle._close()

    def _fail_all(self, message: str, *, waiting: bool = True) -> None:
        """Ends every request in flight (and those waiting) with an error."""
        with self._cond:
            waiting, self._waiting = (list(self._waiting), collections.deque()) if waiting \
                else ([], self._waiting)
        jobs = {id(s.job): s.job for s in self._rows}
        self._rows = []
        for job in list(self._prefilling):
            self._drop_job(job, error=message)
        for handle in waiting + [j.handle for j in jobs.values()]:
            self._fail(handle, message)

    # ------------------------------------------------------------ prefill
    def _prefill_some(self) -> None:
        """Prefills at most ``prefill_chunk`` prompt tokens, oldest job first."""
        budget = self.config.prefill_chunk
        for job in list(self._prefilling):
            if budget <= 0:
                break
            try:
                budget -= self._prefill_chunk(job, budget)
            except Exception as e:
                log.warning("request %d failed in prefill: %s", job.handle.id, e)
                self._drop_job(job, error=f"prefill failed: {e}")
                continue
            if job.done == len(job.ids):
                self._prefilling.remove(job)
                self._reserved -= _rows_needed(job.request)
                try:
                    self._start_choices(job)
                except Exception as e:
                    log.warning("request %d failed to start: %s", job.handle.id, e)
                    self._release(job, f"failed to start: {e}")

    def _prefill_chunk(self, job: _Job, budget: int) -> int:
        """Feeds the next chunk of ``job``'s prompt into its state; returns its length."""
        start, total = job.done, len(job.ids)
        end = min(total, start + budget)
        if job.split is not None and start < job.split:
            end = min(end, job.split)
        scoring = job.request.prompt_logprobs is not None
        if scoring:
            end = min(end, start + max(1, PROMPT_LOGITS_BYTES // (4 * self.vocab_size)))
        if start == end:                      # the whole prompt came from the cache
            return 0
        tokens = torch.tensor([job.ids[start:end]], device=self.model.device)
        positions = torch.arange(start, end, device=self.model.device)[None]
        ends_here = end == total or end == job.split
        mode = "all" if scoring else ("last" if ends_here else "none")
        logits, _ = self.model(tokens, positions, job.state, logits=mode)
        if scoring:
            self._score_prompt(job, logits[0], start, end)
            logits = logits[:, -1]
        job.done = end
        self._stats.prompt_tokens += end - start
        if end == job.split:
            self.cache.store(job.ids[:end], job.state, logits)
        if end == total:
            job.logits = logits
            if self.cache is not None and not scoring:
                self.cache.store(job.ids, job.state, logits)
        return end - start

    def _score_prompt(self, job: _Job, logits: torch.Tensor, start: int, end: int) -> None:
        """Logprobs of prompt tokens start+1 .. end (logits [T, V] at start .. end-1)."""
        targets = torch.tensor(job.ids[start + 1:end + 1], device=logits.device)
        lsm = torch.log_softmax(logits[:len(targets)].float(), dim=-1)
        job.prompt_lp += lsm.gather(1, targets[:, None])[:, 0].tolist()
        k = job.request.prompt_logprobs
        job.prompt_top += [_top(row, k) if k else [] for row in lsm]

    def _start_choices(self, job: _Job) -> None:
        """After the prefill: the first token of each choice; rows for those that go on."""
        r = job.request
        self._stats.prompt_tokens_cached += job.cached
        job.handle._emit(Event(
            PROMPT, prompt_tokens=len(job.ids), cached_tokens=job.cached,
            prompt_logprobs=job.prompt_lp if r.prompt_logprobs is not None else None,
            prompt_top_logprobs=job.prompt_top if r.prompt_logprobs is not None else None))
        if r.max_tokens == 0:
            self._end(job.handle)
            return
        rows = []
        try:
            for j in range(r.n):
                seq = self._new_sequence(job, j)
                if not self._sample(seq, job.logits):
                    rows.append(len(self._rows))
                    self._rows.append(seq)
            if rows:
                self.state.copy_(job.state, rows=rows)
        finally:
            job.state = job.logits = None
        if job.open_choices == 0:
            self._end(job.handle)

    def _new_sequence(self, job: _Job, index: int) -> _Sequence:
        r = job.request
        seed = None if r.seed is None else r.seed + index
        sampler = Sampler([r.params], self.vocab_size, self.model.device, seeds=[seed],
                          history=[job.ids] if r.params.repetition_penalty != 1 else None)
        return _Sequence(job, index, sampler, TextStream(self.tokenizer, list(r.stop_strings)))

    # ------------------------------------------------------------- decode
    def _decode(self) -> None:
        """One token for every running row, in one model call on rows [0, k)."""
        k = len(self._rows)
        device = self.model.device
        tokens = torch.tensor([[s.next_token] for s in self._rows], device=device)
        positions = torch.tensor([[s.position] for s in self._rows], device=device)
        try:
            logits, _ = self.model(tokens, positions, _rows_view(self.state, k), logits="last")
        except Exception as e:
            log.exception("batched decode failed")
            jobs = {id(s.job): s.job for s in self._rows}
            self._rows = []
            for job in jobs.values():
                self._fail(job.handle, f"decode failed: {e}")
            return
        self._stats.decode_steps += 1
        finished: set[int] = set()
        for i, seq in enumerate(self._rows):
            seq.position += 1
            if seq.job.handle.finished:          # failed earlier in this step
                finished.add(i)
                continue
            try:
                if self._sample(seq, logits[i:i + 1]):
                    finished.add(i)
            except Exception as e:
                log.warning("request %d failed in sampling: %s", seq.job.handle.id, e)
                finished.add(i)
                self._fail(seq.job.handle, f"sampling failed: {e}")
        done_jobs = {id(self._rows[i].job): self._rows[i].job for i in finished}
        if finished:
            self._remove_rows(finished)
        for job in done_jobs.values():
            if job.open_choices == 0:
                self._end(job.handle)
        self._rate.add(k)

    def _sample(self, seq: _Sequence, logits: torch.Tensor) -> bool:
        """Samples seq's next token from logits [1, V] and emits it; True if the choice ended."""
        r = seq.job.request
        want = r.logprobs is not None
        tokens, lp = seq.sampler.sample(logits, logprobs=want)
        token = int(tokens[0])
        seq.next_token = token
        seq.generated += 1
        self._stats.generated_tokens += 1
        event = Event(TOKEN, index=seq.index, token_id=token,
                      logprob=float(lp[0]) if want else None,
                      top_logprobs=_top(torch.log_softmax(logits[0].float(), -1), r.logprobs)
                      if r.logprobs else ([] if want else None))
        if token in seq.job.stop_ids:
            event.text, event.finish_reason, event.stop = seq.text.finish(), FINISH_STOP, token
        else:
            event.text = seq.text.push(token)
            if seq.text.stopped_on is not None:
                event.finish_reason, event.stop = FINISH_STOP, seq.text.stopped_on
            elif seq.generated >= r.max_tokens:
                event.text += seq.text.finish()
                event.finish_reason = FINISH_LENGTH
        seq.job.handle._emit(event)
        if event.finish_reason:
            seq.job.open_choices -= 1
            return True
        return False

    def _remove_rows(self, gone: set[int]) -> None:
        """Frees rows ``gone``, moving the last running rows into the holes."""
        k = len(self._rows)
        keep = k - len(gone)
        holes = sorted(i for i in gone if i < keep)
        movers = [i for i in range(keep, k) if i not in gone]
        if holes:
            _move_rows(self.state, movers, holes)
        rows = list(self._rows)
        for hole, mover in zip(holes, movers):
            rows[hole] = rows[mover]
        self._rows = rows[:keep]

    def _release(self, job: _Job, message: str) -> None:
        """Fails a job whose choices may already hold rows."""
        rows = {i for i, s in enumerate(self._rows) if s.job is job}
        if rows:
            self._remove_rows(rows)
        self._fail(job.handle, message)


# ================================================================= helpers
def _rows_needed(request: Request) -> int:
    """Batch rows a request takes once prefilled (none when it only scores its prompt)."""
    return request.n if request.max_tokens > 0 else 0


def _rows_view(state: State, k: int) -> State:
    """A State whose tensors are views of rows [0, k) of ``state`` (in-place updates land there)."""
    layers = [type(layer)(**{name: t[:k] for name, t in layer.tensors().items()})
              for layer in state.layers]
    return State(num_tokens=state.num_tokens[:k], doc_start=state.doc_start[:k], layers=layers)


def _move_rows(state: State, src: Sequence[int], dst: Sequence[int]) -> None:
    """Copies rows ``src`` of every state tensor onto rows ``dst``, in place."""
    src_index = torch.tensor(list(src), device=state.device)
    dst_index = torch.tensor(list(dst), device=state.device)
    for t in state.tensors().values():
        t.index_copy_(0, dst_index, t.index_select(0, src_index))


def _top(logprobs: torch.Tensor, k: int) -> TopLogprobs:
    """The k best (token id, logprob) of a [V] row of log-probabilities."""
    values, ids = torch.topk(logprobs, min(k, logprobs.shape[-1]))
    return list(zip(ids.tolist(), values.tolist()))


def sampling_params(**kwargs) -> SamplingParams:
    """SamplingParams, with SamplingError turned into RequestError."""
    try:
        return SamplingParams(**kwargs)
    except SamplingError as e:
        raise RequestError(str(e)) from None
