"""Perplexity of raw text: token perplexity and bits per byte, streamed through the state.

Each document is ``<bos> text`` (``<bos> text <eos>`` with ``append_eos``,
as the training data is encoded). Every token after ``<bos>`` is scored,
conditioned on everything before it in the document: the tokens are fed
through the model in chunks of ``chunk_size`` on top of the recurrent
state, which carries the whole past at a fixed size. A document of any
length costs the same model memory (the state plus one chunk of logits);
there is no sliding window and no re-encoding of overlapping windows.

Reported per document and in total:

* ``nll``: the sum of -log p(token) in nats over the scored tokens;
* ``nll_per_token`` and ``perplexity`` = exp(nll_per_token);
* ``bits_per_byte`` = nll / ln 2 / (UTF-8 bytes of the text), comparable
  across tokenizers (lm-eval's ``bits_per_byte``).

Library use::

    from rgemma.evaluation.perplexity import score_texts
    result = score_texts(model, tokenizer, ["some text", "more text"])
    result.total.perplexity, result.total.bits_per_byte

and ``rgemma perplexity FILE...`` (``rgemma.cli.perplexity``) on files.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence

import torch

from rgemma.inference.batching import pad_batch, target_logprobs

DEFAULT_CHUNK_SIZE = 512
DEFAULT_BATCH_SIZE = 8
# At most this many logits per model call (512 MiB in float32): with Gemma's
# 256k vocabulary, 8 rows x 512 tokens of logits would be 4 GiB.
LOGITS_BUDGET = 1 << 27

# on_chunk({document index: tokens scored by the model call just run})
ChunkCallback = Callable[[dict[int, int]], None]


# =========================================================== token log-probs
def tokens_per_call(rows: int, vocab_size: int, wanted: int) -> int:
    """``wanted`` tokens per row, fewer if rows x tokens x vocab would pass LOGITS_BUDGET."""
    return max(1, min(wanted, LOGITS_BUDGET // max(1, rows * vocab_size)))


def _chunk(
    docs: Sequence[Sequence[int]], rows: Sequence[int], start: int, size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs, segment positions and targets [len(rows), <= size] of each row's document
    from token ``start`` on (right-padded; positions -1 on the padding)."""
    targets = [docs[i][start + 1 : start + 1 + size] for i in rows]
    inputs = [docs[i][start : start + len(t)] for i, t in zip(rows, targets)]
    tokens, positions = pad_batch(inputs, [start] * len(rows), side="right", device=device)
    target_ids, _ = pad_batch(targets, [0] * len(rows), side="right", device=device)
    return tokens, positions, target_ids


@torch.no_grad()
def _stream_batch(
    model,
    docs: Sequence[Sequence[int]],
    rows: Sequence[int],
    chunk_size: int,
    totals: list[float],
    on_chunk: ChunkCallback | None,
) -> None:
    """Adds to ``totals[i]`` the sum of log p(docs[i][t] | docs[i][:t]), t >= 1, for i in rows.

    The rows run side by side, chunk by chunk, on one state; a document that
    is done is dropped from the batch (and the state) before the next chunk.
    Chunks shrink when their logits would pass LOGITS_BUDGET.
    """
    rows = [i for i in rows if len(docs[i]) > 1]
    state = model.init_state(len(rows)) if rows else None
    start = 0
    while rows:
        size = tokens_per_call(len(rows), model.config.vocab_size, chunk_size)
        tokens, positions, targets = _chunk(docs, rows, start, size, model.device)
        logits, state = model(tokens, positions, state, logits="all")
        real = positions >= 0
        scored = target_logprobs(logits, targets).masked_fill(~real, 0.0).double().sum(dim=1)
        for i, value in zip(rows, scored.tolist()):
            totals[i] += value
        if on_chunk is not None:
            on_chunk(dict(zip(rows, real.sum(dim=1).tolist())))
        start += size
        keep = [r for r, i in enumerate(rows) if len(docs[i]) - 1 > start]
        if len(keep) < len(rows):
            rows = [rows[r] for r in keep]
            state = state.select(keep) if keep else None


def sum_logprobs(
    model,
    docs: Sequence[Sequence[int]],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    batch_size: int = 1,
    on_chunk: ChunkCallback | None = None,
) -> list[float]:
    """For each token list, the sum of log p(token | all tokens before it), first excluded.

    The documents are streamed through the model ``chunk_size`` tokens at a
    time, ``batch_size`` documents side by side (longest first, so that
    documents of similar lengths share a batch). ``on_chunk`` receives, after
    every model call, ``{document index: tokens scored}``. Returns the sums in
    the order of ``docs``.
    """
    if chunk_size < 1 or batch_size < 1:
        raise ValueError("chunk_size and batch_size must be >= 1")
    order = sorted(range(len(docs)), key=lambda i: -len(docs[i]))
    totals = [0.0] * len(docs)
    for first in range(0, len(order), batch_size):
        _stream_batch(model, docs, order[first : first + batch_size], chunk_size, totals, on_chunk)
    return totals


# ================================================================== reports
@dataclasses.dataclass
class DocumentScore:
    """Scores of one document (or the total of several).

    tokens: tokens scored (all but the leading ``<bos>``); bytes: UTF-8 bytes
    of the text; nll: sum of -log p over the scored tokens, in nats.
    """

    name: str
    tokens: int
    bytes: int
    nll: float

    @property
    def nll_per_token(self) -> float:
        return self.nll / self.tokens if self.tokens else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_per_token) if self.tokens else float("nan")

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / self.bytes if self.bytes else float("nan")

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "tokens": self.tokens,
            "bytes": self.bytes,
            "nll": self.nll,
            "nll_per_token": self.nll_per_token,
            "perplexity": self.perplexity,
            "bits_per_byte": self.bits_per_byte,
        }


@dataclasses.dataclass
class PerplexityResult:
    """Per-document scores and their total (token-weighted, not a mean of means)."""

    documents: list[DocumentScore]

    @property
    def total(self) -> DocumentScore:
        return DocumentScore(
            "total",
            sum(d.tokens for d in self.documents),
            sum(d.bytes for d in self.documents),
            sum(d.nll for d in self.documents),
        )

    def to_dict(self) -> dict:
        return {"total": self.total.to_dict(), "documents": [d.to_dict() for d in self.documents]}


def document_ids(tokenizer, text: str, append_eos: bool = False) -> list[int]:
    """``<bos> text`` (and ``<eos>`` when ``append_eos``) as token ids."""
    ids = tokenizer.encode(text, add_bos=True)
    return ids + [tokenizer.eos_id] if append_eos else ids


def score_texts(
    model,
    tokenizer,
    texts: Iterable[str | tuple[str, str]],
    *,
    append_eos: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_bytes: Callable[[float], None] | None = None,
) -> PerplexityResult:
    """Perplexity and bits per byte of texts (strings, or (name, text) pairs).

    Documents are tokenized ``batch_size`` at a time, so only one batch of
    token ids is held at once. ``on_bytes(n)`` reports progress in bytes of
    text (fractions of a document as its chunks are scored).
    """
    scores: list[DocumentScore] = []
    batch: list[tuple[str, str]] = []

    def flush() -> None:
        ids = [document_ids(tokenizer, text, append_eos) for _, text in batch]
        nbytes = [len(text.encode("utf-8")) for _, text in batch]
        progress = _bytes_progress(ids, nbytes, on_bytes) if on_bytes else None
        sums = sum_logprobs(
            model, ids, chunk_size=chunk_size, batch_size=len(batch), on_chunk=progress
        )
        for (name, _), doc, n, s in zip(batch, ids, nbytes, sums):
            scores.append(DocumentScore(name, max(len(doc) - 1, 0), n, -s))
        batch.clear()

    for k, item in enumerate(texts):
        batch.append(item if isinstance(item, tuple) else (f"text[{k}]", item))
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return PerplexityResult(scores)


def _bytes_progress(
    ids: list[list[int]], nbytes: list[int], on_bytes: Callable[[float], None]
) -> ChunkCallback:
    """A chunk callback that reports tokens scored as the share of bytes they stand for."""

    def on_chunk(counts: dict[int, int]) -> None:
        on_bytes(sum(c * nbytes[i] / max(len(ids[i]) - 1, 1) for i, c in counts.items()))

    return on_chunk
