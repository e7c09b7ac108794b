"""rgemma's native kernels (rgemma/kernels.c: int8 and bf16 weights) against a float64
reference, their build cache, and the fallback when they cannot be built."""

from __future__ import annotations

import warnings

import pytest
import torch

from helpers import arange_positions, assert_compiled_decode_matches, random_model, tiny_config
from rgemma import kernels, layers
from rgemma.layers import Linear
from rgemma.quantize import Int4Linear, Int8Linear, dequantize_int4, quantize_int8, quantize_model

needs_native = pytest.mark.skipif(
    not kernels.available(), reason="no C compiler for rgemma's kernel"
)


def _operands(M, K, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    q, scale = quantize_int8(torch.randn(N, K, generator=g))
    return x, q, scale


def _check_against_float64(y, x, q, scale):
    """Within float32 summation error: |y - ref| <= K * eps32 * (|x| @ |q|.T) * scale."""
    ref = (x.double() @ q.double().T) * scale.double()
    bound = (x.abs().double() @ q.abs().double().T) * scale.double() * x.shape[1] * 2**-23
    assert y.dtype == torch.float32 and y.shape == ref.shape
    assert ((y.double() - ref).abs() <= bound + 1e-30).all()


@needs_native
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 16])
@pytest.mark.parametrize("K,N", [(1, 1), (7, 5), (33, 6), (256, 48), (1000, 13)])
def test_int8_kernel_matches_float64_reference(M, K, N):
    """Every tile shape (rows not a multiple of the tile, K not a multiple of the
    vector length, N not a multiple of the weight-row block)."""
    x, q, scale = _operands(M, K, N)
    y = kernels.int8_matmul(x, q, scale)
    _check_against_float64(y, x, q, scale)
    torch.testing.assert_close(y, kernels.int8_matmul_reference(x, q, scale), rtol=1e-5, atol=1e-4)


def _check_bf16_against_float64(y, x, w):
    """Within float32 summation error of x @ w.T, w's bf16 values taken exactly."""
    ref = x.double() @ w.double().T
    bound = (x.abs().double() @ w.abs().double().T) * x.shape[1] * 2**-23
    assert y.dtype == torch.float32 and y.shape == ref.shape
    assert ((y.double() - ref).abs() <= bound + 1e-30).all()


@needs_native
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 16])
@pytest.mark.parametrize("K,N", [(1, 1), (7, 5), (33, 6), (256, 48), (1000, 13)])
def test_bf16_kernel_matches_float64_reference(M, K, N):
    """x stays float32: the only error is float32 summation (oneDNN's bf16 product
    rounds x to bf16, ~2^-9 relative)."""
    g = torch.Generator().manual_seed(M * 7 + K)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g).to(torch.bfloat16)
    y = kernels.bf16_matmul(x, w)
    _check_bf16_against_float64(y, x, w)
    torch.testing.assert_close(y, kernels.bf16_matmul_reference(x, w), rtol=1e-5, atol=1e-4)


@needs_native
def test_bf16_held_decode_rows_stream_through_the_kernel(monkeypatch):
    """A few float32 rows against a large bf16 weight (a decode step of a bf16-held
    model) go through the kernel and equal the float32 reference; more rows, small
    weights, or autograd keep PyTorch's product."""
    calls = []
    native = kernels.bf16_matmul
    monkeypatch.setattr(kernels, "bf16_matmul", lambda x, w: calls.append(x.shape) or native(x, w))
    lin = Linear(1024, 1100, dtype=torch.bfloat16)  # 1.1M weights
    lin.weight.data.normal_()
    lin.bias.data.normal_()
    x = torch.randn(2, 1, 1024)
    with torch.no_grad():
        y = lin(x)
        assert calls == [(2, 1024)]
        ref = torch.nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double())
        assert (y.double() - ref).abs().max().item() < 1e-4
        lin(torch.randn(layers.KERNEL_BF16_ROWS + 1, 1024))  # more rows
        Linear(64, 64, dtype=torch.bfloat16)(torch.randn(1, 64))  # a small weight
    lin(x)  # autograd on
    assert calls == [(2, 1024)]


@needs_native
def test_int8_kernel_threads_give_identical_results():
    """Each output is summed by one thread in one order: 1 or 2 threads, same bits."""
    x, q, scale = _operands(3, 2048, 301)  # above the one-thread cutoff
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.int8_matmul(x, q, scale)
        torch.set_num_threads(2)
        two = kernels.int8_matmul(x, q, scale)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    _check_against_float64(two, x, q, scale)


@needs_native
def test_int8_layer_decode_uses_float32_activations():
    """An Int8Linear's decode rows go through the native kernel: float32-exact,
    not the bf16 rounding of PyTorch's packed kernel."""
    lin = Linear(512, 64)
    lin.weight.data.normal_()
    m = Int8Linear.from_linear(lin)
    x = torch.randn(2, 512)
    with torch.no_grad():
        out = m(x)
    ref = kernels.int8_matmul_reference(x, m.qweight, m.scale) + lin.bias
    assert (out - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


def test_build_is_cached_and_atomic(tmp_path, monkeypatch):
    if kernels._compiler() is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("RGEMMA_CACHE", str(tmp_path))
    first = kernels.build()
    assert first.parent == tmp_path and first.suffix == ".so"
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temp files left
    stamp = first.stat().st_mtime_ns
    assert kernels.build() == first and first.stat().st_mtime_ns == stamp


@pytest.mark.parametrize("how", ["disabled", "broken compiler"])
def test_without_native_kernel_int8_falls_back(how, tmp_path, monkeypatch):
    """RGEMMA_NATIVE=0, or a compiler that fails: int8 layers still compute the
    same product (through PyTorch), with one warning naming the cause."""
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setattr(kernels, "_loaded", False)
    monkeypatch.setenv("RGEMMA_CACHE", str(tmp_path))
    if how == "disabled":
        monkeypatch.setenv("RGEMMA_NATIVE", "0")
    else:
        monkeypatch.setenv("CC", "false")  # exists, always fails
    lin = Linear(256, 32)
    lin.weight.data.normal_()
    m = Int8Linear.from_linear(lin)
    x = torch.randn(1, 256)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        out = m(x)
        m(x)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    if how == "disabled":
        assert messages == []
    else:
        assert len(messages) == 1 and "cannot compile" in messages[0]
        assert "RGEMMA_NATIVE=0" in messages[0]
    assert not kernels.available()
    ref = kernels.int8_matmul_reference(x, m.qweight, m.scale) + lin.bias
    assert (out - ref).abs().max().item() <= 2e-2 * ref.abs().max().item()
    assert list(tmp_path.glob("*.so")) == [] and list(tmp_path.iterdir()) == []


def test_int4_dequantized_in_place_equals_reference():
    """The reused-buffer dequantization gives dequantize_int4's values bit for bit."""
    lin = Linear(256, 40)
    lin.weight.data.normal_()
    m = Int4Linear.from_linear(lin, 64)
    from rgemma.quantize import unpack_nibbles

    ref = dequantize_int4(unpack_nibbles(m.qweight), m.scale, m.minimum, torch.float32)
    with torch.no_grad():
        fast = m.dequantized(torch.float32).clone()
        fast_bf16 = m.dequantized(torch.bfloat16).clone()
    assert torch.equal(fast, ref)
    assert torch.equal(
        fast_bf16, dequantize_int4(unpack_nibbles(m.qweight), m.scale, m.minimum, torch.bfloat16)
    )


def test_quantized_model_keeps_the_rest_in_float32():
    """What is not quantized (RG-LRU, conv, norms, biases) is float32 after
    quantize_model, even from a bf16 model, and the model computes in float32."""
    cfg = tiny_config(width=128, mlp_width=256, num_heads=2)
    model = random_model(cfg).to(torch.bfloat16)
    quantize_model(model, bits=8)
    floats = {n: p.dtype for n, p in model.named_parameters() if p.is_floating_point()}
    assert floats and set(floats.values()) == {torch.float32}
    assert any(".rg_lru." in n or "lru" in n for n in floats)
    assert model.activation_dtype == torch.float32


@needs_native
def test_int8_kernel_takes_any_float_dtype_and_layout():
    """The wrapper hands C what it expects (float32, contiguous): a bf16 scale,
    a bf16 or strided x give the float32 product of their values."""
    x, q, scale = _operands(2, 96, 10)
    xt = torch.randn(96, 2).T  # not contiguous
    for xi, si in ((x.bfloat16(), scale), (x, scale.bfloat16()), (xt, scale)):
        y = kernels.int8_matmul(xi, q, si)
        _check_against_float64(y, xi.float(), q, si.float())


@needs_native
def test_compiled_bf16_held_decode_equals_eager(monkeypatch):
    """The bf16 kernel inside a compiled decode step (the custom op rgemma::bf16_matmul)
    computes what the eager step computes; the table (8192 x 128 = 1M weights) and the
    MLP (lowered threshold) go through it."""
    monkeypatch.setattr(layers, "_KERNEL_BF16_MIN_WEIGHTS", 1 << 14)
    cfg = tiny_config(vocab_size=8192, width=128, mlp_width=256, num_heads=2)
    eager = random_model(cfg, noise=0.02).to(torch.bfloat16).set_compute_dtype(torch.float32)
    compiled = random_model(cfg, noise=0.02).to(torch.bfloat16).set_compute_dtype(torch.float32)
    compiled.compile_step()
    prompt = torch.randint(0, cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(1))
    calls = []
    native = kernels.bf16_matmul
    with torch.inference_mode(), monkeypatch.context() as spy:
        spy.setattr(kernels, "bf16_matmul", lambda x, w: calls.append(1) or native(x, w))
        eager(prompt[:, :1], arange_positions(2, 1), eager.init_state(2))
    assert len(calls) >= 1 + 2 * len(cfg.block_types)  # the table, each MLP's up and gate
    assert_compiled_decode_matches(eager, compiled, prompt, steps=3, rtol=1e-4)
