"""Batched generation with streaming, stop strings and resumable state.

    completions = generate(model, tokenizer, ["Hello", "Once upon a time"],
                           max_new_tokens=64, temperature=0.7, top_p=0.9, seed=0)
    for delta in stream(model, tokenizer, ["Hello"], max_new_tokens=64):
        print(delta.text, end="", flush=True)

How a batch runs:

1. Prefill: the prompts (of any lengths) are left-padded with segment
   position -1 and run in ONE model call with ``logits="last"`` on top of the
   state (a fresh one, or the caller's).
2. Decode: one token per row per step, ``[B, 1]`` tokens into the same state,
   updated in place. A finished row is fed a pad (position -1) from then on,
   which leaves its state untouched; the batch keeps its shape (static shapes
   for ``torch.compile``), at the cost of computing finished rows.
3. Each row has its own sampling parameters and generator, so a row gives
   exactly the tokens it gives alone.

Nothing grows with the number of generated tokens on the device: token ids,
text pieces and logprobs are kept in Python lists.

State semantics ("the last token is pending"): when a row finishes, its
state has consumed the prompt and every generated token but the LAST one
(whose logits were never needed). ``Completion.pending_ids`` holds that
token; feed it first to continue, e.g.
``generate(model, tok, [c.pending_ids + more_ids], state=c.state, rng_states=[c.rng_state])``
continues exactly as an uninterrupted run would (``continue_from`` does that).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence

import torch

from rgemma.inference.batching import pad_batch
from rgemma.inference.sampling import Sampler, SamplingError, SamplingParams
from rgemma.inference.stopping import StopChecker
from rgemma.inference.structured import (
    Grammar,
    GrammarSpec,
    StructuredOutputError,
    compile_grammar,
    token_mask,
)
from rgemma.state import State


class GenerationError(ValueError):
    """Inputs that generation cannot run with (empty prompt, bad state...)."""


@dataclasses.dataclass
class GenerationStats:
    """Timings of one ``generate`` / ``stream`` call (shared by its rows)."""

    batch_size: int = 0
    prompt_tokens: int = 0  # real prompt tokens prefilled, all rows
    prompt_seconds: float = 0.0
    generated_tokens: int = 0  # tokens sampled, all rows
    decode_steps: int = 0  # batched model calls after the prefill
    decode_seconds: float = 0.0  # compile time excluded
    compile_seconds: float = 0.0  # the first compiled decode step (torch.compile at work)
    state_nbytes: int = 0  # bytes of the whole batch's state

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        return self.generated_tokens / self.decode_seconds if self.decode_seconds else 0.0


@dataclasses.dataclass
class Completion:
    """The result for one prompt.

    text: generated text, stop string (and stop token) excluded.
    token_ids: every token sampled, stop token included.
    finish_reason: "stop" (stop token or string), "length", or "interrupted".
    prompt_ids: the tokens fed for this row's prompt.
    logprobs: per token of ``token_ids``, log-softmax of the RAW model logits
      at that token (None unless requested).
    state: a 1-row State holding prompt + token_ids[:-1] (see the module doc).
    rng_state: the row's generator state after its last draw (None for greedy):
      pass it back as ``rng_states`` to continue a seeded run exactly.
    stop: the stop string or stop token id that ended the row, if any.
    """

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_ids: list[int]
    logprobs: list[float] | None = None
    state: State | None = None
    rng_state: torch.Tensor | None = None
    stop: str | int | None = None
    stats: GenerationStats | None = None

    @property
    def pending_ids(self) -> list[int]:
        """The generated token not yet fed to ``state`` (feed it first to continue)."""
        return self.token_ids[-1:]


@dataclasses.dataclass
class Delta:
    """A streamed piece of one row's output.

    index: the row (prompt) index.
    text: new text (whole characters only; may be "").
    token_ids: the token(s) sampled since the row's previous delta.
    logprobs: their raw-model logprobs (when requested).
    finish_reason: set on the row's last delta, with ``completion``.
    """

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[float] | None = None
    finish_reason: str | None = None
    completion: Completion | None = None


# ================================================================ model calls
def prefill(model, prompt_ids: Sequence[Sequence[int]], state: State) -> torch.Tensor:
    """Runs every row's prompt on top of ``state`` in ONE call; returns logits [B, V].

    Rows are left-padded to the longest prompt (``pad_batch``). Segment
    positions continue from the state: a row that has seen n tokens since its
    document start gets positions n, n+1, ...
    """
    starts = (state.num_tokens - state.doc_start).tolist()
    tokens, positions = pad_batch(prompt_ids, starts, side="left", device=model.device)
    logits, _ = model(tokens, positions, state, logits="last")
    return logits


def decode_step(model, tokens: torch.Tensor, positions: torch.Tensor, state: State) -> torch.Tensor:
    """tokens, positions [B, 1] -> logits [B, V]; ``state`` updated in place."""
    logits, _ = model(tokens, positions, state, logits="last")
    return logits


def _make_step(model, compile: bool) -> Callable:
    """The decode step; with ``compile`` the model's step function is captured by
    torch.compile (``Griffin.compile_step``), and on CUDA recorded as CUDA graphs
    (``Griffin.capture_step``)."""
    if compile and model._compiled_step is None:
        model.compile_step()
        if model.device.type == "cuda":
            model.capture_step()
    return lambda tokens, positions, state: decode_step(model, tokens, positions, state)


# ================================================================ the engine
def _per_row(value, B: int, name: str) -> list:
    """A scalar broadcast to B rows, or a sequence of exactly B values."""
    if isinstance(value, (list, tuple)):
        if len(value) != B:
            raise GenerationError(f"{name}: got {len(value)} values for {B} prompts")
        return list(value)
    return [value] * B


def _encode_prompts(tokenizer, prompts, add_bos: bool) -> list[list[int]]:
    if isinstance(prompts, str) or (
        isinstance(prompts, (list, tuple)) and prompts and all(isinstance(t, int) for t in prompts)
    ):
        prompts = [prompts]  # one prompt: a string or a list of ids
    if not prompts:
        raise GenerationError("no prompts given")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            ids = tokenizer.encode(p, add_bos=add_bos)
        else:
            ids = [int(t) for t in p]
        if not ids:
            raise GenerationError(f"prompt {i} is empty: each row needs at least one token")
        out.append(ids)
    return out


def _row_grammars(grammar, B: int, tokenizer, vocab_size: int) -> list[Grammar | None]:
    """``grammar`` (None, a Grammar or GrammarSpec, or one of those per row) compiled for
    the tokenizer and the model's vocabulary, one per row."""
    out = []
    for i, g in enumerate(_per_row(grammar, B, "grammar")):
        if isinstance(g, GrammarSpec):
            try:
                g = compile_grammar(g, tokenizer, vocab_size)
            except StructuredOutputError as e:
                raise GenerationError(f"grammar of prompt {i}: {e}") from None
        elif g is not None and (not isinstance(g, Grammar) or g.vocab_size != vocab_size):
            raise GenerationError(
                f"grammar of prompt {i}: expected a GrammarSpec, or a Grammar compiled for "
                f"the model's {vocab_size} token ids"
            )
        out.append(g)
    return out


def _row_seeds(seed, B: int) -> list[int | None]:
    """seed int -> row b uses seed + b; a sequence gives each row's seed; None = random."""
    if seed is None or isinstance(seed, int):
        return [None if seed is None else seed + b for b in range(B)]
    return _per_row(list(seed), B, "seed")


class _Row:
    """Book-keeping of one row: ids, text pieces and logprobs; ``stopper`` decides its end."""

    def __init__(self, index: int, prompt_ids: list[int], stopper: StopChecker, logprobs: bool):
        self.index = index
        self.prompt_ids = prompt_ids
        self.ids: list[int] = []
        self.text_parts: list[str] = []
        self.logprobs: list[float] | None = [] if logprobs else None
        self.stopper = stopper
        self.reported = 0  # ids already sent in a Delta

    @property
    def finish_reason(self) -> str | None:
        return self.stopper.finish_reason

    def add(self, token: int, logprob: float | None) -> str:
        """Records a sampled token; returns its new text; may finish the row."""
        self.ids.append(token)
        if self.logprobs is not None:
            self.logprobs.append(logprob)
        return self._keep(self.stopper.add(token))

    def interrupt(self) -> str:
        return self._keep(self.stopper.interrupt())

    def _keep(self, text: str) -> str:
        if text:
            self.text_parts.append(text)
        return text


def stream(
    model,
    tokenizer,
    prompts,
    *,
    max_new_tokens: int = 256,
    temperature=0.0,
    top_k=0,
    top_p=1.0,
    min_p=0.0,
    repetition_penalty=1.0,
    seed=None,
    stop_token_ids: Sequence[int] | None = None,
    stop_strings: Sequence[str] = (),
    logprobs: bool = False,
    state: State | None = None,
    rng_states: Sequence[torch.Tensor | None] | None = None,
    context_ids: Sequence[Sequence[int]] | None = None,
    add_bos: bool | None = None,
    compile: bool = False,
    should_stop: Callable[[], bool] | None = None,
    grammar: Grammar | GrammarSpec | Sequence[Grammar | GrammarSpec | None] | None = None,
) -> Iterator[Delta]:
    """Generates for a batch of prompts, yielding text deltas as they are decoded.

    Args:
      prompts: a string, or a list of strings and/or lists of token ids.
      max_new_tokens: tokens to generate at most per row (no upper bound).
      temperature, top_k, top_p, min_p, repetition_penalty: a value for all
        rows or a list with one per row (see ``rgemma.sampling``).
      seed: int (row b uses seed + b), a list of per-row seeds, or None.
      stop_token_ids: ids that end a row (default: the tokenizer's stop ids,
        i.e. eos and <end_of_turn>); [] disables them.
      stop_strings: strings that end a row; they are cut from the text and
        never streamed, even when they span several tokens.
      logprobs: also report the raw-model logprob of each generated token.
      state: a State of B rows (or 1 row, expanded to B) to continue from,
        updated in place (pass ``state.clone()`` to keep yours); None = new.
      rng_states: per-row generator states to resume (overrides ``seed``).
      context_ids: per row, the ids already in ``state`` (for the repetition
        penalty only).
      add_bos: prepend BOS to string prompts (default: when ``state`` is None).
      compile: torch.compile the model's decode step (slow first steps while it
        compiles; then several times less per-token overhead on small models).
      should_stop: polled after every step; True ends all rows ("interrupted").
      grammar: structured output (``rgemma.inference.structured``): a GrammarSpec
        (e.g. ``json_schema_spec(schema)``, compiled here) or a compiled Grammar, for
        all rows or a list with one (or None) per row. A row's text then follows it
        and the row ends ("stop") once the text is complete.
    Yields:
      Delta per row per step with new text or tokens; each row's last Delta has
      ``finish_reason`` and ``completion``.
    """
    if add_bos is None:
        add_bos = state is None
    prompt_ids = _encode_prompts(tokenizer, prompts, add_bos)
    B = len(prompt_ids)
    if (
        not isinstance(max_new_tokens, int)
        or isinstance(max_new_tokens, bool)
        or max_new_tokens < 1
    ):
        raise GenerationError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    try:
        params = [
            SamplingParams(*p)
            for p in zip(
                _per_row(temperature, B, "temperature"),
                _per_row(top_k, B, "top_k"),
                _per_row(top_p, B, "top_p"),
                _per_row(min_p, B, "min_p"),
                _per_row(repetition_penalty, B, "repetition_penalty"),
            )
        ]
    except SamplingError as e:
        raise GenerationError(str(e)) from None
    vocab = model.config.vocab_size
    for i, ids in enumerate(prompt_ids):
        if min(ids) < 0 or max(ids) >= vocab:
            raise GenerationError(f"prompt {i}: token ids must be in [0, {vocab})")
    if state is None:
        state = model.init_state(B)
    elif state.batch_size == 1 and B > 1:
        state = state.expand(B)
    elif state.batch_size != B:
        raise GenerationError(f"state has {state.batch_size} rows for {B} prompts")
    stop_ids = frozenset(
        tokenizer.stop_ids if stop_token_ids is None else (int(t) for t in stop_token_ids)
    )
    if isinstance(stop_strings, str):
        stop_strings = [stop_strings]
    history = [list(c) + p for c, p in zip(context_ids or [[]] * B, prompt_ids)]
    grammars = _row_grammars(grammar, B, tokenizer, vocab)
    sampler = Sampler(
        params,
        vocab,
        model.device,
        seeds=_row_seeds(seed, B),
        rng_states=rng_states,
        history=history,
    )
    rows = [
        _Row(
            b,
            prompt_ids[b],
            StopChecker(
                tokenizer,
                stop_ids,
                stop_strings,
                max_new_tokens,
                grammar=None if grammars[b] is None else grammars[b].matcher(),
            ),
            logprobs,
        )
        for b in range(B)
    ]
    return _run(
        model,
        state,
        sampler,
        rows,
        logprobs,
        _make_step(model, compile),
        should_stop,
        compiling=compile,
    )


def _run(
    model,
    state: State,
    sampler: Sampler,
    rows: list[_Row],
    want_logprobs: bool,
    step: Callable,
    should_stop: Callable[[], bool] | None,
    compiling: bool = False,
) -> Iterator[Delta]:
    """The prefill + decode loop behind ``stream``.

    Model calls run under ``torch.inference_mode`` one at a time (never across
    a ``yield``, so the caller's code between deltas keeps its own grad mode).
    """
    B, device = len(rows), model.device
    stats = GenerationStats(
        batch_size=B, prompt_tokens=sum(len(r.prompt_ids) for r in rows), state_nbytes=state.nbytes
    )
    t0 = time.perf_counter()
    with torch.inference_mode():
        logits = prefill(model, [r.prompt_ids for r in rows], state)
    _sync(device)
    t1 = time.perf_counter()
    stats.prompt_seconds = t1 - t0
    # Buffers reused by every decode step: tokens, positions, the active mask.
    tokens_in = torch.zeros(B, 1, dtype=torch.long, device=device)
    positions_in = torch.zeros(B, 1, dtype=torch.long, device=device)
    next_pos = (state.num_tokens - state.doc_start)[:, None].clone()
    active = [True] * B
    inactive_mask = torch.zeros(B, 1, dtype=torch.bool, device=device)
    while True:
        # structured output: masks for the active rows that follow a grammar
        matchers = [(b, r.stopper.grammar) for b, r in enumerate(rows) if active[b]]
        mask = token_mask([(b, m) for b, m in matchers if m is not None], logits.shape[-1], device)
        with torch.inference_mode():
            tokens, lps = sampler.sample(logits, active, logprobs=want_logprobs, mask=mask)
        ids = tokens.tolist()
        lp = lps.tolist() if lps is not None else [None] * B
        stop_now = should_stop is not None and should_stop()
        finished = []
        for b, row in enumerate(rows):
            if not active[b]:
                continue
            stats.generated_tokens += 1
            text = row.add(ids[b], lp[b])
            if row.finish_reason is None and stop_now:
                text += row.interrupt()
            if row.finish_reason is not None:
                active[b] = False
                finished.append(b)
                stats.decode_seconds = time.perf_counter() - t1 - stats.compile_seconds
                yield _final_delta(row, text, state, sampler, stats, B)
            elif text or want_logprobs:
                yield _delta(row, text)
        if not any(active):
            break
        if finished:
            inactive_mask[finished] = True
        first_compiled = compiling and stats.decode_steps == 0
        started = time.perf_counter()
        with torch.inference_mode():
            tokens_in.copy_(tokens[:, None])
            positions_in.copy_(next_pos).masked_fill_(inactive_mask, -1)
            logits = step(tokens_in, positions_in, state)
            next_pos += ~inactive_mask
        if first_compiled:  # the compiler's time is not decoding speed
            _sync(device)
            stats.compile_seconds = time.perf_counter() - started
        stats.decode_steps += 1
    stats.decode_seconds = time.perf_counter() - t1 - stats.compile_seconds


def _final_delta(
    row: _Row, text: str, state: State, sampler: Sampler, stats: GenerationStats, B: int
) -> Delta:
    completion = Completion(
        text="".join(row.text_parts),
        token_ids=row.ids,
        finish_reason=row.finish_reason,
        prompt_ids=row.prompt_ids,
        logprobs=row.logprobs,
        state=state if B == 1 else state.select([row.index]),
        rng_state=sampler.rng_state(row.index),
        stop=row.stopper.stop,
        stats=stats,
    )
    return _delta(row, text, completion)


def _delta(row: _Row, text: str, completion: Completion | None = None) -> Delta:
    """A Delta with the row's tokens (and logprobs) not yet reported."""
    start, row.reported = row.reported, len(row.ids)
    return Delta(
        row.index,
        text,
        row.ids[start:],
        None if row.logprobs is None else row.logprobs[start:],
        row.finish_reason,
        completion,
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate(model, tokenizer, prompts, **kwargs) -> list[Completion]:
    """One Completion per prompt, in order (keyword arguments as for ``stream``).

    Example::

        [c] = generate(model, tok, ["Once upon a time"], max_new_tokens=50,
                       temperature=0.8, top_p=0.95, seed=0)
        c.text, c.token_ids, c.finish_reason, c.state
    """
    out: dict[int, Completion] = {}
    for delta in stream(model, tokenizer, prompts, **kwargs):
        if delta.completion is not None:
            out[delta.index] = delta.completion
    return [out[i] for i in range(len(out))]


def continue_from(
    model, tokenizer, completion: Completion, more_ids: Sequence[int] = (), **kwargs
) -> list[Completion]:
    """Continues a finished 1-row Completion (its pending token, then ``more_ids``).

    Uses ``completion.state`` in place and resumes its generator, so greedy and
    seeded runs continue exactly as if never stopped.
    """
    kwargs.setdefault("rng_states", [completion.rng_state])
    kwargs.setdefault("context_ids", [completion.prompt_ids + completion.token_ids[:-1]])
    return generate(
        model,
        tokenizer,
        [completion.pending_ids + list(more_ids)],
        state=completion.state,
        **kwargs,
    )
