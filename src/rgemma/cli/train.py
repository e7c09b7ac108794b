"""Training and fine-tuning: a plain PyTorch loop, nanoGPT style.

    python -m rgemma train --data DIR_OR_FILES --out runs/x [--preset tiny | --width ...]
    python -m rgemma train --init CHECKPOINT --data chat.jsonl --lora-rank 8 --out runs/ft
    torchrun --nproc_per_node 2 -m rgemma train ...          # data parallel (DDP)

One step: ``grad_accum`` micro-batches of ``batch_size`` rows on each of
``world`` processes (the global batch), loss = mean cross-entropy over all
target tokens of the global batch, gradient clipping, AdamW with linear
warmup then cosine decay to ``min_lr``. Checkpoints (model, optimizer, step,
RNG) are written atomically every ``save_every`` steps; the data position is
the step itself (see ``data.BatchSampler``), so ``--resume`` continues with
the same results as an uninterrupted run. At the end the model is exported
in the Hugging Face layout (LoRA merged), with its tokenizer.

Outputs in ``--out``: ``tokenizer.model`` (when trained here), ``data/``
(token cache), ``checkpoints/step-XXXXXXXX.pt``, ``metrics.jsonl``,
``loss.png``, ``data_stats.json``, ``model/`` (the exported checkpoint).

Stopping: Ctrl-C (SIGINT) or SIGTERM lets the step in progress finish, writes
a checkpoint and prints the command that continues the run (``--resume``); a
second Ctrl-C stops at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys

from rgemma.cli.common import CLIError, report_error, resolve_model_path
from rgemma.io.documents import JSONL_EXTENSIONS, TEXT_EXTENSIONS
from rgemma.training.defaults import FINE_TUNE_LR, LORA_LR, SCRATCH_LR, TRAIN_PRESETS


def register(subparsers) -> None:
    """Adds the ``train`` verb."""
    # a table of flags, one call each with its continuation lines aligned
    # fmt: off
    p = subparsers.add_parser(
        "train", help="train from scratch or fine-tune (full or LoRA)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", nargs="+", required=True, metavar="PATH",
                   help="files or folders: plain text (.py .txt .md .rst, one document per "
                        "file) and .jsonl (one document per line: {\"text\": ...}, or a chat "
                        "{\"messages\": [{\"role\", \"content\"}...]} trained only on the "
                        "assistant turns, rendered with the tokenizer's chat template)")
    g.add_argument("--exclude", nargs="*", default=[], metavar="DIR",
                   help="folder names to skip while walking --data (besides __pycache__, "
                        "site-packages and hidden folders)")
    g.add_argument("--extensions", nargs="+", metavar="EXT",
                   default=list(TEXT_EXTENSIONS + JSONL_EXTENSIONS),
                   help="file name endings read from folders (default: %(default)s)")
    g.add_argument("--eval-fraction", type=float, default=0.05,
                   help="fraction of files (JSONL: lines) held out for evaluation, chosen by "
                        "a hash of their path (default 0.05)")
    g.add_argument("--tokenizer", metavar="PATH",
                   help="tokenizer.model or a checkpoint folder; default: the --init "
                        "checkpoint's, else a new SentencePiece tokenizer trained on the data")
    g.add_argument("--vocab-size", type=int, default=8000,
                   help="pieces of the tokenizer trained when none is given (default 8000)")
    g = p.add_argument_group("model")
    g.add_argument("--init", metavar="CHECKPOINT",
                   help="fine-tune this checkpoint (any format rgemma loads) instead of "
                        "training from scratch")
    g.add_argument("--preset", help=f"shape from scratch: {', '.join(TRAIN_PRESETS)} or a "
                                    "full-size preset (recurrentgemma-2b(-it), "
                                    "recurrentgemma-9b(-it), griffin-7b, hawk-7b)")
    g.add_argument("--width", type=int, help="model width (overrides the preset)")
    g.add_argument("--layers", type=int, help="number of blocks, (recurrent, recurrent, "
                                              "attention) repeated")
    g.add_argument("--heads", type=int, help="attention heads (= RG-LRU gate blocks)")
    g.add_argument("--mlp-width", type=int, help="MLP hidden width (default 3 x width)")
    g.add_argument("--lru-width", type=int, help="RG-LRU width (default width)")
    g.add_argument("--window", type=int, help="local attention window (default 512)")
    g = p.add_argument_group("LoRA (fine-tuning with low-rank adapters)")
    g.add_argument("--lora-rank", type=int, default=0,
                   help="rank r of the adapters; 0 (default) trains all weights")
    g.add_argument("--lora-alpha", type=float,
                   help="adapter scale alpha (update x alpha / r); default r")
    g.add_argument("--lora-targets",
                   help="comma-separated Linear names or groups: attention, recurrent, mlp, "
                        "all, q_proj, linear_x... (default attention + recurrent)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--seq-len", type=int, default=256, help="tokens per row (default 256)")
    g.add_argument("--batch-size", type=int, default=8,
                   help="rows per micro-batch per process (default 8)")
    g.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per step; global batch = batch-size x grad-accum x "
                        "processes (default 1)")
    g.add_argument("--lr", type=float, default=None,
                   help=f"peak learning rate (default {SCRATCH_LR:g} from scratch, "
                        f"{FINE_TUNE_LR:g} for full fine-tuning from --init, {LORA_LR:g} "
                        "with --lora-rank; the run's log says which)")
    g.add_argument("--min-lr", type=float, default=0.1,
                   help="final learning rate as a fraction of --lr (default 0.1)")
    g.add_argument("--warmup", type=int, default=100,
                   help="linear warmup steps, at most --steps (default 100)")
    g.add_argument("--steps", type=int, default=1000,
                   help="optimizer steps; cosine decay ends here (default 1000)")
    g.add_argument("--weight-decay", type=float, default=0.1,
                   help="AdamW weight decay on matrices (default 0.1)")
    g.add_argument("--beta2", type=float, default=0.95, help="AdamW beta2 (default 0.95)")
    g.add_argument("--clip", type=float, default=1.0,
                   help="clip the gradient norm to this; 0 disables (default 1.0)")
    g.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype: bfloat16 autocast (weights stay float32) where the "
                        "hardware has bf16 arithmetic (default float32)")
    g.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute each block's activations in backward (less memory)")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of initialisation, data order and LoRA (default 0)")
    g = p.add_argument_group("run")
    g.add_argument("--out", default="runs/train", help="run folder: checkpoints, metrics, plot, "
                                                       "exported model (default runs/train)")
    g.add_argument("--save-every", type=int, default=0,
                   help="write a resumable checkpoint every N steps (and at the end); 0: only "
                        "when the run is stopped (Ctrl-C / SIGTERM)")
    g.add_argument("--keep", type=int, default=3,
                   help="checkpoints to keep, the latest ones (default 3; 0 keeps all)")
    g.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                   help="continue the run from its latest checkpoint in --out (an error if "
                        "there is none) or the file given, with the same results as without "
                        "interruption: model, "
                        "optimizer, schedule, data position and RNG are restored. Pass the "
                        "same options; only bookkeeping ones may change (--steps too, which "
                        "stretches the cosine schedule from there on)")
    g.add_argument("--eval-every", type=int, default=0,
                   help="held-out loss every N steps (and at the end); 0: only at the end. "
                        "Needs held-out documents (--eval-fraction > 0)")
    g.add_argument("--eval-tokens", type=int, default=65536,
                   help="held-out tokens per periodic evaluation (the final one uses all)")
    g.add_argument("--log-every", type=int, default=10, help="print a log line every N steps")
    g.add_argument("--threads", type=int, help="torch CPU threads per process")
    g.add_argument("--device", default=None,
                   help="cpu or cuda (default: cuda when available)")
    g.add_argument("--fsdp", action="store_true",
                   help="under torchrun, shard parameters and optimizer state (FSDP) instead "
                        "of replicating them (DDP): for models too large for one process")
    g.add_argument("--no-export", dest="export", action="store_false",
                   help="do not export the final model to OUT/model")
    g.add_argument("--export-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="dtype of the exported weights (default float32)")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar (log lines only)")
    # fmt: on
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace):
    """The ``TrainConfig`` of parsed flags (``--device``: cuda when available, else cpu;
    CLIError for a device this PyTorch lacks)."""
    from rgemma.cli.common import resolve_device
    from rgemma.training.train import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values["device"] = resolve_device(values.get("device"))
    return TrainConfig(**values)


def resume_command(args: argparse.Namespace, argv: list[str] | None = None) -> str:
    """The command line that continues this run: the same options, any ``--resume``
    replaced by a plain ``--resume`` (the latest checkpoint in ``--out``)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        options = _drop_resume(argv[1:])
    else:  # called as a function (main([...])): rebuild the options from the flags
        options = _options_of(args)
    return shlex.join(["rgemma", "train", *options, "--resume"])


def _drop_resume(options: list[str]) -> list[str]:
    kept, i = [], 0
    while i < len(options):
        item = options[i]
        if item == "--resume":
            i += 2 if i + 1 < len(options) and not options[i + 1].startswith("-") else 1
            continue
        if not item.startswith("--resume="):
            kept.append(item)
        i += 1
    return kept


def _options_of(args: argparse.Namespace) -> list[str]:
    """Flags that reproduce ``args`` (those that differ from TrainConfig's defaults)."""
    from rgemma.training.train import TrainConfig

    defaults = TrainConfig()
    options: list[str] = []
    for field in dataclasses.fields(TrainConfig):
        name = field.name
        if name in ("resume", "device", "plot") or not hasattr(args, name):
            continue
        value = getattr(args, name)
        if value == getattr(defaults, name):
            continue
        option = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            options.append(option if value else f"--no-{name.replace('_', '-')}")
        elif isinstance(value, list):
            options += [option, *map(str, value)]
        elif value is not None:
            options += [option, str(value)]
    if getattr(args, "device", None):
        options += ["--device", args.device]
    return options


def run(args: argparse.Namespace) -> int:
    """``rgemma train``: 0; 2 after a one-line error for a run that cannot go on; 128 +
    the signal's number for a run stopped by Ctrl-C / SIGTERM (after a checkpoint)."""
    import torch

    from rgemma.io.documents import DataError
    from rgemma.training.train import TrainError, train

    try:
        if args.init:
            args.init = resolve_model_path(args.init)  # a path, or a Hub id's snapshot
        cfg = config_from_args(args)
        summary = train(cfg)
    except CLIError as e:
        return report_error("train", e)
    except (TrainError, DataError) as e:
        return report_error("train", e, 2)
    except OSError as e:  # a full disk, a folder that vanished...
        return report_error("train", e, 1)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if summary.get("stopped"):
        if int(os.environ.get("RANK", "0")) == 0:
            print(
                f"stopped at step {summary['step']}; continue with: {resume_command(args)}",
                file=sys.stderr,
                flush=True,
            )
        return 128 + summary["signal"]
    return 0
