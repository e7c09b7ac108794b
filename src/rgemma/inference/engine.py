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
import functools
import logging
import threading
import time
from collections.abc import Callable

import torch

from rgemma.inference.batching import TopLogprobs, top_logprobs
from rgemma.inference.prefix_cache import PrefixCache
from rgemma.inference.requests import (
    ERROR,
    PROMPT,
    TOKEN,
    EngineConfig,
    EngineError,
    Event,
    QueueFull,
    Request,
    RequestError,
    RequestHandle,
    sampling_params,
)
from rgemma.inference.sampling import Sampler, SamplingParams
from rgemma.inference.stopping import StopChecker
from rgemma.inference.structured import Grammar, StructuredOutputError, token_mask
from rgemma.io.disk_tier import DiskTier
from rgemma.state import State

__all__ = [
    "ERROR",
    "PROMPT",
    "TOKEN",
    "Engine",
    "EngineConfig",
    "EngineError",
    "EngineStats",
    "Event",
    "QueueFull",
    "Request",
    "RequestError",
    "RequestHandle",
    "sampling_params",
]

log = logging.getLogger(__name__)

PROMPT_LOGITS_BYTES = 64 * 2**20  # largest [T, V] logits block when scoring prompts


# ============================================================ engine internals
class _Job:
    """A request from admission to its last choice: prefill progress, then its sequences."""

    def __init__(self, handle: RequestHandle):
        self.handle = handle
        self.request = handle.request
        self.ids = list(handle.request.prompt_ids)
        self.state: State | None = None  # 1-row, while prefilling
        self.done = 0  # prompt tokens in self.state
        self.offset = 0  # tokens the state had seen before the prompt (Request.state)
        self.cached = 0
        self.split: int | None = None  # prefix length to snapshot into the cache
        self.logits: torch.Tensor | None = None  # [1, V] after the whole prompt
        self.prompt_lp: list[float | None] = []
        self.prompt_top: list[TopLogprobs | None] = []
        self.open_choices = handle.request.n
        self.stop_ids: frozenset[int] = frozenset()


class _Sequence:
    """One choice being decoded in a row of the batch."""

    def __init__(self, job: _Job, index: int, sampler: Sampler, stopper: StopChecker):
        self.job = job
        self.index = index
        self.sampler = sampler
        self.stopper = stopper
        self.next_token = 0  # sampled, not yet fed
        self.position = job.offset + len(job.ids)


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
      disk: a disk tier the prefix cache spills to (and flushes to when the engine stops).
    """

    def __init__(
        self,
        model,
        tokenizer,
        config: EngineConfig | None = None,
        disk: DiskTier | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config = config or EngineConfig()
        self.vocab_size = model.config.vocab_size
        self.cache = (
            PrefixCache(config.prefix_cache_bytes, config.prefix_min_tokens, disk=disk, model=model)
            if config.prefix_cache_bytes > 0
            else None
        )
        self._stats = EngineStats(max_slots=self.config.max_batch)
        self._rate = _RateMeter()
        self._cond = threading.Condition()
        self._waiting: collections.deque[RequestHandle] = collections.deque()
        self._prefilling: list[_Job] = []
        self._rows: list[_Sequence] = []  # row i of self.state runs self._rows[i]
        self._reserved = 0  # rows promised to prefilling jobs
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.state: State | None = None  # [max_batch], allocated by the thread

    # ------------------------------------------------------------ lifecycle
    def start(self) -> Engine:
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

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -------------------------------------------------------------- clients
    def submit(
        self, request: Request, on_event: Callable[[Event | None], None] | None = None
    ) -> RequestHandle:
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
        if any(
            not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size
            for t in ids
        ):
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
        if r.state is not None and (not isinstance(r.state, State) or r.state.batch_size != 1):
            raise RequestError("state must be a 1-row State")
        if r.return_state and r.max_tokens > 0 and r.n != 1:
            raise RequestError("return_state needs n = 1 (one final state per request)")
        if r.grammar is not None and (
            not isinstance(r.grammar, Grammar) or r.grammar.vocab_size != self.vocab_size
        ):
            raise RequestError(
                "grammar must be a structured.Grammar compiled for this engine's "
                f"vocabulary ({self.vocab_size} ids)"
            )

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
                except Exception as e:  # a bug, not a request: keep serving
                    log.exception("engine step failed")
                    self._fail_all(f"internal error: {e}", waiting=False)
        self._fail_all("the server is shutting down")
        if self.cache is not None:
            self.cache.flush()

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
        given = job.request.state
        use_cache = self.cache is not None and job.request.prompt_logprobs is None and given is None
        hit = self.cache.lookup(job.ids) if use_cache else None
        if given is not None:
            job.state = given.to(self.model.device)
            job.offset = int(given.num_tokens[0])
        elif hit is not None:
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
        rows = {
            i for i, s in enumerate(self._rows) if s.job.handle.cancelled or s.job.handle.finished
        }
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
            waiting, self._waiting = (
                (list(self._waiting), collections.deque()) if waiting else ([], self._waiting)
            )
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
        if start == end:  # the whole prompt came from the cache
            return 0
        tokens = torch.tensor([job.ids[start:end]], device=self.model.device)
        positions = torch.arange(start, end, device=self.model.device)[None] + job.offset
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
        targets = torch.tensor(job.ids[start + 1 : end + 1], device=logits.device)
        lsm = torch.log_softmax(logits[: len(targets)].float(), dim=-1)
        job.prompt_lp += lsm.gather(1, targets[:, None])[:, 0].tolist()
        k = job.request.prompt_logprobs
        job.prompt_top += top_logprobs(lsm, k) if k else [[] for _ in lsm]

    def _start_choices(self, job: _Job) -> None:
        """After the prefill: the first token of each choice; rows for those that go on."""
        r = job.request
        self._stats.prompt_tokens_cached += job.cached
        job.handle._emit(
            Event(
                PROMPT,
                prompt_tokens=len(job.ids),
                cached_tokens=job.cached,
                prompt_logprobs=job.prompt_lp if r.prompt_logprobs is not None else None,
                prompt_top_logprobs=job.prompt_top if r.prompt_logprobs is not None else None,
                state=job.state if r.return_state and r.max_tokens == 0 else None,
            )
        )
        if r.max_tokens == 0:
            self._end(job.handle)
            return
        rows = []
        try:
            seqs = [self._new_sequence(job, j) for j in range(r.n)]
            logits = job.logits.expand(r.n, -1)
            ended_choices = self._sample(seqs, logits, lambda _: job.state.clone())
            for seq, ended in zip(seqs, ended_choices):
                if not ended:
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
        sampler = Sampler(
            [r.params],
            self.vocab_size,
            self.model.device,
            seeds=[seed],
            history=[job.ids] if r.params.repetition_penalty != 1 else None,
        )
        matcher = r.grammar.matcher() if r.grammar is not None else None  # one per choice
        stopper = StopChecker(
            self.tokenizer, job.stop_ids, list(r.stop_strings), r.max_tokens, grammar=matcher
        )
        return _Sequence(job, index, sampler, stopper)

    # ------------------------------------------------------------- decode
    def _decode(self) -> None:
        """One token for every running row, in one model call on rows [0, k)."""
        k = len(self._rows)
        device = self.model.device
        tokens = torch.tensor([[s.next_token] for s in self._rows], device=device)
        positions = torch.tensor([[s.position] for s in self._rows], device=device)
        try:
            logits, _ = self.model(tokens, positions, self.state.head(k), logits="last")
        except Exception as e:
            log.exception("batched decode failed")
            jobs = {id(s.job): s.job for s in self._rows}
            self._rows = []
            for job in jobs.values():
                self._fail(job.handle, f"decode failed: {e}")
            return
        self._stats.decode_steps += 1
        for seq in self._rows:
            seq.position += 1
        try:
            ended = self._sample(self._rows, logits, lambda i: self.state.select([i]))
        except Exception as e:  # e.g. a NaN distribution: fails this step
            log.warning("sampling failed: %s", e)
            ended = [True] * k
            for job in {id(s.job): s.job for s in self._rows}.values():
                self._fail(job.handle, f"sampling failed: {e}")
        finished = {i for i, end in enumerate(ended) if end}
        done_jobs = {id(self._rows[i].job): self._rows[i].job for i in finished}
        if finished:
            self._remove_rows(finished)
        for job in done_jobs.values():
            if job.open_choices == 0:
                self._end(job.handle)
        self._rate.add(k)

    def _sample(
        self, seqs: list[_Sequence], logits: torch.Tensor, row_state: Callable[[int], State]
    ) -> list[bool]:
        """Samples the next token of every sequence from logits [len(seqs), V] in one call
        (each row with its own parameters and generator) and emits them; True where the
        choice ended. ``row_state(i)``: a copy of sequence i's state (for ``return_state``)."""
        want_lp = any(s.job.request.logprobs is not None for s in seqs)
        # structured output: one mask for the rows with a grammar, the others untouched
        constrained = [
            (i, s.stopper.grammar) for i, s in enumerate(seqs) if s.stopper.grammar is not None
        ]
        mask = token_mask(constrained, logits.shape[-1], logits.device)
        tokens, lps = Sampler.stack([s.sampler for s in seqs]).sample(
            logits, logprobs=want_lp, mask=mask
        )
        ids, lps = tokens.tolist(), (lps.tolist() if lps is not None else [None] * len(seqs))
        k = max((s.job.request.logprobs or 0) for s in seqs)
        tops = top_logprobs(torch.log_softmax(logits.float(), -1), k) if k else None
        ended = []
        for i, seq in enumerate(seqs):
            if seq.job.handle.finished:  # failed or cancelled meanwhile
                ended.append(True)
                continue
            want = seq.job.request.logprobs
            top = None if want is None else (tops[i][:want] if tops and want else [])
            lp = lps[i] if want is not None else None
            try:
                ended.append(
                    self._emit_token(seq, ids[i], lp, top, functools.partial(row_state, i))
                )
            except StructuredOutputError as e:  # its grammar alone: fails only its request
                self._fail(seq.job.handle, f"structured output failed: {e}")
                ended.append(True)
        return ended

    def _emit_token(
        self,
        seq: _Sequence,
        token: int,
        logprob: float | None,
        top: TopLogprobs | None,
        state: Callable[[], State],
    ) -> bool:
        """Sends a sampled token to its request; True if the choice ended with it (the last
        event carries ``state()`` when the request asked for it)."""
        seq.next_token = token
        self._stats.generated_tokens += 1
        text = seq.stopper.add(token)
        event = Event(
            TOKEN,
            index=seq.index,
            token_id=token,
            logprob=logprob,
            top_logprobs=top,
            text=text,
            finish_reason=seq.stopper.finish_reason,
            stop=seq.stopper.stop,
        )
        if event.finish_reason and seq.job.request.return_state:
            event.state = state()
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
            self.state.copy_(self.state.select(movers), rows=holes)
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
