"""What a training run is asked to do (``TrainConfig``), checked before anything runs.

Every number and path of ``rgemma train`` is validated here, naming the flag,
before data is read or a file written; the learning rate's default (which
depends on what is trained) is filled in by ``resolve_config``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from typing import Any

from rgemma.config import ConfigError, GriffinConfig, griffin_pattern
from rgemma.io.documents import JSONL_EXTENSIONS, TEXT_EXTENSIONS
from rgemma.training import checkpoints
from rgemma.training.defaults import TRAIN_PRESETS, all_preset_names, default_lr, is_preset

SHAPE_FLAGS = {
    "width": "width",
    "layers": "num_layers",
    "heads": "num_heads",
    "mlp_width": "mlp_width",
    "lru_width": "lru_width",
    "window": "attention_window",
}


class TrainError(RuntimeError):
    """A training run that cannot start or continue as asked."""


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a training run (saved in each checkpoint).

    The fields are ``rgemma train``'s flags (``rgemma train --help`` explains each).
    """

    # data
    data: list[str] = dataclasses.field(default_factory=list)
    exclude: list[str] = dataclasses.field(default_factory=list)
    extensions: list[str] = dataclasses.field(
        default_factory=lambda: list(TEXT_EXTENSIONS + JSONL_EXTENSIONS)
    )
    eval_fraction: float = 0.05
    tokenizer: str | None = None
    vocab_size: int = 8000
    # model: fine-tune a checkpoint, or a preset / explicit shape from scratch
    init: str | None = None
    preset: str | None = None
    width: int | None = None
    layers: int | None = None
    heads: int | None = None
    mlp_width: int | None = None
    lru_width: int | None = None
    window: int | None = None
    # LoRA
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_targets: str | None = None
    # optimisation
    seq_len: int = 256
    batch_size: int = 8
    grad_accum: int = 1
    lr: float | None = None  # None: defaults.default_lr (from scratch, full fine-tuning, LoRA)
    min_lr: float = 0.1
    warmup: int = 100
    steps: int = 1000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    clip: float = 1.0
    dtype: str = "float32"
    grad_checkpointing: bool = False
    seed: int = 0
    # bookkeeping
    out: str = "runs/train"
    save_every: int = 0
    keep: int = 3
    resume: str | None = None
    eval_every: int = 0
    eval_tokens: int = 65536
    log_every: int = 10
    threads: int | None = None
    device: str = "cpu"
    fsdp: bool = False
    export: bool = True
    export_dtype: str = "float32"
    plot: bool = True
    progress: bool = True


def flag(name: str) -> str:
    """The ``rgemma train`` flag of a ``TrainConfig`` field."""
    return "--" + name.replace("_", "-")


def peak_lr(cfg: TrainConfig) -> float:
    """``cfg.lr``, or the default for what the run trains (``defaults.default_lr``)."""
    return cfg.lr if cfg.lr is not None else default_lr(cfg.init, cfg.lora_rank)[0]


def check_config(cfg: TrainConfig) -> None:
    """TrainError naming the flag for a run that cannot be what was asked; reads no data,
    writes nothing."""
    for name, (ok, rule) in _RANGES.items():
        value = getattr(cfg, name)
        try:
            good = bool(ok(value))
        except TypeError:
            good = False
        if not good:
            raise TrainError(f"{flag(name)} must be {rule}, got {value!r}")
    if cfg.warmup > cfg.steps:
        raise TrainError(
            f"--warmup {cfg.warmup} is larger than --steps {cfg.steps}: the learning rate "
            f"would still be warming up when the run ends; pass --warmup {cfg.steps // 10} "
            f"(or any value <= {cfg.steps})"
        )
    if cfg.eval_every and cfg.eval_fraction == 0:
        raise TrainError(
            f"--eval-every {cfg.eval_every} evaluates held-out documents, but "
            "--eval-fraction 0 holds none out; pass --eval-fraction (e.g. 0.05) or drop "
            "--eval-every"
        )
    for name in ("dtype", "export_dtype"):
        if getattr(cfg, name) not in ("float32", "bfloat16"):
            raise TrainError(
                f"{flag(name)} must be float32 or bfloat16, got {getattr(cfg, name)!r}"
            )
    if cfg.preset and not is_preset(cfg.preset):
        raise TrainError(
            f"--preset {cfg.preset}: no such preset; choose one of {', '.join(all_preset_names())}"
        )
    shape = [flag(n) for n in ("preset", *SHAPE_FLAGS) if getattr(cfg, n) is not None]
    if cfg.init and shape:
        raise TrainError(
            f"--init {cfg.init} fine-tunes the checkpoint's own shape: drop "
            f"{', '.join(shape)} (they shape a new model)"
        )
    if not cfg.init:
        try:
            model_config(cfg, max(cfg.vocab_size, 1))
        except ConfigError as e:
            raise TrainError(f"model shape: {e}") from None
    check_paths(cfg)


def check_paths(cfg: TrainConfig) -> None:
    """The input paths exist and are files or folders; ``out`` can be a run folder."""
    if not cfg.data:
        raise TrainError("--data: no files or folders given")
    for name, paths in (("data", cfg.data), ("init", [cfg.init]), ("tokenizer", [cfg.tokenizer])):
        for path in paths:
            if path is None:
                continue
            if not os.path.exists(path):
                raise TrainError(f"{flag(name)} {path}: no such file or folder")
            if not (os.path.isfile(path) or os.path.isdir(path)):
                raise TrainError(
                    f"{flag(name)} {path}: not a regular file or a folder (a FIFO, device "
                    "or socket); give files or folders"
                )
    out = cfg.out
    if os.path.exists(out) and not os.path.isdir(out):
        raise TrainError(f"--out {out}: exists and is not a folder")
    parent = os.path.abspath(out)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise TrainError(f"--out {out}: {parent} is not writable")
    found = checkpoints.list_checkpoints(out)
    if found and not cfg.resume:
        raise TrainError(
            f"--out {out} already holds a run's checkpoints ({os.path.basename(found[-1])}...); "
            "add --resume to continue it, or pick a new --out"
        )


def resolve_config(cfg: TrainConfig) -> tuple[TrainConfig, str]:
    """``cfg`` checked (``check_config``) with its learning rate filled in, and a log line
    saying which learning rate the run uses and why."""
    check_config(cfg)
    if cfg.lr is not None:
        return cfg, f"peak lr {cfg.lr:g} (--lr)"
    lr, why = default_lr(cfg.init, cfg.lora_rank)
    return dataclasses.replace(cfg, lr=lr), f"peak lr {lr:g} ({why}; --lr sets it)"


_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "lr": (lambda v: v is None or (math.isfinite(v) and v > 0), "a finite number > 0"),
    "min_lr": (lambda v: 0 <= v <= 1, "a fraction of --lr in [0, 1]"),
    "warmup": (lambda v: v >= 0, ">= 0"),
    "steps": (lambda v: v >= 1, ">= 1"),
    "batch_size": (lambda v: v >= 1, ">= 1"),
    "grad_accum": (lambda v: v >= 1, ">= 1"),
    "seq_len": (lambda v: v >= 2, ">= 2"),
    "eval_fraction": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "clip": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0 (0 disables clipping)"),
    "weight_decay": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "beta1": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "beta2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "lora_rank": (lambda v: v >= 0, ">= 0 (0 trains all weights)"),
    "lora_alpha": (lambda v: v is None or (math.isfinite(v) and v > 0), "a finite number > 0"),
    "vocab_size": (lambda v: v >= 1, ">= 1"),
    "save_every": (lambda v: v >= 0, ">= 0 (0: only when stopped)"),
    "keep": (lambda v: v >= 0, ">= 0 (0 keeps all)"),
    "eval_every": (lambda v: v >= 0, ">= 0 (0: only at the end)"),
    "eval_tokens": (lambda v: v >= 1, ">= 1"),
    "log_every": (lambda v: v >= 1, ">= 1"),
    "threads": (lambda v: v is None or v >= 0, ">= 0"),
    "seed": (lambda v: 0 <= v < 2**32, "in [0, 2**32)"),
    **{
        name: (lambda v: v is None or v >= 1, ">= 1")
        for name in ("width", "layers", "heads", "mlp_width", "lru_width", "window")
    },
}


def model_config(cfg: TrainConfig, vocab_size: int) -> GriffinConfig:
    """The architecture to train from scratch: --preset, then explicit flags."""
    shape: dict[str, Any] = {}
    base: GriffinConfig | None = None
    if cfg.preset in TRAIN_PRESETS:
        shape = dict(TRAIN_PRESETS[cfg.preset])
    elif cfg.preset:
        base = GriffinConfig.from_preset(cfg.preset, vocab_size=vocab_size)
        shape = {key: getattr(base, key) for key in SHAPE_FLAGS.values()}
    for flag, key in SHAPE_FLAGS.items():
        if getattr(cfg, flag) is not None:
            shape[key] = getattr(cfg, flag)
    if "width" not in shape:
        raise TrainError(
            "training from scratch needs a shape: --preset NAME or --width "
            "(and --layers, --heads...), or --init CHECKPOINT to fine-tune"
        )
    width = shape["width"]
    heads = shape.get("num_heads", max(1, width // 128))
    num_layers = shape.get("num_layers", 6)
    blocks = (
        base.block_types
        if base is not None and base.num_layers == num_layers
        else griffin_pattern(num_layers)
    )
    kwargs = dict(
        vocab_size=vocab_size,
        width=width,
        num_heads=heads,
        block_types=blocks,
        mlp_width=shape.get("mlp_width", 3 * width),
        lru_width=shape.get("lru_width", width),
        attention_window=shape.get("attention_window", 512),
    )
    if base is not None:
        return base.replace(**kwargs)
    return GriffinConfig(**kwargs)
