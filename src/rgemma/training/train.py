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
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import json
import math
import os
import random
import shutil
import sys
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from rgemma.training import data as data_lib
from rgemma.config import GriffinConfig, griffin_pattern

# Small shapes for training from scratch (vocab comes from the tokenizer).
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(width=64, num_layers=3, num_heads=2, mlp_width=192, attention_window=64),
    "small": dict(width=128, num_layers=6, num_heads=2, mlp_width=384, attention_window=128),
    "demo": dict(width=256, num_layers=6, num_heads=2, mlp_width=768, attention_window=256),
}

# Fields that may differ between the run that wrote a checkpoint and the one resuming it.
RESUME_MAY_CHANGE = {"steps", "out", "save_every", "keep", "eval_every", "log_every", "resume",
                     "threads", "progress", "export", "export_dtype", "plot"}


class TrainError(RuntimeError):
    """A training run that cannot start or continue as asked."""


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a training run (saved in each checkpoint)."""

    # data
    data: list[str] = dataclasses.field(default_factory=list)
    exclude: list[str] = dataclasses.field(default_factory=list)
    extensions: list[str] = dataclasses.field(
        default_factory=lambda: list(data_lib.TEXT_EXTENSIONS + data_lib.JSONL_EXTENSIONS))
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
    lr: float = 3e-3
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


# --------------------------------------------------------------------------
# Distributed helpers (no-ops in a single process)
# --------------------------------------------------------------------------

@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def sum(self, x: float) -> float:
        if not self.enabled:
            return x
        t = torch.tensor([x], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return float(t.item())


def init_distributed(device: str) -> Dist:
    """Joins the process group when started by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend)
    return Dist(rank=torch.distributed.get_rank(), world=torch.distributed.get_world_size(),
                local_rank=int(os.environ.get("LOCAL_RANK", "0")))


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------

@dataclasses.dataclass
class Data:
    train: data_lib.PackedRows
    eval: data_lib.PackedRows | None
    tokenizer: Any
    tokenizer_files: list[str]
    stats: dict[str, Any]


def tokenizer_source(cfg: TrainConfig) -> str | None:
    """The tokenizer file or folder to use (None: train one into ``out``)."""
    if cfg.tokenizer:
        return cfg.tokenizer
    if cfg.init and os.path.isdir(cfg.init):
        return cfg.init
    return None


def load_tokenizer(src: str):
    from rgemma.io.tokenizer import Tokenizer
    return Tokenizer.from_dir(src) if os.path.isdir(src) else Tokenizer.from_file(src)


def tokenizer_files(src: str) -> list[str]:
    """Files of a tokenizer to ship next to an exported model."""
    if os.path.isfile(src):
        return [src]
    names = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "chat_template.jinja")
    return [os.path.join(src, n) for n in names if os.path.isfile(os.path.join(src, n))]


def prepare_data(cfg: TrainConfig, dist: Dist, log: Callable[[str], None]) -> Data:
    """Reads the documents, gets a tokenizer, tokenizes (cached) and packs rows.

    The main process does the work; the others wait and read its caches.
    """
    docs, skipped = data_lib.find_documents(cfg.data, exclude=cfg.exclude,
                                           extensions=tuple(cfg.extensions))
    if not docs:
        raise TrainError(f"no documents found in {', '.join(cfg.data) or '(no --data)'}")
    train_docs, held_docs = data_lib.split_documents(docs, cfg.eval_fraction)
    if not train_docs:
        raise TrainError("every document is held out; lower --eval-fraction")
    src = tokenizer_source(cfg)
    if src is None and cfg.init:
        raise TrainError(f"--init {cfg.init}: a checkpoint file carries no tokenizer; pass "
                         "--tokenizer (its tokenizer.model or folder)")
    if src is not None and not tokenizer_files(src):
        raise TrainError(f"{src}: no tokenizer.model or tokenizer.json there; pass --tokenizer")
    if src is None:
        src = os.path.join(cfg.out, "tokenizer.model")
        if dist.is_main and not os.path.exists(src):
            log(f"training a {cfg.vocab_size}-piece tokenizer on {len(train_docs)} documents")
            texts = (d.text if d.messages is None
                     else "\n".join(str(m.get("content", "")) for m in d.messages)
                     for d in train_docs)
            data_lib.train_tokenizer(texts, src, vocab_size=cfg.vocab_size)
        dist.barrier()
    tokenizer = load_tokenizer(src)
    tok_file = src if os.path.isfile(src) else tokenizer_files(src)[0]
    cache = os.path.join(cfg.out, "data")
    corpora = {}
    for rank_turn in range(2):   # main process first, then the others read the cache
        if (rank_turn == 0) == dist.is_main:
            for name, subset in (("train", train_docs), ("eval", held_docs)):
                if subset:
                    corpora[name] = data_lib.tokenize_cached(subset, tokenizer, tok_file, cache,
                                                             name)
        dist.barrier()
    train_rows = data_lib.PackedRows(corpora["train"], cfg.seq_len)
    eval_rows = None
    if "eval" in corpora and corpora["eval"].num_tokens > cfg.seq_len:
        eval_rows = data_lib.PackedRows(corpora["eval"], cfg.seq_len)
    stats = {
        "documents": len(docs), "skipped_files": skipped,
        "train_documents": len(train_docs), "eval_documents": len(held_docs),
        "train_chars": sum(len(d.text or "") for d in train_docs),
        "eval_chars": sum(len(d.text or "") for d in held_docs),
        "train_tokens": corpora["train"].num_tokens,
        "eval_tokens": corpora["eval"].num_tokens if "eval" in corpora else 0,
        "vocab_size": tokenizer.vocab_size,
    }
    if "eval" in corpora:
        stats["unigram_eval_loss"] = data_lib.unigram_loss(corpora["train"], corpora["eval"],
                                                           tokenizer.vocab_size)
    return Data(train=train_rows, eval=eval_rows, tokenizer=tokenizer,
                tokenizer_files=tokenizer_files(src), stats=stats)


# --------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------

def model_config(cfg: TrainConfig, vocab_size: int) -> GriffinConfig:
    """The architecture to train from scratch: --preset, then explicit flags."""
    shape: dict[str, Any] = {}
    base: GriffinConfig | None = None
    if cfg.preset in TRAIN_PRESETS:
        shape = dict(TRAIN_PRESETS[cfg.preset])
    elif cfg.preset:
        base = GriffinConfig.from_preset(cfg.preset, vocab_size=vocab_size)
        shape = dict(width=base.width, num_layers=base.num_layers, num_heads=base.num_heads,
                     mlp_width=base.mlp_width, attention_window=base.attention_window,
                     lru_width=base.lru_width)
    for flag, key in (("width", "width"), ("layers", "num_layers"), ("heads", "num_heads"),
                      ("mlp_width", "mlp_width"), ("lru_width", "lru_width"),
                      ("window", "attention_window")):
        if getattr(cfg, flag) is not None:
            shape[key] = getattr(cfg, flag)
    if "width" not in shape:
        raise TrainError("training from scratch needs a shape: --preset NAME or --width "
                         "(and --layers, --heads...), or --init CHECKPOINT to fine-tune")
    width = shape["width"]
    heads = shape.get("num_heads", max(1, width // 128))
    num_layers = shape.get("num_layers", 6)
    blocks = base.block_types if base is not None and base.num_layers == num_layers \
        else griffin_pattern(num_layers)
    kwargs = dict(vocab_size=vocab_size, width=width, num_heads=heads, block_types=blocks,
                  mlp_width=shape.get("mlp_width", 3 * width),
                  lru_width=shape.get("lru_width", width),
                  attention_window=shape.get("attention_window", 512))
    if base is not None:
        return base.replace(**kwargs)
    return GriffinConfig(**kwargs)


def build_model(cfg: TrainConfig, vocab_size: int, log: Callable[[str], None]):
    """A freshly initialised model, or the ``--init`` checkpoint; LoRA applied."""
    from rgemma.model import Griffin
    if cfg.init:
        from rgemma.io import checkpoint
        model, _ = checkpoint.load(cfg.init, dtype=torch.float32)
        if model.config.vocab_size < vocab_size:
            raise TrainError(f"the tokenizer has {vocab_size} pieces but the model in "
                             f"{cfg.init} only {model.config.vocab_size} embeddings")
        log(f"fine-tuning {cfg.init} ({model.num_parameters():,} parameters)")
    else:
        model = Griffin(model_config(cfg, vocab_size)).init_weights(cfg.seed)
        log(f"new model: {model.num_parameters():,} parameters, "
            f"{model.config.num_layers} layers, width {model.config.width}")
    model = model.float()
    if cfg.lora_rank:
        from rgemma.training import lora
        adapted = lora.apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets,
                                  seed=cfg.seed)
        n = sum(p.numel() for p in lora.lora_parameters(model))
        log(f"LoRA rank {cfg.lora_rank} on {len(adapted)} layers: {n:,} trainable parameters")
    model.gradient_checkpointing = cfg.grad_checkpointing
    return model


def plain_model_like(config: GriffinConfig, cfg: TrainConfig):
    """An unsharded CPU model of this run's structure (LoRA layers included)."""
    from rgemma.model import Griffin
    model = Griffin(config)
    if cfg.lora_rank:
        from rgemma.training import lora
        lora.apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, seed=cfg.seed)
    return model


def wrap_distributed(model, cfg: TrainConfig, dist: Dist):
    """DDP (or FSDP with --fsdp) when running under torchrun; else the model itself."""
    if not dist.enabled:
        return model
    if cfg.fsdp:
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError as e:
            raise TrainError("--fsdp needs torch >= 2.6 (torch.distributed.fsdp.fully_shard)") from e
        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel
    device_ids = [dist.local_rank] if cfg.device.startswith("cuda") else None
    return DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model):
    return getattr(model, "module", model)


def make_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on norms, biases, recurrent_param)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise TrainError("the model has no trainable parameters")
    decay = [p for n, p in params if p.ndim >= 2]
    no_decay = [p for n, p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from lr to min_lr * lr."""
    if cfg.warmup and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / span)
    floor = cfg.lr * cfg.min_lr
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def autocast_context(cfg: TrainConfig):
    """bf16 autocast where the hardware computes in bf16; float32 is a no-op."""
    if cfg.dtype == "float32":
        return contextlib.nullcontext()
    if cfg.dtype != "bfloat16":
        raise TrainError(f"--dtype must be float32 or bfloat16, got {cfg.dtype!r}")
    device_type = "cuda" if cfg.device.startswith("cuda") else "cpu"
    if not bf16_supported(device_type):
        raise TrainError(
            f"--dtype bfloat16: this {device_type.upper()} has no native bfloat16 arithmetic "
            "(on CPU: no AVX512-BF16 or AMX), so bf16 would be slower than float32 and less "
            "accurate; train with --dtype float32")
    return torch.autocast(device_type, dtype=torch.bfloat16)


def bf16_supported(device_type: str) -> bool:
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    from rgemma.layers import NATIVE_BF16
    return NATIVE_BF16


# --------------------------------------------------------------------------
# Loss and evaluation
# --------------------------------------------------------------------------

def to_tensors(batch: dict[str, np.ndarray], device: str) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v).to(device) for k, v in batch.items()}


def token_losses(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B, T] cross-entropy of each target (float32), 0 where the weight is 0."""
    logits, _ = model(batch["tokens"], batch["positions"])    # rows start from an empty state
    ce = F.cross_entropy(logits.float().flatten(0, 1), batch["targets"].flatten(),
                         reduction="none").view_as(batch["weights"])
    return ce * batch["weights"]


@torch.no_grad()
def evaluate(model, rows: data_lib.PackedRows, cfg: TrainConfig, dist: Dist,
             max_tokens: int | None) -> float:
    """Mean held-out loss (nats per target token) over evenly spaced rows."""
    n = len(rows)
    if max_tokens:
        n = min(n, max(1, max_tokens // cfg.seq_len))
    picks = np.unique(np.linspace(0, len(rows) - 1, n).round().astype(np.int64))
    mine = picks[dist.rank::dist.world]
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    with autocast_context(cfg):
        for i in range(0, len(mine), cfg.batch_size):
            batch = to_tensors(rows.batch(mine[i:i + cfg.batch_size]), cfg.device)
            total += float(token_losses(model, batch).sum())
            count += float(batch["weights"].sum())
    model.train(was_training)
    total, count = dist.sum(total), dist.sum(count)
    return total / max(count, 1.0)


# --------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------

def checkpoint_dir(cfg: TrainConfig) -> str:
    return os.path.join(cfg.out, "checkpoints")


def list_checkpoints(cfg: TrainConfig) -> list[str]:
    return sorted(glob.glob(os.path.join(checkpoint_dir(cfg), "step-*.pt")))


def model_and_optimizer_state(model, optimizer, cfg: TrainConfig) -> tuple[dict, dict]:
    """Full (unsharded) state dicts on CPU; collective under FSDP."""
    if cfg.fsdp and torch.distributed.is_initialized():
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_state_dict)
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_state_dict(model, optimizer, options=opts)
    return unwrap(model).state_dict(), optimizer.state_dict()


def save_checkpoint(path: str, model, optimizer, cfg: TrainConfig, step: int,
                    extra: dict[str, Any], dist: Dist) -> None:
    """Writes everything needed to resume, atomically (temp file + rename)."""
    model_sd, optim_sd = model_and_optimizer_state(model, optimizer, cfg)
    if not dist.is_main:
        return
    payload = {
        "step": step,
        "model": model_sd,
        "optimizer": optim_sd,
        "train_config": dataclasses.asdict(cfg),
        "model_config": unwrap(model).config.to_dict(),
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                "python": random.getstate()},
        **extra,
    }
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(payload, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def prune_checkpoints(cfg: TrainConfig) -> None:
    """Keeps the last ``keep`` checkpoints (0 keeps all)."""
    if cfg.keep <= 0:
        return
    for old in list_checkpoints(cfg)[:-cfg.keep]:
        os.remove(old)


def resume_path(cfg: TrainConfig) -> str | None:
    """The checkpoint to resume from: a file, or the latest in ``out`` ('latest')."""
    if not cfg.resume:
        return None
    if cfg.resume != "latest":
        if not os.path.isfile(cfg.resume):
            raise TrainError(f"--resume {cfg.resume}: no such checkpoint file")
        return cfg.resume
    found = list_checkpoints(cfg)
    return found[-1] if found else None


def check_resumable(saved: dict[str, Any], cfg: TrainConfig) -> None:
    """The resumed run must be the same run (bar bookkeeping such as --steps)."""
    now = dataclasses.asdict(cfg)
    diff = [k for k, v in saved.items() if k not in RESUME_MAY_CHANGE and now.get(k) != v]
    if diff:
        details = ", ".join(f"{k}: {saved[k]!r} -> {now.get(k)!r}" for k in diff)
        raise TrainError(f"cannot resume: the checkpoint was written by a different run "
                         f"({details}); pass the same options, or start a new --out")


def load_checkpoint(path: str, model, optimizer, cfg: TrainConfig) -> dict[str, Any]:
    """Restores model, optimizer and RNG; returns the checkpoint's other fields."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    check_resumable(ckpt["train_config"], cfg)
    if cfg.fsdp and torch.distributed.is_initialized():
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             set_state_dict)
        set_state_dict(model, optimizer, model_state_dict=ckpt["model"],
                       optim_state_dict=ckpt["optimizer"],
                       options=StateDictOptions(full_state_dict=True))
    else:
        unwrap(model).load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    np.random.set_state(ckpt["rng"]["numpy"])
    random.setstate(ckpt["rng"]["python"])
    return ckpt


# --------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------

def export_hf(model, directory: str, tokenizer_paths: list[str], *,
              dtype: torch.dtype = torch.float32) -> str:
    """Writes a Hugging Face checkpoint directory with ``checkpoint.save_hf``.

    LoRA adapters are merged (in a copy) first; the tokenizer files are
    copied along. The write is atomic (an existing ``directory`` is replaced).
    """
    import copy
    import tempfile

    from rgemma.io import checkpoint
    from rgemma.training import lora
    if lora.has_lora(model):
        model = lora.merge(copy.deepcopy(model))
    with tempfile.TemporaryDirectory() as staging:
        for path in tokenizer_paths:
            name = "tokenizer.model" if path.endswith(".model") else os.path.basename(path)
            shutil.copyfile(path, os.path.join(staging, name))
        checkpoint.save_hf(model, directory, dtype=dtype, tokenizer_dir=staging, overwrite=True)
    return directory


# --------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------

def read_metrics(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(path: str, step: int) -> None:
    """Drops records after ``step`` (a resumed run rewrites them)."""
    kept = [r for r in read_metrics(path) if r["step"] <= step]
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)


def plot_metrics(metrics_path: str, png_path: str, baseline: float | None = None) -> bool:
    """Train and eval loss against step as a PNG (with the held-out unigram
    baseline as a dashed line if given); False if matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot(*zip(*train), label="train", lw=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="held-out", lw=1.5)
    if baseline is not None:
        ax.axhline(baseline, ls="--", color="gray", lw=1, label="unigram baseline (held-out)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png_path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)
    return True


# --------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------

def train(cfg: TrainConfig, on_step: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    """Runs (or resumes) a training run; returns a summary.

    ``on_step(step, record)`` is called after every optimizer step (after any
    checkpoint of that step is written).
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dist = init_distributed(cfg.device)
    if cfg.device.startswith("cuda") and dist.enabled:
        cfg = dataclasses.replace(cfg, device=f"cuda:{dist.local_rank}")
    log = print if dist.is_main else (lambda *a, **k: None)
    os.makedirs(cfg.out, exist_ok=True)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    data = prepare_data(cfg, dist, log)
    log(f"data: {data.stats['train_documents']} train / {data.stats['eval_documents']} held-out "
        f"documents, {data.stats['train_tokens']:,} / {data.stats['eval_tokens']:,} tokens")
    model = build_model(cfg, data.tokenizer.vocab_size, log).to(cfg.device)
    model.train()
    dmodel = wrap_distributed(model, cfg, dist)
    optimizer = make_optimizer(dmodel, cfg)
    ctx = autocast_context(cfg)

    global_rows = cfg.batch_size * cfg.grad_accum * dist.world
    sampler = data_lib.BatchSampler(len(data.train), global_rows, cfg.seed)
    metrics_path = os.path.join(cfg.out, "metrics.jsonl")

    step, tokens_seen, elapsed_before = 0, 0, 0.0
    path = resume_path(cfg)
    if path:
        ckpt = load_checkpoint(path, dmodel, optimizer, cfg)
        step, tokens_seen = ckpt["step"], ckpt["tokens_seen"]
        elapsed_before = ckpt.get("elapsed", 0.0)
        log(f"resumed from {path} at step {step}")
        if dist.is_main:
            truncate_metrics(metrics_path, step)
    elif cfg.resume and cfg.resume == "latest":
        log("--resume: no checkpoint yet, starting from step 0")
    if dist.is_main:
        if not path:
            open(metrics_path, "w").close()
        stats = {**data.stats, "model_parameters": unwrap(dmodel).num_parameters(),
                 "model_config": unwrap(dmodel).config.to_dict()}
        with open(os.path.join(cfg.out, "data_stats.json"), "w") as f:
            json.dump(stats, f, indent=2)

    bar = None
    if dist.is_main and cfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
                   mininterval=1.0)
    t_start = time.time()
    t_window, tok_window = time.time(), 0
    last_eval = None
    while step < cfg.steps:
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        rows = sampler.rows(step)
        micro = [rows[(m * dist.world + dist.rank) * cfg.batch_size:
                      (m * dist.world + dist.rank + 1) * cfg.batch_size]
                 for m in range(cfg.grad_accum)]
        batches = [to_tensors(data.train.batch(r), cfg.device) for r in micro]
        global_weight = dist.sum(sum(float(b["weights"].sum()) for b in batches))
        loss_sum = 0.0
        for m, batch in enumerate(batches):
            sync = m == len(batches) - 1
            no_sync = dmodel.no_sync() if (dist.enabled and not cfg.fsdp and not sync) \
                else contextlib.nullcontext()
            with no_sync, ctx:
                local = token_losses(dmodel, batch).sum()
                # DDP averages gradients over ranks: scale so they sum to d(mean loss).
                (local * (dist.world / max(global_weight, 1.0))).backward()
            loss_sum += float(local.detach())
        loss = dist.sum(loss_sum) / max(global_weight, 1.0)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(
            [p for p in dmodel.parameters() if p.requires_grad],
            cfg.clip if cfg.clip > 0 else float("inf")))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        n_tokens = global_rows * cfg.seq_len
        tokens_seen += n_tokens
        tok_window += n_tokens

        record: dict[str, Any] = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                                  "tokens": tokens_seen,
                                  "epoch": round(sampler.epoch_of(step), 4)}
        if cfg.eval_every and data.eval is not None and (step % cfg.eval_every == 0
                                                         or step == cfg.steps):
            record["eval_loss"] = last_eval = evaluate(dmodel, data.eval, cfg, dist,
                                                       cfg.eval_tokens)
        now = time.time()
        record["tokens_per_s"] = tok_window / max(now - t_window, 1e-9)
        record["elapsed"] = elapsed_before + now - t_start
        if step % max(cfg.log_every, 1) == 0:
            t_window, tok_window = now, 0
        if dist.is_main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if bar is not None:
                post = {"loss": f"{loss:.3f}", "tok/s": f"{record['tokens_per_s']:.0f}"}
                if last_eval is not None:
                    post["eval"] = f"{last_eval:.3f}"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
            if step % max(cfg.log_every, 1) == 0 or "eval_loss" in record:
                line = (f"step {step}/{cfg.steps} loss {loss:.4f} lr {lr:.2e} "
                        f"gnorm {grad_norm:.2f} tok/s {record['tokens_per_s']:.0f} "
                        f"elapsed {record['elapsed']:.0f}s")
                if "eval_loss" in record:
                    line += f" eval {record['eval_loss']:.4f}"
                (bar.write if bar is not None else print)(line)
                sys.stdout.flush()
            if cfg.plot and "eval_loss" in record:
                plot_metrics(metrics_path, os.path.join(cfg.out, "loss.png"),
                             data.stats.get("unigram_eval_loss"))
        if cfg.save_every and (step % cfg.save_every == 0 or step == cfg.steps):
            ckpt_path = os.path.join(checkpoint_dir(cfg), f"step-{step:08d}.pt")
            save_checkpoint(ckpt_path, dmodel, optimizer, cfg, step,
                            {"tokens_seen": tokens_seen, "elapsed": record["elapsed"]}, dist)
            if dist.is_main:
                prune_checkpoints(cfg)
        if on_step is not None:
            on_step(step, record)
    if bar is not None:
        bar.close()

    summary: dict[str, Any] = {"step": step, "tokens": tokens_seen,
                               "elapsed": elapsed_before + time.time() - t_start,
                               "train_config": dataclasses.asdict(cfg)}
    records = read_metrics(metrics_path) if dist.is_main else []
    if records:
        summary["final_train_loss"] = records[-1]["loss"]
    if data.eval is not None:
        summary["eval_loss"] = evaluate(dmodel, data.eval, cfg, dist, None)
        summary["eval_perplexity"] = math.exp(summary["eval_loss"])
        summary["unigram_eval_loss"] = data.stats.get("unigram_eval_loss")
    final_sd = None
    if cfg.fsdp and dist.enabled:
        final_sd, _ = model_and_optimizer_state(dmodel, optimizer, cfg)
    if dist.is_main:
        if cfg.plot:
            summary["plot"] = plot_metrics(metrics_path, os.path.join(cfg.out, "loss.png"),
                                           data.stats.get("unigram_eval_loss"))
        if cfg.export:
            final = unwrap(dmodel)
            if final_sd is not None:   # FSDP: a plain copy built from the gathered weights
                final = plain_model_like(unwrap(dmodel).config, cfg)
                final.load_state_dict(final_sd)
            dtype = getattr(torch, cfg.export_dtype)
            summary["export"] = export_hf(final, os.path.join(cfg.out, "model"),
                                          data.tokenizer_files, dtype=dtype)
            log(f"exported {summary['export']}")
        with open(os.path.join(cfg.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        log(json.dumps(summary))
    dist.barrier()
    return summary


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------

def register(subparsers) -> None:
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
                   default=list(data_lib.TEXT_EXTENSIONS + data_lib.JSONL_EXTENSIONS),
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
                                    "full-size preset (recurrentgemma-2b...)")
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
    g.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    g.add_argument("--min-lr", type=float, default=0.1,
                   help="final learning rate as a fraction of --lr (default 0.1)")
    g.add_argument("--warmup", type=int, default=100, help="linear warmup steps (default 100)")
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
    g.add_argument("--out", default="runs/train",
                   help="run folder: checkpoints, metrics, plot, exported model (default "
                        "runs/train)")
    g.add_argument("--save-every", type=int, default=0,
                   help="write a resumable checkpoint every N steps (and at the end); 0: never")
    g.add_argument("--keep", type=int, default=3,
                   help="checkpoints to keep, the latest ones (default 3; 0 keeps all)")
    g.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                   help="continue the run from its latest checkpoint in --out (or the file "
                        "given) with the same results as without interruption: model, "
                        "optimizer, schedule, data position and RNG are restored. Pass the "
                        "same options; only bookkeeping ones may change (--steps too, which "
                        "stretches the cosine schedule from there on)")
    g.add_argument("--eval-every", type=int, default=0,
                   help="held-out loss every N steps (and at the end); 0: only at the end")
    g.add_argument("--eval-tokens", type=int, default=65536,
                   help="held-out tokens per periodic evaluation (the final one uses all)")
    g.add_argument("--log-every", type=int, default=10, help="print a log line every N steps")
    g.add_argument("--threads", type=int, help="torch CPU threads per process")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
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
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    try:
        train(cfg)
    except (TrainError, data_lib.DataError) as e:
        print(f"rgemma train: error: {e}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0
