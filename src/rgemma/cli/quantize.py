"""``rgemma quantize SRC DST --bits 8|4``: a weight-only int8 / int4 copy of a checkpoint."""

from __future__ import annotations

import os

from rgemma.cli.common import CLIError, add_threads_arg, report_error, set_threads


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "quantize",
        help="write a weight-only int8 / int4 copy of a checkpoint",
        description="Quantizes the linear layers and the embedding of a checkpoint "
        "(weight-only; RG-LRU parameters, norms and the state stay in full "
        "precision) and writes rgemma's quantized directory format, which "
        "`rgemma generate/chat/serve --model DST` open directly.",
    )
    p.add_argument("src", help="checkpoint to quantize (any layout `rgemma convert` reads)")
    p.add_argument("dst", help="output directory (must not exist unless --overwrite)")
    p.add_argument(
        "--bits",
        type=int,
        choices=[8, 4],
        default=8,
        help="8: per-channel int8; 4: group-wise int4 (default 8)",
    )
    p.add_argument(
        "--group-size",
        type=int,
        default=128,
        help="int4 group size along the input dimension (default 128)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    add_threads_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    """Quantizes and writes; returns 0, or 2 after a one-line error."""
    from rgemma.io import checkpoint
    from rgemma.io.quantized import is_quantized_dir, save_quantized
    from rgemma.quantize import quantize_model, quantized_bytes

    try:
        set_threads(args)
        if os.path.isdir(args.src) and is_quantized_dir(args.src):
            raise ValueError(
                f"{args.src} is already quantized; quantize the original "
                "(unquantized) checkpoint instead"
            )
        # held in the checkpoint's own dtype (a bf16 2B: 5.4 GB, not 10.7): each block is
        # widened to float32 as it is quantized, so the result is a float32 copy's
        model, tokenizer = checkpoint.load(args.src)
        quantize_model(model, bits=args.bits, group_size=args.group_size)
        src_dir = checkpoint.open_checkpoint(args.src).directory
        save_quantized(model, args.dst, tokenizer_dir=src_dir, overwrite=args.overwrite)
    except (ValueError, OSError, CLIError) as e:
        return report_error("quantize", e, 2)
    print(f"wrote {args.dst} (int{args.bits}, {quantized_bytes(model) / 1e6:.1f} MB of weights)")
    return 0
