"""What a client hands the engine and what it gets back: requests, events, handles.

handle = engine.submit(Request(prompt_ids=ids, max_tokens=32))
for event in handle:            # Events as they happen, on the client's thread
    ...
"""

from __future__ import annotations

import dataclasses
import itertools
import queue
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from rgemma.inference.batching import TopLogprobs
from rgemma.inference.sampling import SamplingError, SamplingParams
from rgemma.state import State

if TYPE_CHECKING:
    from rgemma.inference.structured import Grammar


class EngineError(RuntimeError):
    """The engine cannot take the request (stopped, or its queue is full)."""


class QueueFull(EngineError):
    """The waiting queue is at ``max_queue``: retry later (HTTP 503)."""


class RequestError(ValueError):
    """A request the engine cannot run (bad ids, n too large...)."""


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
    state: None, or a 1-row State to continue from (the engine takes it over:
      pass a copy); ``prompt_ids`` then follow the tokens it has seen, and the
      prefix cache is skipped (its keys are prompts from the start).
    return_state: hand the final state back on the last event: with
      ``max_tokens`` 0 the "prompt" event's ``state`` (after the prompt), else
      (n must be 1) the finishing "token" event's ``state``, which has seen the
      prompt and every generated token but the last (that one is ``token_id``).
    grammar: None, or a ``structured.Grammar`` compiled for the engine's tokenizer
      and vocabulary size (``structured.compile_grammar``): every choice's text
      follows it (JSON mode / JSON Schema) and ends ("stop") when it is complete.
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
    state: State | None = None
    return_state: bool = False
    grammar: Grammar | None = None


TOKEN, PROMPT, ERROR = "token", "prompt", "error"


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
    ``state``: a 1-row State, on the last event of a ``return_state`` request.
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
    state: State | None = None


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

    def __init__(
        self,
        request: Request,
        on_event: Callable[[Event | None], None] | None = None,
        wake: Callable[[], None] | None = None,
    ):
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
        except Exception:  # e.g. the consumer's event loop is closed: it is gone
            self.cancelled = True

    def _close(self) -> None:
        if not self.finished:
            self.finished = True
            self._emit(None)


def sampling_params(**kwargs) -> SamplingParams:
    """SamplingParams, with SamplingError turned into RequestError."""
    try:
        return SamplingParams(**kwargs)
    except SamplingError as e:
        raise RequestError(str(e)) from None
