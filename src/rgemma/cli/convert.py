"""``rgemma convert SRC DST``: between Hugging Face, official PyTorch and Orbax checkpoints.

Tensors stream from SRC to DST one shard at a time; no model is built.
"""

from __future__ import annotations

import argparse
import sys

from rgemma.cli.common import CLIError, add_threads_arg, report_error, set_threads
from rgemma.dtypes import DTYPE_NAMES

DESCRIPTION = """\
Convert a RecurrentGemma checkpoint.

SRC may be a Hugging Face directory (config.json + safetensors), an official
PyTorch state dict file (.pt/.pth/.ckpt) or an official Flax/Orbax checkpoint
directory (needs: pip install 'rgemma[jax]'). DST is written atomically: a
Hugging Face directory that transformers opens, or an official .pt file.
"""

EPILOG = """\
examples:
  rgemma convert recurrentgemma-2b.pt out/rg2b --dtype bfloat16
  rgemma convert kaggle/2b-it/ out/rg2b-it --preset recurrentgemma-2b-it
  rgemma convert out/rg2b back.pt
"""


def register(subparsers) -> argparse.ArgumentParser:
    """Adds the ``convert`` verb to ``rgemma``'s subparsers."""
    p = subparsers.add_parser(
        "convert",
        help="convert a checkpoint between HF, official PyTorch and Orbax layouts",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", metavar="SRC", help="checkpoint to read (HF dir, .pt file, Orbax dir)")
    p.add_argument(
        "dst",
        metavar="DST",
        help="where to write; a name ending in "
        ".pt/.pth/.ckpt gives an official file, else a HF dir",
    )
    p.add_argument(
        "--to",
        choices=("hf", "official"),
        default=None,
        help="output layout (default: from DST's name)",
    )
    p.add_argument(
        "--dtype",
        choices=DTYPE_NAMES,
        default=None,
        help="dtype of the written tensors (default: keep the source's)",
    )
    p.add_argument(
        "--shard-size",
        default="5GB",
        metavar="SIZE",
        help="largest safetensors shard of a HF output, e.g. 5GB, 500MB (default: %(default)s)",
    )
    p.add_argument(
        "--preset",
        default=None,
        metavar="NAME",
        help="for official / Orbax sources: the preset giving the attention window, "
        "logits soft-cap and embedding scaling, which are not in the weights "
        "(recurrentgemma-2b, recurrentgemma-9b, griffin-7b, hawk-7b; -it "
        "variants too); default: inferred (RecurrentGemma values)",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        metavar="DIR",
        help="copy the tokenizer files from DIR into a Hugging Face DST (default: "
        "those beside SRC; official .pt files usually have none)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    add_threads_arg(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Runs the conversion; returns 0, or 2 after a one-line error on stderr."""
    from rgemma.io import checkpoint

    try:
        set_threads(args)
        out = checkpoint.convert(
            args.src,
            args.dst,
            to=args.to,
            dtype=args.dtype,
            shard_size=args.shard_size,
            preset=args.preset,
            overwrite=args.overwrite,
            tokenizer_dir=args.tokenizer,
        )
    except (ValueError, OSError, CLIError) as e:  # CheckpointError, WeightsError, I/O
        return report_error("convert", e, 2)
    print(f"wrote {out}")
    if (
        out.is_dir()
        and not (out / "tokenizer.model").exists()
        and not (out / "tokenizer.json").exists()
    ):
        print(
            f"rgemma convert: note: {out} has no tokenizer (none was found beside {args.src}); "
            "generate and serve need one: convert again with --tokenizer DIR",
            file=sys.stderr,
        )
    return 0
