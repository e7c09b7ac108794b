"""Shared helpers: random weights mapped into rgemma and the reference implementations."""

from __future__ import annotations

import os

import pytest
import torch

from rgemma.config import ATTENTION, GriffinConfig
from rgemma.model import Griffin

# Quantized layers pick their product by timing on the machine (rgemma.autotune); the suite
# keeps the defaults so its numbers do not depend on the machine's load. The autotune tests
# turn it on for themselves.
os.environ.setdefault("RGEMMA_AUTOTUNE", "0")


def official_config(cfg: GriffinConfig):
    """The official ``recurrentgemma.common.GriffinConfig`` for an rgemma config."""
    from recurrentgemma import common
    kinds = {ATTENTION: common.TemporalBlockType.ATTENTION}
    return common.GriffinConfig(
        vocab_size=cfg.vocab_size, width=cfg.width, mlp_expanded_width=cfg.mlp_width,
        num_heads=cfg.num_heads,
        block_types=tuple(kinds.get(b, common.TemporalBlockType.RECURRENT) for b in cfg.block_types),
        embeddings_scale_by_sqrt_dim=cfg.embeddings_scale_by_sqrt_dim,
        attention_window_size=cfg.attention_window, logits_soft_cap=cfg.logits_soft_cap,
        lru_width=cfg.lru_width)


def official_model(cfg: GriffinConfig, seed: int = 0, noise: float = 0.1):
    """A random official torch Griffin; zero-initialised tensors (norms, biases) get noise too."""
    from recurrentgemma.torch import griffin
    torch.manual_seed(seed)
    model = griffin.Griffin(official_config(cfg), gradient_checkpointing=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * noise)
    return model.eval()


def official_pair(cfg: GriffinConfig, seed: int = 0):
    """(official model, rgemma model) holding the same random weights."""
    official = official_model(cfg, seed)
    ours = Griffin.from_official_state_dict(official.state_dict(), cfg).eval()
    return official, ours


def random_model(cfg: GriffinConfig, seed: int = 0, noise: float = 0.05) -> Griffin:
    """An rgemma model with random weights (paper init plus noise on the zero tensors)."""
    model = Griffin(cfg).init_weights(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * noise)
    return model.eval()


def tiny_config(**overrides) -> GriffinConfig:
    base = dict(vocab_size=97, width=64, mlp_width=192, num_heads=4,
                block_types=("recurrent", "recurrent", "attention") * 2,
                attention_window=8, logits_soft_cap=30.0)
    return GriffinConfig(**{**base, **overrides})


def arange_positions(batch: int, length: int) -> torch.Tensor:
    return torch.arange(length)[None].repeat(batch, 1)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(1234)
    yield
