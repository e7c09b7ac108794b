"""The training loop: a plain PyTorch loop, nanoGPT style (``rgemma train`` runs it).

One step: ``grad_accum`` micro-batches of ``batch_size`` rows on each of
``world`` processes (the global batch), loss = mean cross-entropy over all
target tokens of the global batch, gradient clipping, AdamW with linear
warmup then cosine decay to ``min_lr``. Resumable checkpoints are written
every ``save_every`` steps (``checkpoints.py``); the data position is the
step itself (``data.BatchSampler``), so a resumed run gives the same
numbers as an uninterrupted one. At the end the model is exported in the
Hugging Face layout (LoRA merged), with its tokenizer.

    from rgemma.training.train import TrainConfig, train
    summary = train(TrainConfig(data=["corpus/"], preset="tiny", steps=200, out="runs/x"))
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rgemma.config import GriffinConfig
from rgemma.io.checkpoint import load as load_model
from rgemma.io.checkpoint import save_hf
from rgemma.model import Griffin
from rgemma.training import checkpoints, lora
from rgemma.training import data as data_lib
from rgemma.training.config import (  # noqa: F401  (TrainConfig and TrainError are public here)
    SHAPE_FLAGS,
    TrainConfig,
    TrainError,
    check_paths,
    flag,
    model_config,
    peak_lr,
    resolve_config,
)
from rgemma.training.distributed import Dist, init_distributed, wrap_distributed

# TrainConfig's shape fields (--width...) -> the GriffinConfig fields they set


# field -> (test, what the value must be): numbers checked before anything is read


# --------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------


def build_model(cfg: TrainConfig, vocab_size: int, log: Callable[[str], None]):
    """A freshly initialised model, or the ``--init`` checkpoint; LoRA applied."""
    if cfg.init:
        try:
            model, _ = load_model(cfg.init, dtype=torch.float32)
        except (ValueError, OSError, RuntimeError, KeyError) as e:
            raise TrainError(f"--init {cfg.init}: cannot load it ({e})") from None
        if model.config.vocab_size < vocab_size:
            raise TrainError(
                f"the tokenizer has {vocab_size} pieces but the model in "
                f"{cfg.init} only {model.config.vocab_size} embeddings"
            )
        log(f"fine-tuning {cfg.init} ({model.num_parameters():,} parameters)")
    else:
        model = Griffin(model_config(cfg, vocab_size)).init_weights(cfg.seed)
        log(
            f"new model: {model.num_parameters():,} parameters, "
            f"{model.config.num_layers} layers, width {model.config.width}"
        )
    model = model.float()
    if cfg.lora_rank:
        adapted = lora.apply_lora(
            model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, seed=cfg.seed
        )
        n = sum(p.numel() for p in lora.lora_parameters(model))
        log(f"LoRA rank {cfg.lora_rank} on {len(adapted)} layers: {n:,} trainable parameters")
    model.gradient_checkpointing = cfg.grad_checkpointing
    return model


def plain_model_like(config: GriffinConfig, cfg: TrainConfig):
    """An unsharded CPU model of this run's structure (LoRA layers included)."""
    model = Griffin(config)
    if cfg.lora_rank:
        lora.apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, seed=cfg.seed)
    return model


def make_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on norms, biases, recurrent_param)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise TrainError("the model has no trainable parameters")
    decay = [p for n, p in params if p.ndim >= 2]
    no_decay = [p for n, p in params if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=peak_lr(cfg), betas=(cfg.beta1, cfg.beta2), eps=1e-8)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from lr to min_lr * lr."""
    lr = peak_lr(cfg)
    if cfg.warmup and step < cfg.warmup:
        return lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / span)
    floor = lr * cfg.min_lr
    return floor + 0.5 * (lr - floor) * (1 + math.cos(math.pi * progress))


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
            "accurate; train with --dtype float32"
        )
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
    logits, _ = model(batch["tokens"], batch["positions"])  # rows start from an empty state
    ce = F.cross_entropy(
        logits.float().flatten(0, 1), batch["targets"].flatten(), reduction="none"
    ).view_as(batch["weights"])
    return ce * batch["weights"]


@torch.no_grad()
def evaluate(
    model, rows: data_lib.PackedRows, cfg: TrainConfig, dist: Dist, max_tokens: int | None
) -> float:
    """Mean held-out loss (nats per target token) over evenly spaced rows."""
    n = len(rows)
    if max_tokens:
        n = min(n, max(1, max_tokens // cfg.seq_len))
    picks = np.unique(np.linspace(0, len(rows) - 1, n).round().astype(np.int64))
    mine = picks[dist.rank :: dist.world]
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    with autocast_context(cfg):
        for i in range(0, len(mine), cfg.batch_size):
            batch = to_tensors(rows.batch(mine[i : i + cfg.batch_size]), cfg.device)
            total += float(token_losses(model, batch).sum())
            count += float(batch["weights"].sum())
    model.train(was_training)
    total, count = dist.sum(total), dist.sum(count)
    return total / max(count, 1.0)


# --------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------


def export_hf(
    model, directory: str, tokenizer_paths: list[str], *, dtype: torch.dtype = torch.float32
) -> str:
    """Writes a Hugging Face checkpoint directory with ``checkpoint.save_hf``.

    LoRA adapters are merged (in a copy) first; the tokenizer files are
    copied along. The write is atomic (an existing ``directory`` is replaced).
    """
    if lora.has_lora(model):
        model = lora.merge(copy.deepcopy(model))
    with tempfile.TemporaryDirectory() as staging:
        for path in tokenizer_paths:
            name = "tokenizer.model" if path.endswith(".model") else os.path.basename(path)
            shutil.copyfile(path, os.path.join(staging, name))
        save_hf(model, directory, dtype=dtype, tokenizer_dir=staging, overwrite=True)
    return directory


# --------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------


def train_step(
    model, optimizer, batches: list[dict[str, torch.Tensor]], cfg: TrainConfig, dist: Dist, ctx
) -> tuple[float, float]:
    """One optimizer step on this process's micro-batches: (loss, gradient norm).

    ``batches``: ``grad_accum`` dicts of [batch_size, T] tensors (``to_tensors``).
    The loss is the mean cross-entropy over the target tokens of the whole
    global batch (every micro-batch of every process).
    """
    global_weight = max(dist.sum(sum(float(b["weights"].sum()) for b in batches)), 1.0)
    loss_sum = 0.0
    for m, batch in enumerate(batches):
        # DDP all-reduces gradients in backward: only the last micro-batch needs to
        last = m == len(batches) - 1
        no_sync = dist.enabled and not cfg.fsdp and not last
        with model.no_sync() if no_sync else contextlib.nullcontext(), ctx:
            local = token_losses(model, batch).sum()
            # DDP averages gradients over ranks: scale so they sum to d(mean loss).
            (local * (dist.world / global_weight)).backward()
        loss_sum += float(local.detach())
    loss = dist.sum(loss_sum) / global_weight
    trainable = [p for p in model.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.clip if cfg.clip > 0 else math.inf)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, float(grad_norm)


def read_resume_checkpoint(cfg: TrainConfig) -> tuple[str | None, dict | None]:
    """(path, contents) of the checkpoint ``--resume`` names, checked to be this run's
    ((None, None) without ``--resume``); TrainError otherwise. Reads nothing else."""
    try:
        path = checkpoints.resume_path(cfg.resume, cfg.out)
        if path is None:
            return None, None
        ckpt = checkpoints.read_checkpoint(path)
        checkpoints.check_resumable(ckpt["train_config"], dataclasses.asdict(cfg))
    except checkpoints.ResumeError as e:
        raise TrainError(str(e)) from None
    return path, ckpt


def restore(path: str, ckpt: dict, cfg: TrainConfig, model, optimizer) -> None:
    """Loads a checkpoint of ``read_resume_checkpoint`` into model and optimizer."""
    try:
        checkpoints.restore_checkpoint(ckpt, path, model, optimizer, cfg)
    except checkpoints.ResumeError as e:
        raise TrainError(str(e)) from None


class StopSignal:
    """SIGINT (Ctrl-C) or SIGTERM while the loop runs: the step in progress finishes, a
    checkpoint is written and the run stops (``signum`` says which came). A second
    signal stops at once (KeyboardInterrupt). Installed only in the main thread, and not
    over a signal the process was started ignoring (a shell's background job, nohup)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            self.restore()
            raise KeyboardInterrupt
        self.signum = signum


def log_line(record: dict[str, Any], steps: int) -> str:
    """The log line of a step's metrics record."""
    line = (
        f"step {record['step']}/{steps} loss {record['loss']:.4f} lr {record['lr']:.2e} "
        f"gnorm {record['grad_norm']:.2f} tok/s {record['tokens_per_s']:.0f} "
        f"elapsed {record['elapsed']:.0f}s"
    )
    if "eval_loss" in record:
        line += f" eval {record['eval_loss']:.4f}"
    return line


def train(cfg: TrainConfig, on_step: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    """Runs (or resumes) a training run; returns a summary.

    ``on_step(step, record)`` is called after every optimizer step (after any
    checkpoint of that step is written).
    """
    cfg, lr_note = resolve_config(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dist = init_distributed(cfg.device)
    if cfg.device.startswith("cuda") and dist.enabled:
        cfg = dataclasses.replace(cfg, device=f"cuda:{dist.local_rank}")
    log = print if dist.is_main else (lambda *a, **k: None)
    resume_file, ckpt = read_resume_checkpoint(cfg)
    if dist.is_main:
        stale = checkpoints.remove_stale_temp_files(cfg.out)
        if stale:
            log(f"removed {len(stale)} temporary file(s) of a stopped run: {', '.join(stale)}")
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    data = data_lib.prepare_data(cfg, dist, log)
    os.makedirs(cfg.out, exist_ok=True)
    stats = data.stats
    skipped = (
        f" ({stats['skipped_files']} files skipped: not UTF-8, or not regular files)"
        if stats.get("skipped_files")
        else ""
    )
    log(
        f"data: {stats['train_documents']} train / {stats['eval_documents']} held-out "
        f"documents, {stats['train_tokens']:,} / {stats['eval_tokens']:,} tokens{skipped}"
    )
    model = build_model(cfg, data.tokenizer.vocab_size, log).to(cfg.device)
    model.train()
    log(lr_note)
    try:
        dmodel = wrap_distributed(model, dist, fsdp=cfg.fsdp, device=cfg.device)
    except ImportError as e:  # torch < 2.6 has no torch.distributed.fsdp.fully_shard
        raise TrainError(f"--fsdp needs torch >= 2.6 ({e})") from None
    optimizer = make_optimizer(dmodel, cfg)
    ctx = autocast_context(cfg)
    global_rows = cfg.batch_size * cfg.grad_accum * dist.world
    sampler = data_lib.BatchSampler(len(data.train), global_rows, cfg.seed)
    metrics_path = os.path.join(cfg.out, "metrics.jsonl")
    plot_path = os.path.join(cfg.out, "loss.png")

    step, tokens_seen, elapsed_before = 0, 0, 0.0
    if ckpt is not None:
        restore(resume_file, ckpt, cfg, dmodel, optimizer)
        step, tokens_seen = ckpt["step"], int(ckpt.get("tokens_seen", 0))
        elapsed_before = float(ckpt.get("elapsed", 0.0))
        ckpt = None  # the tensors now live in the model and the optimizer
        log(f"resumed from {resume_file} at step {step}")
    if dist.is_main:
        if resume_file is not None:
            checkpoints.truncate_metrics(metrics_path, step)
        else:
            open(metrics_path, "w").close()
        model_stats = {
            "model_parameters": model.num_parameters(),
            "model_config": model.config.to_dict(),
        }
        with open(os.path.join(cfg.out, "data_stats.json"), "w") as f:
            json.dump({**stats, **model_stats}, f, indent=2)

    bar = None
    if dist.is_main and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(
            total=cfg.steps,
            initial=step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            mininterval=1.0,
        )
    t_start = time.time()
    t_window, tok_window = time.time(), 0
    last_eval = None
    stop = StopSignal().install()
    stopped: dict[str, Any] | None = None
    try:
        while step < cfg.steps:
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # global batch [grad_accum, world, batch_size]: this process takes its column
            rows = sampler.rows(step).reshape(cfg.grad_accum, dist.world, cfg.batch_size)
            batches = [to_tensors(data.train.batch(r), cfg.device) for r in rows[:, dist.rank]]
            loss, grad_norm = train_step(dmodel, optimizer, batches, cfg, dist, ctx)
            step += 1
            tokens_seen += global_rows * cfg.seq_len
            tok_window += global_rows * cfg.seq_len

            record = dict(step=step, loss=loss, lr=lr, grad_norm=grad_norm, tokens=tokens_seen)
            record["epoch"] = round(sampler.epoch_of(step), 4)
            at_eval = cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps)
            if at_eval and data.eval is not None:
                last_eval = evaluate(dmodel, data.eval, cfg, dist, cfg.eval_tokens)
                record["eval_loss"] = last_eval
            now = time.time()
            record["tokens_per_s"] = tok_window / max(now - t_window, 1e-9)
            record["elapsed"] = elapsed_before + now - t_start
            logged = step % max(cfg.log_every, 1) == 0
            if logged:
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
                if logged or "eval_loss" in record:
                    (bar.write if bar is not None else print)(log_line(record, cfg.steps))
                    sys.stdout.flush()
                if cfg.plot and "eval_loss" in record:
                    baseline = stats.get("unigram_eval_loss")
                    checkpoints.plot_metrics(metrics_path, plot_path, baseline)
            # every process stops at the same step: a signal on any of them counts
            stopping = dist.sum(float(stop.signum is not None)) > 0
            saved = cfg.save_every and (step % cfg.save_every == 0 or step == cfg.steps)
            path = checkpoints.checkpoint_path(cfg.out, step)
            if saved or stopping:
                extra = {"tokens_seen": tokens_seen, "elapsed": record["elapsed"]}
                checkpoints.save_checkpoint(path, dmodel, optimizer, cfg, step, extra, dist)
                if dist.is_main:
                    checkpoints.prune_checkpoints(cfg.out, cfg.keep)
            if on_step is not None:
                on_step(step, record)
            if stopping:
                signum = stop.signum or signal.SIGTERM
                stopped = dict(step=step, checkpoint=path, signal=int(signum))
                break
    finally:
        stop.restore()
    if bar is not None:
        bar.close()
    if stopped is not None:  # no final evaluation or export: the run is not over
        dist.barrier()
        return dict(
            stopped=True, tokens=tokens_seen, train_config=dataclasses.asdict(cfg), **stopped
        )

    elapsed = elapsed_before + time.time() - t_start
    summary = dict(
        step=step, tokens=tokens_seen, elapsed=elapsed, train_config=dataclasses.asdict(cfg)
    )
    records = checkpoints.read_metrics(metrics_path) if dist.is_main else []
    if records:
        summary["final_train_loss"] = records[-1]["loss"]
    if data.eval is not None:
        summary["eval_loss"] = evaluate(dmodel, data.eval, cfg, dist, None)
        summary["eval_perplexity"] = math.exp(summary["eval_loss"])
        summary["unigram_eval_loss"] = stats.get("unigram_eval_loss")
    final_sd = None
    if cfg.fsdp and dist.enabled:  # collective: every process takes part
        final_sd, _ = checkpoints.full_state_dicts(dmodel, optimizer, cfg.fsdp)
    if dist.is_main:
        if cfg.plot:
            baseline = stats.get("unigram_eval_loss")
            summary["plot"] = checkpoints.plot_metrics(metrics_path, plot_path, baseline)
        if cfg.export:
            final = model
            if final_sd is not None:  # FSDP: a plain copy built from the gathered weights
                final = plain_model_like(model.config, cfg)
                final.load_state_dict(final_sd)
            dtype = getattr(torch, cfg.export_dtype)
            export_dir = os.path.join(cfg.out, "model")
            summary["export"] = export_hf(final, export_dir, data.tokenizer_files, dtype=dtype)
            log(f"exported {summary['export']}")
        with open(os.path.join(cfg.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        log(json.dumps(summary))
    dist.barrier()
    return summary
