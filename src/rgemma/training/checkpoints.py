"""A training run's resumable record: checkpoints and the metrics log.

In the run folder ``out``:

* ``checkpoints/step-XXXXXXXX.pt``: model, optimizer, step, RNG states and
  the run's ``TrainConfig`` (as a dict), written atomically; the data
  position is the step itself, so this is all a resumed run needs;
* ``metrics.jsonl``: one JSON record per optimizer step (``step``, ``loss``,
  ``lr``... and ``eval_loss`` at evaluations); ``loss.png`` plots it.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import pickle
import random
import re
import warnings
from typing import Any

import numpy as np
import torch

from rgemma.errors import one_line
from rgemma.training.distributed import Dist, unwrap

# TrainConfig fields that may differ between the run that wrote a checkpoint and the one
# resuming it: they change where and how often things are written, not the numbers.
RESUME_MAY_CHANGE = {
    "steps",
    "out",
    "save_every",
    "keep",
    "eval_every",
    "log_every",
    "resume",
    "threads",
    "progress",
    "export",
    "export_dtype",
    "plot",
}


class ResumeError(RuntimeError):
    """A checkpoint that cannot continue this run."""


# --------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------


def checkpoint_path(out: str, step: int) -> str:
    return os.path.join(out, "checkpoints", f"step-{step:08d}.pt")


def list_checkpoints(out: str) -> list[str]:
    """The run's checkpoints, oldest first."""
    return sorted(glob.glob(os.path.join(out, "checkpoints", "step-*.pt")))


def full_state_dicts(model, optimizer, fsdp: bool) -> tuple[dict, dict]:
    """Unsharded model and optimizer state dicts on CPU; a collective call under FSDP."""
    if fsdp and torch.distributed.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_state_dict(model, optimizer, options=opts)
    return unwrap(model).state_dict(), optimizer.state_dict()


def save_checkpoint(
    path: str, model, optimizer, cfg, step: int, extra: dict[str, Any], dist: Dist
) -> None:
    """Writes everything needed to resume ``cfg``'s run at ``step``, atomically.

    Every process must call it (FSDP gathers the shards); the main one writes.
    """
    model_sd, optim_sd = full_state_dicts(model, optimizer, cfg.fsdp)
    if not dist.is_main:
        return
    payload = {
        "step": step,
        "model": model_sd,
        "optimizer": optim_sd,
        "train_config": dataclasses.asdict(cfg),
        "model_config": unwrap(model).config.to_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state(),
            "python": random.getstate(),
        },
        **extra,
    }
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(payload, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


# a temporary file of an atomic write: ``step-00000010.pt.tmp1234``, the token cache's
# ``train-KEY.npz.tmp1234.npz``, ``tokenizer.model.tmp1234`` (the number: the writer's PID)
_TEMP_FILE = re.compile(r"\.tmp(\d+)(\.npz)?$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0  # another user's process (or a PID the OS cannot name)
    return True


def remove_stale_temp_files(out: str) -> list[str]:
    """Removes the temporary files a killed run left in ``out`` (its checkpoints, token
    cache and tokenizer), those whose writer's process is gone; returns their paths."""
    removed = []
    for folder in (out, os.path.join(out, "checkpoints"), os.path.join(out, "data")):
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for name in names:
            match = _TEMP_FILE.search(name)
            path = os.path.join(folder, name)
            if match is None or _pid_alive(int(match.group(1))) or not os.path.isfile(path):
                continue
            try:
                os.remove(path)
            except FileNotFoundError:
                continue
            removed.append(path)
    return removed


def prune_checkpoints(out: str, keep: int) -> None:
    """Keeps the last ``keep`` checkpoints (0 keeps all)."""
    if keep <= 0:
        return
    for old in list_checkpoints(out)[:-keep]:
        os.remove(old)


def resume_path(resume: str | None, out: str) -> str | None:
    """The checkpoint ``--resume`` names: the file given, or the latest in ``out`` for
    "latest" (None without ``--resume``); ResumeError when there is none."""
    if not resume:
        return None
    if resume != "latest":
        if os.path.isdir(resume):
            raise ResumeError(
                f"--resume {resume}: is a folder; give a checkpoint file (step-*.pt), or "
                "--out RUN_FOLDER with a plain --resume for its latest checkpoint"
            )
        if not os.path.exists(resume):
            raise ResumeError(f"--resume {resume}: no such checkpoint file")
        if not os.path.isfile(resume):
            raise ResumeError(
                f"--resume {resume}: not a regular file (a FIFO, device or socket); "
                "give a checkpoint file (step-*.pt)"
            )
        return resume
    found = list_checkpoints(out)
    if not found:
        raise ResumeError(
            f"no checkpoint to resume in {out} ({os.path.join(out, 'checkpoints', 'step-*.pt')})"
            "; drop --resume to start a new run"
        )
    return found[-1]


def check_resumable(saved: dict[str, Any], now: dict[str, Any]) -> None:
    """The resumed run must be the same run (bar ``RESUME_MAY_CHANGE``)."""
    diff = [k for k, v in saved.items() if k not in RESUME_MAY_CHANGE and now.get(k) != v]
    if diff:
        details = ", ".join(f"{k}: {saved[k]!r} -> {now.get(k)!r}" for k in diff)
        raise ResumeError(
            f"cannot resume: the checkpoint was written by a different run "
            f"({details}); pass the same options, or start a new --out"
        )


def _previous_checkpoint(path: str) -> str | None:
    """The checkpoint written before ``path`` in its folder (None if there is none)."""
    folder = os.path.dirname(os.path.abspath(path))
    earlier = [
        p
        for p in sorted(glob.glob(os.path.join(folder, "step-*.pt")))
        if os.path.basename(p) < os.path.basename(path)
    ]
    return earlier[-1] if earlier else None


def _refusal_detail(e: BaseException) -> str:
    """The line of a weights-only refusal that names what was refused."""
    for line in str(e).splitlines():
        if "nsupported" in line or "blocked" in line:
            return " ".join(line.split())
    return type(e).__name__


# what a training checkpoint holds: key -> type
_CHECKPOINT_KEYS = {
    "step": int,
    "model": dict,
    "optimizer": dict,
    "train_config": dict,
    "rng": dict,
}


def read_checkpoint(path: str) -> dict[str, Any]:
    """A checkpoint's contents, read with ``torch.load(weights_only=True)``.

    Besides tensors and plain Python values it holds NumPy's RNG state (a
    uint32 array), so the NumPy types that array is pickled with are allowed;
    anything else (a pickle that would call a function or build another
    class) is refused, never run. ResumeError for a file that is not a
    readable rgemma training checkpoint (the message names the file and, for
    a damaged one, the previous checkpoint).
    """
    reconstruct = np.zeros(1).__reduce__()[0]
    allowed = [reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    try:
        with torch.serialization.safe_globals(allowed), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Detected pickle protocol 4..." and the like
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ResumeError(
            f"{path}: refused: it holds Python objects beyond tensors and plain values, "
            f"which could run code when loaded ({_refusal_detail(e)}); rgemma reads training "
            "checkpoints with torch.load(weights_only=True): use one rgemma wrote"
        ) from None
    except MemoryError:
        raise ResumeError(f"{path}: not enough memory to read this checkpoint") from None
    except Exception as e:  # a truncated or corrupt file: zip, pickle or storage errors
        previous = _previous_checkpoint(path)
        hint = (
            f"; resume from the previous one: --resume {previous}"
            if previous
            else "; start a new run (drop --resume)"
        )
        detail = one_line(e, limit=160)
        raise ResumeError(
            f"{path}: not a readable checkpoint, it is truncated or corrupt ({detail}){hint}"
        ) from None
    check_checkpoint(ckpt, path)
    return ckpt


def check_checkpoint(ckpt: Any, path: str) -> None:
    """ResumeError unless ``ckpt`` has a training checkpoint's entries."""
    if not isinstance(ckpt, dict):
        raise ResumeError(
            f"{path}: not an rgemma training checkpoint (it holds a {type(ckpt).__name__}); "
            "to fine-tune a model checkpoint use --init"
        )
    for key, kind in _CHECKPOINT_KEYS.items():
        if not isinstance(ckpt.get(key), kind) or (kind is int and isinstance(ckpt[key], bool)):
            raise ResumeError(
                f"{path}: not an rgemma training checkpoint (no {key!r} {kind.__name__}); "
                "to fine-tune a model checkpoint use --init"
            )
    if ckpt["step"] < 0 or not all(k in ckpt["rng"] for k in ("torch", "numpy", "python")):
        raise ResumeError(f"{path}: not an rgemma training checkpoint (bad step or RNG state)")


def load_checkpoint(path: str, model, optimizer, cfg) -> dict[str, Any]:
    """Restores model, optimizer and RNG states for ``cfg``'s run; returns the checkpoint."""
    ckpt = read_checkpoint(path)
    check_resumable(ckpt["train_config"], dataclasses.asdict(cfg))
    restore_checkpoint(ckpt, path, model, optimizer, cfg)
    return ckpt


def restore_checkpoint(ckpt: dict[str, Any], path: str, model, optimizer, cfg) -> None:
    """Loads a read checkpoint (``read_checkpoint``) into model and optimizer and restores
    the RNG states; ResumeError if they do not fit."""
    try:
        if cfg.fsdp and torch.distributed.is_initialized():
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            set_state_dict(
                model,
                optimizer,
                model_state_dict=ckpt["model"],
                optim_state_dict=ckpt["optimizer"],
                options=StateDictOptions(full_state_dict=True),
            )
        else:
            unwrap(model).load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        np.random.set_state(ckpt["rng"]["numpy"])
        random.setstate(ckpt["rng"]["python"])
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError) as e:
        detail = one_line(e, limit=200)
        raise ResumeError(
            f"{path}: does not fit this run's model and optimizer ({detail})"
        ) from None


# --------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------


def read_metrics(path: str) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` ([] when there is no such file)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(path: str, step: int) -> None:
    """Drops records after ``step`` (a resumed run writes them again)."""
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
