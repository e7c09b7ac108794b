"""The CPU decode step as a plan of prepared native calls (rgemma/step_plan.py) against
the modules' own step: the same logits and states bit for bit, rebuilt when the model's
tensors change, shared by views of one state, and holding no finished state."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from helpers import random_model, tiny_config
from rgemma import autotune, kernels, layers, step_plan
from rgemma.quantize import Int4Linear, Int8Linear, quantize_model

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C compiler for the kernels")


def _model(system: str, monkeypatch) -> torch.nn.Module:
    """A tiny model whose step products all have a native call: bf16-held (every bf16
    weight streamed), int8, or int4 (every layer on the W4A8 kernel)."""
    model = random_model(tiny_config())
    if system == "bf16":
        monkeypatch.setattr(layers, "_KERNEL_BF16_MIN_WEIGHTS", 0)
        return model.to(torch.bfloat16).set_compute_dtype(torch.float32)
    model = quantize_model(model, bits=int(system[3:]), group_size=32)
    for module in model.modules():
        if isinstance(module, Int4Linear):
            module.paths = {b: "w4a8" for b in autotune.ROW_BUCKETS if b <= step_plan.MAX_ROWS}
    return model


def _decode(model, batch: int, steps: int = 24, plan: bool = True):
    """Logits of ``steps`` decode steps after a 3-token prompt, and the state. Row 0
    starts a new document at step 10; the last row is fed padding at step 5."""
    step_plan.ENABLED = plan
    try:
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, model.config.vocab_size, (batch, 3 + steps), generator=g)
        state = model.init_state(batch)
        logits = []
        with torch.inference_mode():
            model(tokens[:, :3], torch.arange(3).expand(batch, 3), state)
            for t in range(3, 3 + steps):
                positions = torch.full((batch, 1), t)
                positions[0] = t - 13 if t >= 13 else positions[0]
                if t == 8:
                    positions[-1] = -1
                out, _ = model(tokens[:, t : t + 1], positions, state, logits="last")
                logits.append(out)
        return torch.stack(logits), state
    finally:
        step_plan.ENABLED = True


@pytest.mark.parametrize("system", ["bf16", "int8", "int4"])
@pytest.mark.parametrize("batch", [1, 3])
def test_plan_step_equals_the_modules_step_bit_for_bit(system, batch, monkeypatch):
    model = _model(system, monkeypatch)
    ref_logits, ref_state = _decode(model, batch, plan=False)
    logits, state = _decode(model, batch)
    assert torch.equal(logits, ref_logits)
    for name, t in ref_state.tensors().items():
        assert torch.equal(state.tensors()[name], t), name


def test_plan_step_calls_no_linear_module(monkeypatch):
    """In a plan, an int8 model's products are bound native calls: the only linear
    module a step calls is the logits' table, outside the plan."""
    model = _model("int8", monkeypatch)
    calls = []
    forward = Int8Linear.forward
    monkeypatch.setattr(Int8Linear, "forward", lambda self, x: calls.append(1) or forward(self, x))
    _decode(model, 1, steps=2, plan=False)
    per_call = 1 + sum(isinstance(m, Int8Linear) for m in model.layers.modules())
    assert len(calls) == 3 * per_call  # the prompt, then two steps
    calls.clear()
    _decode(model, 1, steps=2)
    assert len(calls) == per_call + 2


def _step_both_ways(model, state, token, position):
    """(plan step's logits, modules' step's logits) from the same state, which ends as the
    plan step left it."""
    before = state.clone()
    with torch.inference_mode():
        step_plan.ENABLED = False
        ref, _ = model(token, position, state, logits="last")
        state.copy_(before)  # in place: the same addresses, so the same plan
        step_plan.ENABLED = True
        got, _ = model(token, position, state, logits="last")
    return got, ref


def test_plan_is_rebuilt_when_the_weights_change(monkeypatch):
    """Weights loaded into the model (new tensors), changed in place, or a swapped layer:
    the next step on the same state uses them, as the modules' step does."""
    model = _model("int8", monkeypatch)
    other = quantize_model(random_model(tiny_config(), seed=5), bits=8)
    state = model.init_state(2)
    token, position = torch.ones(2, 1, dtype=torch.long), torch.full((2, 1), 0)
    got, ref = _step_both_ways(model, state, token, position)  # a plan on the old weights
    assert torch.equal(got, ref)
    swapped = other.layers[4].mlp_block.down_proj
    changes = [
        lambda: model.load_state_dict(other.state_dict(), assign=True),
        lambda: model.layers[0].mlp_block.up_proj.qweight.mul_(-1),
        lambda: setattr(model.layers[1].mlp_block, "down_proj", swapped),
    ]
    for i, change in enumerate(changes):
        with torch.no_grad():
            change()
        got, ref = _step_both_ways(model, state, token, position + i + 1)
        assert torch.equal(got, ref), i


def test_views_of_one_state_share_a_plan_and_a_plan_keeps_no_state(monkeypatch):
    """The engine steps ``state.head(k)``, new views of one batch state each time: they
    get the same plan. A plan holds a state by address only, so a finished state is
    freed."""
    model = _model("int8", monkeypatch)
    plans = step_plan.Plans()
    state = model.init_state(4)
    assert plans.get(model, state.head(2)) is plans.get(model, state.head(2))
    assert plans.get(model, state.head(3)) is not plans.get(model, state.head(2))
    probe = weakref.ref(state.layers[0].h)
    del state
    gc.collect()
    assert probe() is None


def test_bound_kernels_refuse_tensors_they_cannot_take_by_address():
    """A bound call takes addresses: a non-contiguous tensor gets None (the plan then
    uses the module), a contiguous one the kernel's result."""
    x, w = torch.randn(8, 3), torch.randn(3)
    y = torch.empty(3, 3)
    assert kernels.rms_norm_into(x[::2].T.contiguous().T, w, 1e-6, y) is None
    xc = x[:3].contiguous()
    kernels.rms_norm_into(xc, w, 1e-6, y)()
    assert torch.equal(y, kernels.rms_norm(xc, w, 1e-6))


def test_plans_on_replaced_weights_are_dropped_and_free_them(monkeypatch):
    """Plans bind the weights they were built on; once the model holds others, the next
    plan built drops every plan on the old ones, so the old weights are freed."""
    model = _model("int8", monkeypatch)
    plans = step_plan.Plans()
    monkeypatch.setattr(step_plan, "PLANS", plans)
    for batch in (1, 2):
        _decode(model, batch, steps=1)
    probe = weakref.ref(model.layers[0].mlp_block.up_proj.qweight)
    other = quantize_model(random_model(tiny_config(), seed=5), bits=8)
    model.load_state_dict(other.state_dict(), assign=True)
    _decode(model, 3, steps=1)  # a new plan (another batch size)
    gc.collect()
    assert probe() is None
