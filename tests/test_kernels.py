"""rgemma's native kernels (rgemma/kernels.c: int8 and bf16 weights) against a float64
reference, their build cache, and the fallback when they cannot be built."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from helpers import arange_positions, assert_compiled_decode_matches, random_model, tiny_config
from rgemma import kernels, layers, step_plan
from rgemma.layers import Linear
from rgemma.quantize import (
    Int4Linear,
    Int8Linear,
    dequantize_int4,
    pack_nibbles,
    quantize_int4,
    quantize_int8,
    quantize_model,
    quantize_rows_int8,
)
from rgemma.state import RecurrentLayerState

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
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 6, 7, 16])
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
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 6, 7, 16])
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
    model, batched too where the CPU lacks native bf16) go through the kernel and
    equal the float32 reference; more rows or autograd keep PyTorch's product, and
    so do small weights where the CPU has native bf16."""
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
        most = torch.randn(layers.KERNEL_BF16_ROWS, 1024)  # the most rows it takes
        y = lin(most)
        ref = torch.nn.functional.linear(most.double(), lin.weight.double(), lin.bias.double())
        assert (y.double() - ref).abs().max().item() < 1e-4
        lin(torch.randn(layers.KERNEL_BF16_ROWS + 1, 1024))  # more rows
        Linear(64, 64, dtype=torch.bfloat16)(torch.randn(1, 64))  # a small weight
    lin(x)  # autograd on
    small = [] if layers.NATIVE_BF16 else [(1, 64)]
    assert calls == [(2, 1024), (layers.KERNEL_BF16_ROWS, 1024), *small]


def _rows_and_product(kind, M, K, N):
    """x [M, K] and the int8 or bf16 kernel's product of rows of x with a random
    weight [N, K]."""
    x, q, scale = _operands(M, K, N)
    if kind == "int8":
        return x, lambda rows: kernels.int8_matmul(rows, q, scale)
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    return x, lambda rows: kernels.bf16_matmul(rows, w)


@needs_native
@pytest.mark.parametrize("kind", ["int8", "bf16"])
def test_a_row_s_product_does_not_depend_on_the_batch(kind):
    """Every tile shape (one row, a few, many) sums each output over K in the same
    order, so a row's output is the same bits alone as in any batch: a request
    served in a batch gets what it would get alone."""
    x, product = _rows_and_product(kind, 7, 1000, 301)
    alone = torch.cat([product(x[i : i + 1]) for i in range(7)])
    for rows in range(2, 8):
        assert torch.equal(product(x[:rows]), alone[:rows]), rows


@needs_native
@pytest.mark.parametrize("kind", ["int8", "bf16"])
def test_a_row_that_is_not_finite_spoils_only_itself(kind):
    """A row holding NaN or inf gives NaN or inf outputs; the rows beside it, in
    the same tiles, get what they get alone."""
    x, product = _rows_and_product(kind, 5, 1000, 37)
    x[1, 7], x[3, 500] = float("nan"), float("inf")
    y = product(x)
    assert y[1].isnan().all() and not y[3].isfinite().any()
    for i in (0, 2, 4):
        assert torch.equal(y[i], product(x[i : i + 1])[0])


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


@pytest.mark.parametrize("native", [True, False])
def test_int4_dequantized_in_place_equals_reference(native, monkeypatch):
    """The reused-buffer dequantization gives dequantize_int4's values bit for bit, in
    float32 and in bf16 (rounded after each operation), by the native one-pass kernel
    (bf16, where it is built) and by PyTorch's ops in place."""
    if native and not kernels.available():
        pytest.skip("no C compiler for rgemma's kernel")
    monkeypatch.setattr(kernels, "available", lambda: native)
    calls = []
    one_pass = kernels.dequantize_int4_bf16
    monkeypatch.setattr(kernels, "dequantize_int4_bf16", lambda *a: calls.append(1) or one_pass(*a))
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
    assert len(calls) == native


def test_reused_buffers_serve_inference_mode_and_no_grad_alike():
    """A buffer first made under inference_mode is written again under no_grad (a
    generation, then a perplexity run in the same process): the same values, no error."""
    lin = Linear(128, 24)
    lin.weight.data.normal_()
    m = Int4Linear.from_linear(lin, 64)
    with torch.inference_mode():
        first = m.dequantized(torch.float32).clone()
    with torch.no_grad():
        assert torch.equal(m.dequantized(torch.float32), first)


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
        spy.setattr(step_plan, "ENABLED", False)  # the modules' step (a plan binds the same)
        eager(prompt[:, :1], arange_positions(2, 1), eager.init_state(2))
    assert len(calls) >= 1 + 2 * len(cfg.block_types)  # the table, each MLP's up and gate
    assert_compiled_decode_matches(eager, compiled, prompt, steps=3, rtol=1e-4)


def _random_recurrent_block(L: int, H: int, dtype: torch.dtype) -> layers.RecurrentBlock:
    block = layers.RecurrentBlock(width=16, lru_width=L, num_heads=H, conv1d_width=4)
    g = torch.Generator().manual_seed(L + H)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    return block.to(dtype)


def _fused_step(block: layers.RecurrentBlock, ux, uy, state, chunk) -> torch.Tensor:
    conv, lru = block.conv_1d, block.rg_lru
    return kernels.recurrent_step(
        ux, uy, conv.weight, conv.bias, (lru.input_gate_weight, lru.input_gate_bias),
        (lru.recurrent_gate_weight, lru.recurrent_gate_bias), lru.recurrent_param,
        state.conv, state.h, chunk.reset[:, 0], chunk.is_real[:, 0],
    )  # fmt: skip


def _layers_step(block: layers.RecurrentBlock, ux, uy, state, chunk) -> torch.Tensor:
    u = block.conv_1d.step(ux[:, None], state.conv, chunk)
    return (block.rg_lru.step(u, state.h, chunk) * layers.gelu(uy[:, None]))[:, 0]


@needs_native
@pytest.mark.parametrize("L,H", [(40, 2), (96, 3), (256, 2)])
@pytest.mark.parametrize("B", [1, 3, 6])
@pytest.mark.parametrize("params,tail", [("float32", "float32"), ("bfloat16", "float32"),
                                         ("bfloat16", "bfloat16")])  # fmt: skip
def test_recurrent_step_kernel_matches_float64_layers(L, H, B, params, tail):
    """kernels.recurrent_step (conv, RG-LRU and gelu gate fused) against the layers' own
    steps in float64 (same parameter values), over three steps from a random state: a
    document starting in row 0 at step 1, padding in the last row at step 0; head
    widths that are and are not multiples of the vector length, row counts around the
    tile. Output and h within float32 error; the tail exactly the inputs it keeps
    (rounded to its dtype); a padded row's state untouched."""
    block = _random_recurrent_block(L, H, getattr(torch, params))
    ref_block = _random_recurrent_block(L, H, getattr(torch, params)).double()
    g = torch.Generator().manual_seed(B)
    state = RecurrentLayerState(
        conv=torch.randn(B, 3, L, generator=g).to(getattr(torch, tail)),
        h=torch.randn(B, L, generator=g),
    )
    ref_state = RecurrentLayerState(conv=state.conv.double(), h=state.h.double())
    positions = torch.arange(5, 8)[None].repeat(B, 1)
    positions[0, 1:] = torch.arange(2)  # a document starts
    positions[-1, 0] = -1  # padding: the state must not move
    zeros = torch.zeros(B, dtype=torch.long)
    for t in range(3):
        ux, uy = torch.randn(B, L, generator=g), torch.randn(B, L, generator=g)
        chunk = layers.Chunk.for_step(positions[:, t : t + 1], zeros, zeros)
        h_before, tail_before = state.h.clone(), state.conv.clone()
        with torch.no_grad():
            z = _fused_step(block, ux, uy, state, chunk)
            ref = _layers_step(ref_block, ux.double(), uy.double(), ref_state, chunk)
        assert z.dtype == torch.float32 and z.shape == (B, L)
        assert (z.double() - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
        assert (state.h.double() - ref_state.h).abs().max().item() <= 1e-5
        kept = torch.where(chunk.reset[..., None], 0, tail_before[:, 1:])
        expected = torch.cat([kept, ux[:, None].to(state.conv.dtype)], dim=1)
        real = chunk.is_real[:, 0]
        assert torch.equal(state.conv[real], expected[real])
        assert torch.equal(state.conv[~real], tail_before[~real])
        assert torch.equal(state.h[~real], h_before[~real])
        assert (~real).any() == (t == 0)
        ref_state.conv = state.conv.double()  # the reference's tail, stored in the same dtype


@needs_native
@pytest.mark.parametrize("params", ["float32", "bfloat16"])
def test_recurrent_step_kernel_at_saturating_inputs(params):
    """The kernel's own exponential (sigmoid, the decay a = exp(log_a), gelu's tanh)
    where it saturates or clamps: input gate pre-activations of +-60, log_a from
    about -0.02 down to -8 * 20 (a below float32's normal range), |uy| up to 100
    (gelu's tail both ways). Against the layers' steps in float64, within float32
    error. (log_a stays away from 0, where sqrt(1 - exp(2 log_a)) cancels in any
    float32 evaluation, the reference's included.)"""
    L, H, B = 256, 2, 2
    block = _random_recurrent_block(L, H, torch.float32)
    with torch.no_grad():
        lru = block.rg_lru
        lru.recurrent_param.copy_(torch.linspace(-2, 20, L))
        lru.input_gate_bias.copy_(torch.linspace(-60, 60, L).reshape(lru.input_gate_bias.shape))
        lru.recurrent_gate_bias.copy_(
            torch.linspace(60, -4, L).reshape(lru.recurrent_gate_bias.shape)
        )
    block = block.to(getattr(torch, params))
    ref_block = copy.deepcopy(block).double()
    g = torch.Generator().manual_seed(7)
    state = RecurrentLayerState(
        conv=torch.randn(B, 3, L, generator=g), h=torch.randn(B, L, generator=g)
    )
    ref_state = RecurrentLayerState(conv=state.conv.double(), h=state.h.double())
    zeros = torch.zeros(B, dtype=torch.long)
    chunk = layers.Chunk.for_step(torch.full((B, 1), 5), zeros, zeros)
    ux = torch.randn(B, L, generator=g)
    uy = torch.linspace(-100, 100, B * L).reshape(B, L)
    with torch.no_grad():
        z = _fused_step(block, ux, uy, state, chunk)
        ref = _layers_step(ref_block, ux.double(), uy.double(), ref_state, chunk)
    assert torch.isfinite(z).all()
    assert (z.double() - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    h_error = (state.h.double() - ref_state.h).abs().max().item()
    assert h_error <= 1e-5 * ref_state.h.abs().max().item()


@needs_native
def test_recurrent_block_decode_goes_through_the_fused_step(monkeypatch):
    """A float32 decode step without autograd calls the fused kernel, with the same
    result as the layers' own steps; with autograd, or switched off, it does not."""
    block = _random_recurrent_block(64, 2, torch.float32)
    calls = []
    native = kernels.recurrent_step
    monkeypatch.setattr(kernels, "recurrent_step", lambda *a: calls.append(1) or native(*a))
    x = torch.randn(2, 1, 16)
    chunk = layers.Chunk.for_step(torch.tensor([[0], [3]]), torch.zeros(2, dtype=torch.long),
                                  torch.zeros(2, dtype=torch.long))  # fmt: skip
    outs = []
    for fused in (True, False):
        monkeypatch.setattr(layers, "FUSED_RECURRENT_STEP", fused)
        state = RecurrentLayerState(conv=torch.ones(2, 3, 64), h=torch.ones(2, 64))
        with torch.no_grad():
            outs.append(block.step(x, state, chunk))
    assert calls == [1]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    block.step(x, RecurrentLayerState(conv=torch.ones(2, 3, 64), h=torch.ones(2, 64)), chunk)
    assert calls == [1]  # autograd on: the layers' steps


def _int4_operands(M, K, N, G, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    x[0, :G] = 0  # an all-zero group (sx = 1, not 0 / 0)
    q, scale, minimum = quantize_int4(torch.randn(N, K, generator=g), G)
    return x, q, scale, minimum


@needs_native
@pytest.mark.parametrize("M", [1, 2, 5, 16])
@pytest.mark.parametrize("K,N,G", [(128, 4, 64), (256, 7, 128), (2560, 48, 128), (96, 5, 32),
                                   (40, 9, 8)])  # fmt: skip
def test_int4_kernel_matches_its_reference(M, K, N, G):
    """kernels.int4_matmul against its definition in float64 (int4_matmul_reference: the
    same per-group int8 activations): within float32 rounding of the group sums; and
    against x @ W.T with the float x, within the activations' rounding, sx / 2 each."""
    x, q, scale, minimum = _int4_operands(M, K, N, G, seed=M + K)
    y = kernels.int4_matmul(x, pack_nibbles(q), scale, minimum)
    assert y.dtype == torch.float32 and y.shape == (M, N)
    w = dequantize_int4(q, scale, minimum, torch.float64)
    magnitude = x.abs().double() @ w.abs().T
    ref = kernels.int4_matmul_reference(x, q, scale, minimum)
    assert ((y.double() - ref).abs() <= (K // G + G + 16) * 2**-23 * magnitude + 1e-30).all()
    _, sx = kernels.quantize_groups_int8(x, G)
    rounding = (sx.double().repeat_interleave(G, dim=1) / 2) @ w.abs().T  # [M, N]
    assert ((y.double() - x.double() @ w.T).abs() <= rounding * 1.001 + 1e-4 * magnitude).all()


@needs_native
@pytest.mark.parametrize("D", [40, 256, 2560])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_kernel_matches_float64(D, dtype):
    """kernels.rms_norm against RMSNorm's formula in float64: within float32 rounding
    (a sum of D squares, a square root, three products)."""
    g = torch.Generator().manual_seed(D)
    x = torch.randn(3, 1, D, generator=g) * 3
    w = (torch.randn(D, generator=g) * 0.5).to(dtype)
    y = kernels.rms_norm(x, w, 1e-6)
    xd = x.double()
    ref = xd * torch.rsqrt(xd.square().mean(-1, keepdim=True) + 1e-6) * (w.double() + 1)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert ((y.double() - ref).abs() <= (D + 8) * 2**-23 * ref.abs() + 1e-7).all()


@needs_native
def test_decode_rows_normalise_through_the_kernel(monkeypatch):
    """RMSNorm of a few float32 rows without autograd is the native call, equal to the
    PyTorch formula within float32 rounding; many rows or autograd keep PyTorch's."""
    calls = []
    native = kernels.rms_norm
    monkeypatch.setattr(kernels, "rms_norm", lambda *a: calls.append(a[0].shape) or native(*a))
    norm = layers.RMSNorm(64)
    norm.weight.data.normal_()
    x = torch.randn(2, 1, 64)
    with torch.no_grad():
        y = norm(x)
        norm(torch.randn(1, layers.NATIVE_NORM_ROWS + 1, 64))
    ref = norm(x)  # autograd on: the formula
    assert calls == [(2, 1, 64)]
    torch.testing.assert_close(y, ref.detach(), rtol=1e-6, atol=1e-6)


@needs_native
@pytest.mark.parametrize("ring", ["float32", "bfloat16"])
def test_attention_step_kernel_matches_float64_decode(ring, monkeypatch):
    """Decoding through kernels.attention_step (float32) against the same model decoding
    in float64 through PyTorch's ops: 20 steps with window 6, so the ring fills, wraps
    and is read in part (R < W) at first; a document starts in row 0 at step 9, row 2 is
    padding for its first 3 steps. Logits within float32 error, rings equal up to their
    dtype's rounding (each step starts both from the state the kernel stored); the
    kernel was called for every attention layer and step."""
    cfg = tiny_config(width=48, mlp_width=96, num_heads=3, attention_window=6)
    model = random_model(cfg, noise=0.05)
    ref_model = random_model(cfg, noise=0.05).double()
    calls = []
    native = kernels.attention_step
    monkeypatch.setattr(kernels, "attention_step", lambda *a: calls.append(1) or native(*a))
    B, T = 3, 20
    tokens = torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
    positions = arange_positions(B, T)
    positions[0, 9:] = torch.arange(T - 9)
    positions[2, :3] = -1
    positions[2, 3:] = torch.arange(T - 3)
    state = model.init_state(B, dtype=getattr(torch, ring))
    ref_state = ref_model.init_state(B, dtype=torch.float64)
    with torch.no_grad():
        for t in range(T):
            step = (tokens[:, t : t + 1], positions[:, t : t + 1])
            out, _ = model(*step, state, logits="last")
            ref, _ = ref_model(*step, ref_state, logits="last")
            assert (out.double() - ref).abs().max().item() <= 1e-4 * ref.abs().max().item(), t
            for mine, theirs in zip(state.layers, ref_state.layers):
                for name, a in mine.tensors().items():
                    b = theirs.tensors()[name]
                    if name in ("k", "v"):
                        torch.testing.assert_close(a.double(), b.to(a.dtype).double(),
                                                   rtol=2**-7, atol=1e-6)  # fmt: skip
                    b.copy_(a.double())  # both go on from the same stored state
    assert len(calls) == T * cfg.block_types.count("attention")


class _CountingLibrary:
    """Stands in for the loaded kernel library, counting calls of one of its functions."""

    def __init__(self, lib, name: str):
        self.lib, self.name, self.calls = lib, name, 0

    def __getattr__(self, attr):
        self.calls += attr == self.name
        return getattr(self.lib, attr)


@needs_native
def test_compiled_decode_steps_attention_through_the_kernel(monkeypatch):
    """Inside a compiled decode step local attention is the custom op
    rgemma::attention_step (which writes the rings in place, where PyTorch's ops would
    copy them whole): over 9 steps with window 4 (the ring wraps twice), the compiled
    step's logits are the eager step's, and each step of either model calls the native
    attention kernel once per attention layer."""
    cfg = tiny_config(attention_window=4)
    eager = random_model(cfg, noise=0.02)
    compiled = random_model(cfg, noise=0.02).compile_step()
    counting = _CountingLibrary(kernels._lib, "rgemma_attention_step")
    monkeypatch.setattr(kernels, "_lib", counting)
    prompt = torch.randint(0, cfg.vocab_size, (2, 3), generator=torch.Generator().manual_seed(2))
    steps = 9
    assert_compiled_decode_matches(eager, compiled, prompt, steps=steps, rtol=1e-5)
    assert counting.calls == 2 * steps * cfg.block_types.count("attention")


@needs_native
@pytest.mark.parametrize("M,K,N", [(1, 7, 5), (3, 64, 17), (40, 1000, 13)])
def test_w8a8_passes_equal_their_pytorch_definitions(M, K, N):
    """The native passes around the int8 product are the same float32 operations as
    quantize.quantize_rows_int8 and w8a8_linear's scaling, so their results are equal:
    rows of mixed magnitudes, an all-zero row, values that round half to even."""
    g = torch.Generator().manual_seed(M + K)
    x = torch.randn(M, K, generator=g) * torch.rand(M, 1, generator=g) * 10
    x[0] = 0
    x[0, :4] = torch.tensor([0.5, 1.5, -2.5, 127.0])  # sx = 1: x / sx are ties
    if M > 1:
        x[1] = 0
    xq, sx = kernels.quantize_rows_int8(x)
    ref_q, ref_sx = quantize_rows_int8(x)
    assert torch.equal(xq, ref_q) and torch.equal(sx, ref_sx)
    acc = torch.randint(-(2**24), 2**24, (M, N), generator=g, dtype=torch.int32)
    scale = torch.rand(N, generator=g)
    ref = acc.to(torch.float32).mul_(sx[:, None]).mul_(scale)
    assert torch.equal(kernels.dequantize_rows(acc, sx, scale), ref)
