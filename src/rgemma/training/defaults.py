"""What ``rgemma train`` picks when a flag is not given: model shapes by name and the
learning rate. It imports no torch, so ``rgemma train --help`` can quote it.

``TRAIN_PRESETS``: small shapes for training from scratch (the vocabulary
comes from the tokenizer); the full-size ones are ``rgemma.config``'s
presets (RecurrentGemma 2B / 9B, Griffin and Hawk 7B).

``default_lr``: the peak learning rate without ``--lr``, which depends on
what is trained: a new model takes a large one, all the weights of a trained
model a small one (the from-scratch rate undoes what the checkpoint knows: on
the demo model the held-out loss rose from 3.69 to 4.33 in 60 steps), LoRA
adapters (few, zero-initialised) something in between.
"""

from __future__ import annotations

from typing import Any

from rgemma.config import PRESETS, preset_names

TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(width=64, num_layers=3, num_heads=2, mlp_width=192, attention_window=64),
    "small": dict(width=128, num_layers=6, num_heads=2, mlp_width=384, attention_window=128),
    "demo": dict(width=256, num_layers=6, num_heads=2, mlp_width=768, attention_window=256),
}

SCRATCH_LR = 3e-3  # a new model (--preset / --width)
FINE_TUNE_LR = 1e-4  # every weight of the --init checkpoint
LORA_LR = 1e-3  # LoRA adapters (--lora-rank), on --init or not


def all_preset_names() -> list[str]:
    """Every name ``--preset`` accepts: the small training shapes, then the full-size ones."""
    return list(TRAIN_PRESETS) + preset_names()


def is_preset(name: str) -> bool:
    """True for a name ``--preset`` accepts (full-size names as ``GriffinConfig.from_preset``
    reads them: any case, ``-it`` or not)."""
    return name in TRAIN_PRESETS or name.lower().removesuffix("-it") in PRESETS


def default_lr(init: str | None, lora_rank: int) -> tuple[float, str]:
    """(peak learning rate, why) for a run without ``--lr``."""
    if lora_rank:
        return LORA_LR, "the default for LoRA adapters"
    if init:
        return FINE_TUNE_LR, "the default for full fine-tuning from --init"
    return SCRATCH_LR, "the default for training from scratch"
