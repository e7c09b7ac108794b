"""The layers of a Griffin residual block, each with its math beside the code (local
attention is ``attention.py``).

Shapes: B batch, T time, D width, L lru_width, H heads, Dh head dim, W window.

Every temporal layer takes a ``Chunk`` describing the tokens of this call:
padding (segment position -1) is always on the left of each row (the model
moves it there), so row b holds ``n_pad[b]`` pads then its real tokens.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from rgemma import kernels
from rgemma.scan import linear_scan
from rgemma.state import RecurrentLayerState

_MAX_SQRT_GRADIENT = 1000.0  # bound on d sqrt(x) / dx during training
VOCAB_BLOCK = 16384  # logits of a table held in another dtype: rows per product
FUSED_RECURRENT_STEP = True  # False: the layers' own steps, always (for comparisons)
NATIVE_NORM_ROWS = 16  # up to this many rows, RMSNorm is one native call (0: never)


def normal_(p: torch.Tensor, variance: float, generator: torch.Generator | None = None) -> None:
    """Fills ``p`` with N(0, variance), drawn in float32 on the CPU (the same numbers
    whatever ``p``'s dtype and device, for a given generator)."""
    with torch.no_grad():
        p.copy_(torch.randn(p.shape, generator=generator) * math.sqrt(variance))


def gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation (as JAX's default)."""
    return F.gelu(x, approximate="tanh")


@dataclasses.dataclass
class Chunk:
    """Per-row facts about the T tokens of one forward call (all [B, T] or [B]).

    positions: segment positions (0 starts a document, -1 is padding).
    is_real: positions >= 0.
    reset: positions == 0.
    stream_index: index of each real token in its row's stream (-1 for pads).
    doc_start: for each token, stream index of the document it belongs to.
    n_pad: [B] pads at the left of each row; ``has_pad``: any pad at all.
    num_tokens_before: [B] stream index of the first real token of the call.
    """

    positions: torch.Tensor
    is_real: torch.Tensor
    reset: torch.Tensor
    stream_index: torch.Tensor
    doc_start: torch.Tensor
    n_pad: torch.Tensor
    has_pad: bool
    num_tokens_before: torch.Tensor

    @classmethod
    def build(
        cls, positions: torch.Tensor, num_tokens: torch.Tensor, doc_start: torch.Tensor
    ) -> Chunk:
        is_real = positions >= 0
        reset = positions == 0
        n_pad = (~is_real).sum(dim=1)
        T = positions.shape[1]
        t = torch.arange(T, device=positions.device)[None]
        stream = num_tokens[:, None] + t - n_pad[:, None]
        minus_one = torch.full_like(stream, -1)
        starts = torch.where(reset, stream, minus_one)
        doc = torch.maximum(torch.cummax(starts, dim=1).values, doc_start[:, None])
        return cls(
            positions=positions,
            is_real=is_real,
            reset=reset,
            stream_index=torch.where(is_real, stream, minus_one),
            doc_start=doc,
            n_pad=n_pad,
            has_pad=bool(n_pad.any()),
            num_tokens_before=num_tokens,
        )

    @classmethod
    def for_step(
        cls, positions: torch.Tensor, num_tokens: torch.Tensor, doc_start: torch.Tensor
    ) -> Chunk:
        """The same facts for a decode step (T = 1) in a handful of ops. Rows fed
        padding are handled by the step functions (``has_pad`` is False)."""
        is_real = positions >= 0
        reset = positions == 0
        stream = num_tokens[:, None]
        doc = torch.where(reset, stream, doc_start[:, None])
        return cls(
            positions=positions,
            is_real=is_real,
            reset=reset,
            stream_index=stream,
            doc_start=doc,
            n_pad=(~is_real[:, 0]).long(),
            has_pad=False,
            num_tokens_before=num_tokens,
        )


# --------------------------------------------------------------------------
# Matmuls with weights held in another dtype than the activations
# --------------------------------------------------------------------------


def _cpu_has_native_bf16() -> bool:
    """True where the CPU multiplies bf16 natively (AVX512-BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


NATIVE_BF16 = _cpu_has_native_bf16()

# Up to this many rows, a product with weights held in bf16 runs in bf16 (x
# rounded to bf16, float32 accumulation inside the kernel); past it, the weights
# are converted to the activations' dtype (a reused buffer, see `workspace`) and
# multiplied there. Without native bf16 (AVX2) bf16 products run at ~18 GFLOP/s
# against fp32's ~140: only few-row products (decode), bound by reading the
# weights, gain. With native bf16 (AVX512-BF16: ~430 GFLOP/s against fp32's
# ~185, measured) every product does. Tests and users may set it.
LOW_PRECISION_ROWS = sys.maxsize if NATIVE_BF16 else 4


def low_precision_matmul_dtype(x: torch.Tensor, rows: int) -> torch.dtype:
    """The dtype to multiply ``rows`` rows of x in against weights stored below
    x's precision (quantized, or held in bf16): bf16 where that is faster."""
    if x.device.type == "cpu" and rows <= LOW_PRECISION_ROWS and not torch.is_grad_enabled():
        return torch.bfloat16
    return x.dtype


_workspaces = threading.local()


def workspace(like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """A reused buffer of ``like``'s shape in ``dtype`` (per thread), or None where
    one must not be used: while autograd is on (the buffer is overwritten by the
    next layer, so it must not be saved for backward) or off the CPU.

    Converting a large weight into a fresh tensor costs ~10x the copy itself
    (the allocator maps new pages and the kernel zeroes them); a buffer kept
    from call to call is only written.
    """
    if like.device.type != "cpu":
        return None
    return workspace_like(tuple(like.shape), dtype)


def workspace_like(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
    """A reused CPU buffer of ``shape`` in ``dtype`` (per thread); None while autograd is on."""
    if torch.is_grad_enabled():
        return None
    cache = _workspaces.__dict__.setdefault("buffers", {})
    key = (tuple(shape), dtype)
    buf = cache.get(key)
    if buf is None:
        # a normal tensor, even when made under inference_mode: an inference tensor
        # could not be written later outside it (under no_grad)
        with torch.inference_mode(False):
            buf = cache[key] = torch.empty(shape, dtype=dtype)
    return buf


def converted(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``w.to(dtype)``, through a reused buffer where one may be used."""
    buf = workspace(w, dtype)
    return w.to(dtype) if buf is None else buf.copy_(w)


def mixed_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ w.T + b, x [..., K] in its dtype, w [N, K] held in another: -> [..., N] in x's dtype.

    Reference: F.linear(x, w.to(x.dtype), b.to(x.dtype)). A few float32 rows
    against a large bf16 weight go through rgemma's kernel (``_streams_bf16``:
    exactly the reference but for the order of the additions). Else, where
    ``low_precision_matmul_dtype`` says so (few rows, or a CPU with native
    bf16), x is rounded to w's dtype and multiplied there, the bias added in
    x's dtype; else w is converted to x's dtype and multiplied there.
    """
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if _streams_bf16(x, w, rows):
        y = kernels.bf16_matmul(x.reshape(rows, -1), w).reshape(*x.shape[:-1], -1)
        return y if b is None else y + b.to(x.dtype)
    if w.dtype == torch.bfloat16 and low_precision_matmul_dtype(x, rows) == torch.bfloat16:
        return widened_plus_bias(F.linear(x.to(w.dtype), w), x.dtype, b)
    return F.linear(x, converted(w, x.dtype), None if b is None else b.to(x.dtype))


def widened_plus_bias(y: torch.Tensor, dtype: torch.dtype, b: torch.Tensor | None) -> torch.Tensor:
    """y.to(dtype) + b.to(dtype). Where dtype is the wider (y bf16, dtype float32), in one
    pass: the addition promotes y, as the conversion would (the same values, without
    writing and re-reading y widened)."""
    if b is None:
        return y.to(dtype)
    if torch.promote_types(y.dtype, dtype) != dtype:  # narrowing: convert first
        y = y.to(dtype)
    return torch.add(y, b.to(dtype))


# Up to this many float32 rows against bf16 weights of at least this many elements,
# rgemma's kernel multiplies them. With native bf16 it streams the weights faster
# than oneDNN's bf16 product (which also rounds x to bf16) up to 4 rows, past which
# the native product wins on arithmetic. Without native bf16 the alternative is
# converting the weights to float32 first (a pass that writes twice the bytes it
# reads), and the kernel, which widens each weight once in registers for all the
# rows, stays ahead through batched decode (measured up to 64 rows). Smaller
# weights: the call costs more than the streaming gains, except where the
# alternative is PyTorch's bf16 product without native bf16 (where
# low_precision_matmul_dtype picks bf16), slower still.
KERNEL_BF16_ROWS = 4 if NATIVE_BF16 else 64
_KERNEL_BF16_MIN_WEIGHTS = 1 << 20


def _streams_bf16(x: torch.Tensor, w: torch.Tensor, rows: int) -> bool:
    """Whether x [..., K] @ w.T goes through ``kernels.bf16_matmul``."""
    emulated_bf16 = not NATIVE_BF16 and low_precision_matmul_dtype(x, rows) == torch.bfloat16
    return (
        w.dtype == torch.bfloat16
        and x.dtype == torch.float32
        and 0 < rows <= KERNEL_BF16_ROWS
        and (w.numel() >= _KERNEL_BF16_MIN_WEIGHTS or emulated_bf16)
        and x.device.type == "cpu"
        and not torch.is_grad_enabled()
        and kernels.available()
    )


def plus_bias(call: Callable[[], None] | None, y: torch.Tensor, b: torch.Tensor | None):
    """A bound product (``kernels.*_into``) followed by y += b, as one call (None stays None).
    The same float32 addition as ``widened_plus_bias`` with a float32 result."""
    if call is None or b is None:
        return call
    b = b.float()

    def product_plus_bias() -> None:
        call()
        torch.add(y, b, out=y)

    return product_plus_bias


class Linear(nn.Linear):
    """nn.Linear that multiplies in the input's dtype: weights may be held in
    bfloat16 (half the memory) while activations are float32 (fast on CPUs
    without native bf16); see ``mixed_linear``. With equal dtypes it is
    exactly nn.Linear.

    Initialised as in the Griffin paper: W ~ N(0, init_scale / in_features),
    b = 0 (``init_scale`` < 1 for the projections that end a residual branch).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        init_scale: float = 1.0,
        **factory,
    ):
        self.init_scale = init_scale  # before nn.Linear.__init__ calls reset_parameters
        super().__init__(in_features, out_features, bias, **factory)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        normal_(self.weight, self.init_scale / self.in_features, generator)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype != x.dtype:
            return mixed_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    def native_into(self, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None] | None:
        """y = self(x) as a bound native call (x [M, K], y [M, N] float32), where forward
        would run rgemma's bf16 kernel for M rows; else None."""
        if not _streams_bf16(x, self.weight, x.shape[0]):
            return None
        return plus_bias(kernels.bf16_matmul_into(x, self.weight, y), y, self.bias)


class Embedding(nn.Embedding):
    """The tied token table [V, D]: rows for the inputs, ``attend`` for the logits.

    Initialised as N(0, 1 / D).
    """

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        normal_(self.weight, 1.0 / self.embedding_dim, generator)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """[..., D] -> [..., V] = x @ table.T; a table held in another dtype than x is
        multiplied VOCAB_BLOCK rows at a time (see ``mixed_linear``)."""
        table = self.weight
        if table.dtype == x.dtype:
            return F.linear(x, table)
        return torch.cat(
            [
                mixed_linear(x, table[i : i + VOCAB_BLOCK])
                for i in range(0, table.shape[0], VOCAB_BLOCK)
            ],
            dim=-1,
        )


class RMSNorm(nn.Module):
    """RMSNorm(x) = x * rsqrt(mean(x^2) + eps) * (1 + w); w starts at 0."""

    def __init__(self, width: int, eps: float = 1e-6, **factory):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(width, **factory))

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._native(x):  # a decode step: one call instead of seven small ops
            return kernels.rms_norm(x, self.weight, self.eps)
        var = torch.mean(torch.square(x), dim=-1, keepdim=True)
        return x * torch.rsqrt(var + self.eps) * (self.weight.to(x.dtype) + 1)

    def native_into(self, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None] | None:
        """y = self(x) as a bound native call (x, y [M, D] float32), where forward would
        make one; else None."""
        return kernels.rms_norm_into(x, self.weight, self.eps, y) if self._native(x) else None

    def _native(self, x: torch.Tensor) -> bool:
        return 0 < x.numel() <= NATIVE_NORM_ROWS * x.shape[-1] and kernels.rms_norm_supports(
            x, self.weight
        )


class MLPBlock(nn.Module):
    """GeGLU: down( gelu_tanh(gate(x)) * up(x) ), all with bias. [B,T,D] -> [B,T,D].

    final_init_scale: the init scale of ``down_proj``, which ends the branch.
    """

    def __init__(self, width: int, mlp_width: int, final_init_scale: float = 1.0, **factory):
        super().__init__()
        self.gate_proj = Linear(width, mlp_width, **factory)
        self.up_proj = Linear(width, mlp_width, **factory)
        self.down_proj = Linear(mlp_width, width, init_scale=final_init_scale, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gelu(self.gate_proj(x)) * self.up_proj(x))


# --------------------------------------------------------------------------
# Recurrent block: causal conv1d + RG-LRU
# --------------------------------------------------------------------------


class SqrtBoundedGrad(torch.autograd.Function):
    """sqrt(x) whose backward 1 / (2 sqrt(x)) is bounded by _MAX_SQRT_GRADIENT."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return torch.sqrt(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        floor = 1.0 / _MAX_SQRT_GRADIENT**2
        return grad / torch.sqrt(torch.clamp(4.0 * x, min=floor))


def _align_with_tail(u: torch.Tensor, tail: torch.Tensor, chunk: Chunk) -> torch.Tensor:
    """[B, K-1+T, L]: each row's conv history followed by its real inputs.

    Row b of the result is [0 * n_pad, tail (K-1), reals (T - n_pad)]: the
    pads move in front of the tail so the convolution looks back from the
    first real token straight into the previous call's inputs.
    """
    ext = torch.cat([tail.to(u.dtype), u], dim=1)
    if not chunk.has_pad:
        return ext
    k1, T = tail.shape[1], u.shape[1]
    i = torch.arange(T + k1, device=u.device)[None]
    p = chunk.n_pad[:, None]
    src = torch.where(i < p, i + k1, torch.where(i < p + k1, i - p, i))
    ext = torch.gather(ext, 1, src[..., None].expand(-1, -1, u.shape[2]))
    return torch.where((i >= p)[..., None], ext, torch.zeros_like(ext))


class Conv1D(nn.Module):
    """Causal depthwise convolution of temporal width K, with bias.

    out[t] = b + sum_{s=0}^{K-1} w[K-1-s] * x[t-s] * [no document start in (t-s, t]]

    Weight layout [L, 1, K] (Hugging Face's), so w[K-1] multiplies x[t].
    The K-1 inputs before the call come from the state ("tail").
    """

    def __init__(self, width: int, temporal_width: int, **factory):
        super().__init__()
        self.temporal_width = temporal_width
        self.weight = nn.Parameter(torch.zeros(width, 1, temporal_width, **factory))
        self.bias = nn.Parameter(torch.zeros(width, **factory))

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """w ~ N(0, 0.01 / K), b = 0."""
        normal_(self.weight, 0.01 / self.temporal_width, generator)
        nn.init.zeros_(self.bias)

    def forward(
        self, u: torch.Tensor, tail: torch.Tensor, chunk: Chunk
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """u: [B, T, L]; tail: [B, K-1, L] -> (out [B, T, L], new tail [B, K-1, L])."""
        K, T = self.temporal_width, u.shape[1]
        ext = _align_with_tail(u, tail, chunk)  # [B, K-1+T, L]
        w = self.weight[:, 0, :].T.to(u.dtype)  # [K, L]
        # resets_before[t] - resets_before[t-s] > 0 <=> a document starts in (t-s, t]
        resets = torch.cumsum(chunk.reset.to(torch.int32), dim=1)
        resets = F.pad(resets, (K - 1, 0))  # [B, K-1+T]
        out = ext[:, K - 1 :] * w[K - 1]
        for s in range(1, K):
            x_s = ext[:, K - 1 - s : K - 1 - s + T]
            keep = resets[:, K - 1 :] == resets[:, K - 1 - s : K - 1 - s + T]
            out = out + x_s * w[K - 1 - s] * keep[..., None].to(u.dtype)
        out = out + self.bias.to(u.dtype)
        return out, ext[:, T:]

    def step(self, u: torch.Tensor, tail: torch.Tensor, chunk: Chunk) -> torch.Tensor:
        """One token: u [B, 1, L] -> out [B, 1, L]; updates ``tail`` in place.

        A document start hides the tail; a padding row keeps its tail.
        """
        history = torch.where(chunk.reset[..., None], torch.zeros_like(tail), tail.to(u.dtype))
        ext = torch.cat([history, u], dim=1)  # [B, K, L]
        out = (ext * self.weight[:, 0, :].T.to(u.dtype)).sum(dim=1, keepdim=True)
        tail.copy_(torch.where(chunk.is_real[..., None], ext[:, 1:], tail))
        return out + self.bias.to(u.dtype)


def _gates_in_bf16(x: torch.Tensor, w: torch.Tensor, rows: int) -> bool:
    """Whether RG-LRU's gate products of ``rows`` rows of x run in bf16 (w held in bf16)."""
    return (
        w.dtype == torch.bfloat16
        and x.dtype != w.dtype
        and rows > KERNEL_BF16_ROWS
        and low_precision_matmul_dtype(x, rows) == torch.bfloat16
    )


class RGLRU(nn.Module):
    """Real-Gated Linear Recurrent Unit. [B, T, L] -> [B, T, L].

        gate_x = sigmoid(x_blocks @ Wx + bx)        (block-diagonal, one block per head)
        gate_a = sigmoid(x_blocks @ Wa + ba)
        log_a  = -8 * gate_a * softplus(recurrent_param)
        a      = exp(log_a)
        mult   = sqrt(1 - a^2), or 1 at a document start
        h_t    = a_t * h_{t-1} * [not a document start] + mult * gate_x * x_t

    h is float32 whatever the weights' dtype. Padding leaves h untouched
    (a = 1, input 0).
    """

    def __init__(self, width: int, num_heads: int, **factory):
        super().__init__()
        self.num_heads = num_heads
        bw = width // num_heads
        self.recurrent_param = nn.Parameter(torch.zeros(width, **factory))
        self.input_gate_weight = nn.Parameter(torch.zeros(num_heads, bw, bw, **factory))
        self.input_gate_bias = nn.Parameter(torch.zeros(num_heads, bw, **factory))
        self.recurrent_gate_weight = nn.Parameter(torch.zeros(num_heads, bw, bw, **factory))
        self.recurrent_gate_bias = nn.Parameter(torch.zeros(num_heads, bw, **factory))

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Gate weights ~ N(0, 1 / block width), biases 0; softplus(recurrent_param) =
        -log(r) with r^2 uniform in [0.9^2, 0.999^2] (the paper's init)."""
        bw = self.input_gate_weight.shape[-1]
        normal_(self.input_gate_weight, 1.0 / bw, generator)
        normal_(self.recurrent_gate_weight, 1.0 / bw, generator)
        nn.init.zeros_(self.input_gate_bias)
        nn.init.zeros_(self.recurrent_gate_bias)
        a2 = torch.rand(self.recurrent_param.shape, generator=generator) * (0.999**2 - 0.9**2)
        neg_log_a = -0.5 * torch.log(a2 + 0.9**2)
        with torch.no_grad():
            self.recurrent_param.copy_(torch.log(torch.expm1(neg_log_a)))

    def _block_diag(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """[B, T, H*bw] -> [B, T, H*bw]: y_h = x_h @ w_h + b_h per head h.

        Weights held in bf16 meet many rows in bf16 where ``low_precision_matmul_dtype``
        says so (a CPU with native bf16), as in ``mixed_linear``; few rows (decode)
        multiply in x's dtype, the math of ``kernels.recurrent_step``.
        """
        B, T, _ = x.shape
        xh = x.reshape(B * T, self.num_heads, -1).transpose(0, 1)  # [H, B*T, bw]
        bias = b[:, None, :]
        if _gates_in_bf16(x, w, B * T):
            y = widened_plus_bias(torch.bmm(xh.to(w.dtype), w), x.dtype, bias)
        else:
            y = torch.baddbmm(bias.to(x.dtype), xh, w.to(x.dtype))  # [H, B*T, bw]
        return y.transpose(0, 1).reshape(B, T, -1)

    def coefficients(self, x: torch.Tensor, chunk: Chunk) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, L] -> (a, b) float32 [B, T, L] with h_t = a_t h_{t-1} + b_t (no padding)."""
        gate_x = torch.sigmoid(self._block_diag(x, self.input_gate_weight, self.input_gate_bias))
        gate_a = torch.sigmoid(
            self._block_diag(x, self.recurrent_gate_weight, self.recurrent_gate_bias)
        )
        log_a = -8.0 * gate_a * F.softplus(self.recurrent_param.to(x.dtype))
        a = torch.exp(log_a)
        mult = SqrtBoundedGrad.apply(1 - torch.exp(2 * log_a))
        reset = chunk.reset[..., None]
        mult = torch.where(reset, torch.ones_like(mult), mult)
        x_in = (x * gate_x * mult).float()
        a = torch.where(reset, torch.zeros_like(a), a).float()
        return a, x_in

    def forward(
        self, x: torch.Tensor, h: torch.Tensor, chunk: Chunk
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, T, L]; h: [B, L] float32 -> (y [B, T, L], new h [B, L])."""
        a, x_in = self.coefficients(x, chunk)
        if chunk.has_pad:
            real = chunk.is_real[..., None]
            a = torch.where(real, a, torch.ones_like(a))
            x_in = torch.where(real, x_in, torch.zeros_like(x_in))
        y, h_last = linear_scan(a, x_in, h)
        return y.to(x.dtype), h_last

    def step(self, x: torch.Tensor, h: torch.Tensor, chunk: Chunk) -> torch.Tensor:
        """One token: x [B, 1, L] -> y [B, 1, L]; updates h [B, L] in place (not for pads)."""
        a, x_in = self.coefficients(x, chunk)
        h_new = torch.addcmul(x_in[:, 0], a[:, 0], h)
        h.copy_(torch.where(chunk.is_real, h_new, h))
        return h_new[:, None].to(x.dtype)


class RecurrentBlock(nn.Module):
    """out = linear_out( RG_LRU(conv1d(linear_x(x))) * gelu_tanh(linear_y(x)) )."""

    def __init__(
        self,
        width: int,
        lru_width: int,
        num_heads: int,
        conv1d_width: int,
        final_init_scale: float = 1.0,
        **factory,
    ):
        super().__init__()
        self.linear_x = Linear(width, lru_width, **factory)
        self.linear_y = Linear(width, lru_width, **factory)
        self.linear_out = Linear(lru_width, width, init_scale=final_init_scale, **factory)
        self.conv_1d = Conv1D(lru_width, conv1d_width, **factory)
        self.rg_lru = RGLRU(lru_width, num_heads, **factory)

    def forward(self, x: torch.Tensor, state: RecurrentLayerState, chunk: Chunk) -> torch.Tensor:
        """x: [B, T, D] -> [B, T, D]; updates ``state`` (conv tail, h) in place."""
        y = gelu(self.linear_y(x))
        u = self.linear_x(x)
        u, tail = self.conv_1d(u, state.conv, chunk)
        u, h = self.rg_lru(u, state.h, chunk)
        _store_conv_tail(state, tail, chunk)
        state.h.copy_(h)
        return self.linear_out(u * y)

    def step(self, x: torch.Tensor, state: RecurrentLayerState, chunk: Chunk) -> torch.Tensor:
        """One token: x [B, 1, D] -> [B, 1, D] (same math, no scan, state in place).

        On the CPU in float32, everything between the three products is one call
        of rgemma's kernel (``kernels.recurrent_step``), else the layers' own steps.
        """
        ux, uy = self.linear_x(x), self.linear_y(x)
        if self._fuses_step(ux, state):
            conv, lru = self.conv_1d, self.rg_lru
            z = kernels.recurrent_step(
                ux[:, 0], uy[:, 0], conv.weight, conv.bias,
                (lru.input_gate_weight, lru.input_gate_bias),
                (lru.recurrent_gate_weight, lru.recurrent_gate_bias),
                lru.recurrent_param, state.conv, state.h, chunk.reset[:, 0], chunk.is_real[:, 0],
            )  # fmt: skip
            return self.linear_out(z[:, None])
        u = self.conv_1d.step(ux, state.conv, chunk)
        u = self.rg_lru.step(u, state.h, chunk)
        return self.linear_out(u * gelu(uy))

    def native_step_into(
        self,
        ux: torch.Tensor,
        uy: torch.Tensor,
        state: RecurrentLayerState,
        reset: torch.Tensor,
        real: torch.Tensor,
        z: torch.Tensor,
    ) -> Callable[[], None] | None:
        """What ``step`` does between its products, as a bound native call: ux, uy -> z
        [B, L] float32, the state in place; reset, real [B] bool, the step's flags
        (written into them before each call). None where ``step`` would not fuse."""
        if not self._fuses_step(ux, state):
            return None
        conv, lru = self.conv_1d, self.rg_lru
        return kernels.recurrent_step_into(
            ux, uy, conv.weight, conv.bias,
            (lru.input_gate_weight, lru.input_gate_bias),
            (lru.recurrent_gate_weight, lru.recurrent_gate_bias),
            lru.recurrent_param, state.conv, state.h, reset, real, z,
        )  # fmt: skip

    def _fuses_step(self, u: torch.Tensor, state: RecurrentLayerState) -> bool:
        """Whether ``step`` goes through ``kernels.recurrent_step``."""
        params = [self.conv_1d.weight, self.conv_1d.bias, *self.rg_lru.parameters()]
        return FUSED_RECURRENT_STEP and kernels.recurrent_step_supports(
            u, params, state.conv, state.h
        )


def _store_conv_tail(state: RecurrentLayerState, tail: torch.Tensor, chunk: Chunk) -> None:
    """Keeps the last K-1 inputs, zeroing those from before the current document."""
    k1 = tail.shape[1]
    n_after = chunk.num_tokens_before + chunk.is_real.sum(dim=1)  # [B]
    idx = n_after[:, None] - k1 + torch.arange(k1, device=tail.device)[None]
    doc = chunk.doc_start[:, -1:]
    keep = (idx >= doc)[..., None].to(tail.dtype)
    state.conv.copy_(tail * keep)
