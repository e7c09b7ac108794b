"""LoRA: adapters start as the identity, train alone, and merge exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rgemma.config import GriffinConfig, griffin_pattern
from rgemma.model import Griffin
from rgemma.training import lora


def _model(seed: int = 0) -> Griffin:
    cfg = GriffinConfig(
        vocab_size=64,
        width=32,
        mlp_width=64,
        num_heads=2,
        block_types=griffin_pattern(3),
        attention_window=16,
    )
    return Griffin(cfg).init_weights(seed)


def _inputs():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 64, (2, 20), generator=g)
    return tokens, torch.arange(20).repeat(2, 1)


def test_parse_targets():
    assert lora.parse_targets("attention") == lora.ATTENTION_TARGETS
    assert lora.parse_targets("q_proj, mlp") == ("q_proj",) + lora.MLP_TARGETS
    assert set(lora.parse_targets("all")) == set(lora.ALL_TARGETS)
    with pytest.raises(ValueError, match="unknown LoRA target"):
        lora.parse_targets("qproj")


def test_fresh_adapters_change_nothing_and_only_they_train():
    model = _model()
    tokens, pos = _inputs()
    with torch.no_grad():
        before, _ = model(tokens, pos)
    names = lora.apply_lora(model, rank=4, targets="all")
    assert len(names) == 3 * 3 + 2 * 3 + 1 * 4  # MLPs, recurrent, attention
    with torch.no_grad():
        after, _ = model(tokens, pos)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if "lora_" in n}
    assert len(lora.lora_parameters(model)) == 2 * len(names)


def test_merged_model_equals_adapter_model():
    model = _model()
    base_names = [n for n, _ in model.named_parameters()]
    lora.apply_lora(model, rank=4, alpha=8, targets="all", seed=1)
    tokens, pos = _inputs()
    # train the adapters a little so B != 0
    opt = torch.optim.AdamW(lora.lora_parameters(model), lr=1e-2)
    for _ in range(5):
        logits, _ = model(tokens, pos)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()
        )
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert any(
        float(p.detach().abs().max()) > 0 for n, p in model.named_parameters() if "lora_B" in n
    )
    with torch.no_grad():
        adapted, _ = model(tokens, pos)
    lora.merge(model)
    assert not lora.has_lora(model)
    from rgemma.layers import Linear

    assert all(
        type(getattr(model.layers[0].mlp_block, n)) is Linear
        for n in ("gate_proj", "up_proj", "down_proj")
    )
    assert [n for n, _ in model.named_parameters()] == base_names
    with torch.no_grad():
        merged, _ = model(tokens, pos)
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)


def test_lora_linear_math():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = lora.LoRALinear.from_linear(base, rank=2, alpha=3.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 6)
    expected = base(x) + (x @ layer.lora_A.T @ layer.lora_B.T) * 1.5
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.merged()(x), expected, rtol=1e-5, atol=1e-6)
    assert layer.weight is base.weight and not layer.weight.requires_grad
