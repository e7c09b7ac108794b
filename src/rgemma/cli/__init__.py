"""`rgemma` command line: one verb per module.

Each verb module exposes ``register(subparsers)``, which adds its subparser
and sets ``func`` to a ``run(args) -> int``. Heavy imports stay inside ``run``, so
``rgemma --help`` starts without importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# verb -> module that implements it
VERBS = {
    "generate": "rgemma.cli.generate",
    "chat": "rgemma.cli.chat",
    "convert": "rgemma.cli.convert",
    "train": "rgemma.cli.train",
    "quantize": "rgemma.cli.quantize",
    "serve": "rgemma.cli.serve",
    "eval": "rgemma.cli.evaluate",
    "perplexity": "rgemma.cli.perplexity",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rgemma",
        description="RecurrentGemma (Griffin) in PyTorch: generate, chat, convert, train.",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for module_name in VERBS.values():  # each imports nothing heavy until it runs
        importlib.import_module(module_name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
