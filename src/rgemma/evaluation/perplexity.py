"""Perplexity of raw text: token perplexity and bits per byte, streamed through the state.

    rgemma perplexity --model PATH notes.txt corpus/ held_out.jsonl [--json]

Each document is ``<bos> text`` (``<bos> text <eos>`` with ``--append-eos``,
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
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from typing import Callable, Iterable, Sequence

import torch

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


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets) under ``logits`` ([..., V] and [...]), in float32."""
    logits = logits.float()
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def right_padded(rows: Sequence[Sequence[int]], starts: Sequence[int], width: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, width] tokens and segment positions (start, start+1, ...; -1 after each row)."""
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    positions = torch.full((len(rows), width), -1, dtype=torch.long)
    for b, (ids, start) in enumerate(zip(rows, starts)):
        tokens[b, :len(ids)] = torch.as_tensor(list(ids), dtype=torch.long)
        positions[b, :len(ids)] = torch.arange(start, start + len(ids))
    return tokens.to(device), positions.to(device)


def _chunk(docs: Sequence[Sequence[int]], rows: Sequence[int], start: int, size: int,
           device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs, segment positions and targets [len(rows), <= size] of each row's document
    from token ``start`` on (right-padded; positions -1 on the padding)."""
    targets = [docs[i][start + 1:start + 1 + size] for i in rows]
    inputs = [docs[i][start:start + len(t)] for i, t in zip(rows, targets)]
    width = max(len(t) for t in targets)
    tokens, positions = right_padded(inputs, [start] * len(rows), width, device)
    target_ids, _ = right_padded(targets, [0] * len(rows), width, device)
    return tokens, positions, target_ids


@torch.no_grad()
def _stream_batch(model, docs: Sequence[Sequence[int]], rows: Sequence[int], chunk_size: int,
                  totals: list[float], on_chunk: ChunkCallback | None) -> None:
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


def sum_logprobs(model, docs: Sequence[Sequence[int]], *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 batch_size: int = 1, on_chunk: ChunkCallback | None = None) -> list[float]:
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
        _stream_batch(model, docs, order[first:first + batch_size], chunk_size, totals, on_chunk)
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
        return {"name": self.name, "tokens": self.tokens, "bytes": self.bytes, "nll": self.nll,
                "nll_per_token": self.nll_per_token, "perplexity": self.perplexity,
                "bits_per_byte": self.bits_per_byte}


@dataclasses.dataclass
class PerplexityResult:
    """Per-document scores and their total (token-weighted, not a mean of means)."""

    documents: list[DocumentScore]

    @property
    def total(self) -> DocumentScore:
        return DocumentScore("total", sum(d.tokens for d in self.documents),
                             sum(d.bytes for d in self.documents),
                             sum(d.nll for d in self.documents))

    def to_dict(self) -> dict:
        return {"total": self.total.to_dict(), "documents": [d.to_dict() for d in self.documents]}


def document_ids(tokenizer, text: str, append_eos: bool = False) -> list[int]:
    """``<bos> text`` (and ``<eos>`` when ``append_eos``) as token ids."""
    ids = tokenizer.encode(text, add_bos=True)
    return ids + [tokenizer.eos_id] if append_eos else ids


def score_texts(model, tokenizer, texts: Iterable[str | tuple[str, str]], *,
                append_eos: bool = False, chunk_size: int = DEFAULT_CHUNK_SIZE,
                batch_size: int = DEFAULT_BATCH_SIZE,
                on_bytes: Callable[[float], None] | None = None) -> PerplexityResult:
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
        sums = sum_logprobs(model, ids, chunk_size=chunk_size, batch_size=len(batch),
                            on_chunk=progress)
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


def _bytes_progress(ids: list[list[int]], nbytes: list[int],
                    on_bytes: Callable[[float], None]) -> ChunkCallback:
    """A chunk callback that reports tokens scored as the share of bytes they stand for."""
    def on_chunk(counts: dict[int, int]) -> None:
        on_bytes(sum(c * nbytes[i] / max(len(ids[i]) - 1, 1) for i, c in counts.items()))
    return on_chunk


# ====================================================================== CLI
def read_texts(paths: Sequence[str]) -> list[tuple[str, str]]:
    """(name, text) of every document in files / folders (``rgemma.data`` rules:
    one per text file, one per JSONL line with a ``"text"``)."""
    from rgemma.training import data
    docs, skipped = data.find_documents(paths)
    if skipped:
        print(f"rgemma perplexity: skipped {skipped} file(s) that are not UTF-8", file=sys.stderr)
    chats = [d.name for d in docs if d.text is None]
    if chats:
        print(f"rgemma perplexity: skipped {len(chats)} chat document(s) (no 'text'), "
              f"e.g. {chats[0]}", file=sys.stderr)
    return [(d.name, d.text) for d in docs if d.text is not None]


def register(subparsers) -> None:
    """Adds the ``perplexity`` verb."""
    from rgemma.inference.generate import add_model_args
    p = subparsers.add_parser(
        "perplexity", help="token perplexity and bits per byte of text files",
        description="Scores raw text: each file (or JSONL line with a 'text') is one "
                    "document, streamed through the model's state in fixed-size chunks, so "
                    "documents of any length take constant model memory.")
    p.add_argument("files", nargs="+", metavar="FILE",
                   help="text files, JSONL files ({'text': ...} per line) or folders")
    add_model_args(p)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE,
                   help=f"tokens per model call (default {DEFAULT_CHUNK_SIZE})")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help=f"documents scored side by side (default {DEFAULT_BATCH_SIZE})")
    p.add_argument("--append-eos", action="store_true",
                   help="also score an <eos> after each document (as in training)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--output", "-o", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--per-document", action="store_true", help="print one line per document")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    """``rgemma perplexity``."""
    from rgemma.training.data import DataError
    from rgemma.inference.generate import CLIError, load_model, report_error
    try:
        if args.chunk_size < 1 or args.batch_size < 1:
            raise CLIError("--chunk-size and --batch-size must be >= 1", 2)
        try:
            texts = read_texts(args.files)
        except (DataError, OSError) as e:
            raise CLIError(str(e), 2) from None
        if not texts:
            raise CLIError("no text documents found in " + ", ".join(args.files), 2)
        model, tokenizer = load_model(args)
    except CLIError as e:
        return report_error("perplexity", e)
    result = _score_with_progress(model, tokenizer, texts, args)
    report = {"model": args.model or "demo", "append_eos": args.append_eos, **result.to_dict()}
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_result(result, per_document=args.per_document)
    return 0


def _score_with_progress(model, tokenizer, texts: list[tuple[str, str]], args) -> PerplexityResult:
    """``score_texts`` with a tqdm bar in bytes of text (on stderr)."""
    from tqdm.auto import tqdm
    total = sum(len(t.encode("utf-8")) for _, t in texts)
    with tqdm(total=total, unit="B", unit_scale=True, desc="perplexity",
              disable=args.no_progress, file=sys.stderr) as bar:
        return score_texts(model, tokenizer, texts, append_eos=args.append_eos,
                           chunk_size=args.chunk_size, batch_size=args.batch_size,
                           on_bytes=bar.update)


def print_result(result: PerplexityResult, per_document: bool = False, file=sys.stdout) -> None:
    """A human-readable summary (and one line per document if asked)."""
    if per_document:
        for d in result.documents:
            print(f"{d.name}\t{d.tokens} tokens\tppl {d.perplexity:.4f}\t"
                  f"bpb {d.bits_per_byte:.4f}", file=file)
    t = result.total
    print(f"documents:        {len(result.documents)}", file=file)
    print(f"tokens scored:    {t.tokens}", file=file)
    print(f"bytes:            {t.bytes}", file=file)
    print(f"nll per token:    {t.nll_per_token:.4f} nats", file=file)
    print(f"token perplexity: {t.perplexity:.4f}", file=file)
    print(f"bits per byte:    {t.bits_per_byte:.4f}", file=file)
