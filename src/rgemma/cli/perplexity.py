"""``rgemma perplexity FILE...``: token perplexity and bits per byte of text files.

    rgemma perplexity --model PATH notes.txt corpus/ held_out.jsonl [--json]

The scoring is ``rgemma.evaluation.perplexity``: each document streams
through the model's state in fixed-size chunks.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from rgemma.cli.common import CLIError, add_model_args, load_model, report_error
from rgemma.io.documents import DataError, find_documents

# rgemma.evaluation.perplexity's DEFAULT_CHUNK_SIZE / DEFAULT_BATCH_SIZE, spelled out here
# because --help imports no torch
DEFAULT_CHUNK_SIZE = 512
DEFAULT_BATCH_SIZE = 8


def read_texts(paths: Sequence[str]) -> list[tuple[str, str]]:
    """(name, text) of every document in files / folders (``rgemma.io.documents``:
    one per text file, one per JSONL line with a ``"text"``)."""
    docs, skipped = find_documents(paths)
    if skipped:
        print(f"rgemma perplexity: skipped {skipped} file(s) that are not UTF-8", file=sys.stderr)
    chats = [d.name for d in docs if d.text is None]
    if chats:
        print(
            f"rgemma perplexity: skipped {len(chats)} chat document(s) (no 'text'), "
            f"e.g. {chats[0]}",
            file=sys.stderr,
        )
    return [(d.name, d.text) for d in docs if d.text is not None]


def register(subparsers) -> None:
    """Adds the ``perplexity`` verb."""
    # a table of flags, one call each with its continuation lines aligned
    # fmt: off
    p = subparsers.add_parser(
        "perplexity", help="token perplexity and bits per byte of text files",
        description="Scores raw text: each file (or JSONL line with a 'text') is one "
                    "document, streamed through the model's state in fixed-size chunks, so "
                    "documents of any length take constant model memory.")
    p.add_argument("files", nargs="+", metavar="FILE",
                   help="text files, JSONL files ({'text': ...} per line) or folders")
    add_model_args(p)
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
    # fmt: on
    p.set_defaults(func=run)


def run(args) -> int:
    """``rgemma perplexity``: returns the exit status."""
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


def _score_with_progress(model, tokenizer, texts: list[tuple[str, str]], args):
    """``score_texts`` with a tqdm bar in bytes of text (on stderr)."""
    from tqdm.auto import tqdm

    from rgemma.evaluation.perplexity import score_texts

    total = sum(len(t.encode("utf-8")) for _, t in texts)
    with tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc="perplexity",
        disable=args.no_progress,
        file=sys.stderr,
    ) as bar:
        return score_texts(
            model,
            tokenizer,
            texts,
            append_eos=args.append_eos,
            chunk_size=args.chunk_size,
            batch_size=args.batch_size,
            on_bytes=bar.update,
        )


def print_result(result, per_document: bool = False, file=None) -> None:
    """A human-readable summary of a ``PerplexityResult`` (and one line per document if
    asked), on ``file`` (default stdout)."""
    file = file or sys.stdout
    if per_document:
        for d in result.documents:
            print(
                f"{d.name}\t{d.tokens} tokens\tppl {d.perplexity:.4f}\tbpb {d.bits_per_byte:.4f}",
                file=file,
            )
    t = result.total
    print(f"documents:        {len(result.documents)}", file=file)
    print(f"tokens scored:    {t.tokens}", file=file)
    print(f"bytes:            {t.bytes}", file=file)
    print(f"nll per token:    {t.nll_per_token:.4f} nats", file=file)
    print(f"token perplexity: {t.perplexity:.4f}", file=file)
    print(f"bits per byte:    {t.bits_per_byte:.4f}", file=file)
