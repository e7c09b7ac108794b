"""Weight-only int8 / int4: kernels against the float reference, models against bf16."""

from __future__ import annotations

import pytest
import torch

from helpers import arange_positions, assert_compiled_decode_matches, random_model, tiny_config
from rgemma import autotune, layers, quantize
from rgemma.layers import Linear
from rgemma.quantize import (
    Int4Linear,
    Int8Linear,
    QuantizationError,
    dequantize_int4,
    dequantize_int8,
    pack_nibbles,
    quantize_int4,
    quantize_int8,
    quantize_model,
    quantized_bytes,
    unpack_nibbles,
)


def test_int8_round_trip_error_bound():
    w = torch.randn(64, 96)
    q, scale = quantize_int8(w)
    err = (dequantize_int8(q, scale) - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-6).all()  # at most half a step per channel


def test_int4_round_trip_error_bound_and_packing():
    w = torch.randn(32, 256)
    q, scale, lo = quantize_int4(w, 64)
    assert int(q.max()) <= 15
    assert torch.equal(unpack_nibbles(pack_nibbles(q)), q)
    err = (dequantize_int4(q, scale, lo) - w).abs().reshape(32, 4, 64)
    assert (err <= scale[..., None] / 2 + 1e-5).all()
    with pytest.raises(QuantizationError, match="not divisible"):
        quantize_int4(torch.randn(4, 100), 64)


def test_quantize_cli_of_a_bf16_checkpoint_equals_quantizing_a_float32_copy(tmp_path):
    """`rgemma quantize` holds a bf16 checkpoint as bf16 (half the memory of float32) and
    writes what quantizing its exact float32 widening gives."""
    from rgemma.cli import main
    from rgemma.io import checkpoint

    cfg = tiny_config(width=128, mlp_width=256, num_heads=2, vocab_size=128)
    checkpoint.save_hf(random_model(cfg).to(torch.bfloat16), tmp_path / "src")
    assert main(["quantize", str(tmp_path / "src"), str(tmp_path / "q4"), "--bits", "4"]) == 0
    written, _ = checkpoint.load(tmp_path / "q4")
    widened, _ = checkpoint.load(tmp_path / "src", dtype=torch.float32)
    expected = quantize_model(widened, bits=4).state_dict()
    got = written.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got)


@pytest.mark.parametrize("bits", [8, 4])
def test_layers_quantize_block_by_block_as_one_whole_quantization(bits, monkeypatch):
    """set_weight quantizes a few rows at a time (no weight-sized temporaries); the buffers
    hold what one quantization of the whole weight gives."""
    g = torch.Generator().manual_seed(3)
    lin = torch.nn.Linear(256, 40, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(40, 256, generator=g).to(torch.bfloat16))
    monkeypatch.setattr(quantize, "_QUANTIZE_BLOCK_WEIGHTS", 3 * 256 + 5)  # 3 rows, 14 blocks
    assert len(list(quantize.row_blocks(lin.weight))) == 14
    if bits == 8:
        layer = Int8Linear.from_linear(lin)
        q, scale = quantize_int8(lin.weight)
        assert torch.equal(layer.qweight, q) and torch.equal(layer.scale, scale)
    else:
        layer = Int4Linear.from_linear(lin, 64)
        q, scale, lo = quantize_int4(lin.weight, 64)
        assert torch.equal(layer.qweight, pack_nibbles(q))
        assert torch.equal(layer.scale, scale) and torch.equal(layer.minimum, lo)


@pytest.mark.parametrize("rows", [1, 3, 40])
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_linear_matches_dequantized_reference(bits, rows):
    """Packed kernels (few rows) and the dequantizing path (many rows) both equal
    x @ dequantize(W).T up to the bf16 rounding of the activations."""
    lin = Linear(256, 48)
    lin.weight.data.normal_()
    x = torch.randn(rows, 256)
    if bits == 8:
        m = Int8Linear.from_linear(lin)
        w = dequantize_int8(m.qweight, m.scale)
    else:
        m = Int4Linear.from_linear(lin, 64)
        w = m.dequantized()
    ref = x @ w.T + lin.bias
    with torch.no_grad():  # inference: packed kernels / reused buffers
        out = m(x)
    tol = 2e-2 * ref.abs().max().item()  # bf16 activations (packed kernels, native bf16)
    assert (out - ref).abs().max().item() <= tol
    exact = x @ lin.weight.T + lin.bias  # and close to the float layer itself
    assert (out - exact).abs().max().item() <= (0.05 if bits == 8 else 0.3) * exact.abs().max()


# Error ratios to bf16 over token seeds 0..9: int8 3.0-6.6, int4 41-76 (the max over
# logits is noisy; the inputs were once unseeded, so the old bounds 4 and 60 held by
# luck). The bounds below hold for all ten.
@pytest.mark.parametrize("bits,ratio", [(8, 8.0), (4, 100.0)])
def test_quantized_model_close_to_float(bits, ratio, monkeypatch):
    """Logit error against float32 stays within a stated multiple of the error that
    merely holding the weights in bfloat16 causes (prefill in float32)."""
    monkeypatch.setattr(layers, "LOW_PRECISION_ROWS", 4)
    cfg = tiny_config(width=128, mlp_width=256, num_heads=2, attention_window=16)
    model = random_model(cfg, noise=0.02)
    tokens = torch.randint(0, cfg.vocab_size, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, _ = model(tokens, arange_positions(1, 24))
        bf16 = random_model(cfg, noise=0.02).to(torch.bfloat16).set_compute_dtype(torch.float32)
        bf16_err = (bf16(tokens, arange_positions(1, 24))[0] - ref).abs().max().item()
        tol = ratio * bf16_err
        before = quantized_bytes(model)
        quantize_model(model, bits=bits, group_size=64)
        out, _ = model(tokens, arange_positions(1, 24))
        # decode path (packed kernels) agrees with prefill path
        state = model.init_state(1)
        steps = [model(tokens[:, t : t + 1], torch.tensor([[t]]), state)[0] for t in range(24)]
    assert quantized_bytes(model) < before / (3 if bits == 8 else 4)
    err = (out - ref).abs().max().item()
    print(f"int{bits}: max |logit error| {err:.4f}, bf16-held weights: {bf16_err:.4f}")
    assert err < tol
    assert (torch.cat(steps, 1) - out).abs().max().item() < tol / 2
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_quantize_cli_round_trip(tmp_path):
    """`rgemma quantize` writes a directory that loads back quantized with equal logits."""
    from rgemma.cli import main
    from rgemma.io import checkpoint

    cfg = tiny_config(width=128, mlp_width=256, num_heads=2, vocab_size=128)
    model = random_model(cfg)
    checkpoint.save_hf(model, tmp_path / "src")
    assert main(["quantize", str(tmp_path / "src"), str(tmp_path / "q8"), "--bits", "8"]) == 0
    assert main(["quantize", str(tmp_path / "src"), str(tmp_path / "q8"), "--bits", "8"]) == 2
    loaded, _ = checkpoint.load(tmp_path / "q8")
    direct, _ = checkpoint.load(tmp_path / "src", quantize=8)
    assert loaded.quantization["bits"] == 8
    tokens = torch.randint(0, cfg.vocab_size, (1, 10))
    with torch.no_grad():
        a, _ = loaded(tokens, arange_positions(1, 10))
        b, _ = direct(tokens, arange_positions(1, 10))
    assert torch.equal(a, b)
    assert main(["quantize", str(tmp_path / "missing"), str(tmp_path / "q4"), "--bits", "4"]) == 2
    assert not (tmp_path / "q4").exists()


@pytest.mark.parametrize("bits", [8, 4])
def test_compiled_quantized_decode_equals_eager(bits):
    """torch.compile lowers the packed int8 / int4 kernels in the decode step:
    the compiled step gives the eager step's logits."""
    cfg = tiny_config(width=128, mlp_width=256, num_heads=2, attention_window=16)
    eager = quantize_model(random_model(cfg, noise=0.02), bits=bits, group_size=64)
    compiled = quantize_model(random_model(cfg, noise=0.02), bits=bits, group_size=64)
    for model in (eager, compiled):  # the weight-only kernels, whatever tuning chose
        for layer in model.modules():
            if isinstance(layer, (Int8Linear, Int4Linear)):
                layer.paths = {b: "kernel" for b in autotune.ROW_BUCKETS}
    compiled.compile_step()
    prompt = torch.randint(0, cfg.vocab_size, (2, 6))
    # bf16 activations in the kernels: fused code rounds at other places
    assert_compiled_decode_matches(eager, compiled, prompt, steps=4, rtol=1e-2)
