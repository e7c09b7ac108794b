"""Weight-only int8 / int4 quantization of the linear layers and the embedding.

What is quantized: every ``Linear`` of the residual blocks (attention q/k/v/o,
recurrent linear_x/y/out, MLP gate/up/down) and the tied embedding / logits
table. What is not: the RG-LRU parameters (gates, a), the convolution, the
norms, and the state — they stay in full precision.

int8, per output channel, symmetric:
    scale_n = max_k |W[n, k]| / 127,   q = round(W / scale),   W ~ q * scale
int4, per group of G input columns, asymmetric:
    scale = (max - min) / 15,   q = round((W - min) / scale) in [0, 15],
    W ~ q * scale + min

Products, three ways (a layer picks per number of rows, see below):

* "kernel": weight-only, for few rows (decode): reads 1 or 0.5 bytes per
  weight through a kernel that widens the packed weights in registers: int8
  through rgemma's own (``rgemma.kernels``: float32 activations), else
  PyTorch's packed kernels (``_weight_int8pack_mm``,
  ``_weight_int4pack_mm_for_cpu``; bf16 activations).
* "dense": the layer converted into a reused buffer and multiplied densely:
  int8 as ``(x @ q.T) * scale`` (q is exact in bf16, the scale applied to the
  output), int4 dequantized.
* "w8a8" (int8 only): the activations quantized too, per row (token), and an
  int8 x int8 -> int32 product (``torch._int_mm``: VNNI / AMX through oneDNN):
  ``y = (xq @ q.T) * sx * scale``, the integer sums exact.
* "w4a8" (int4 only, few rows): the activations quantized per row and group
  to int8 and multiplied with the nibbles as bytes (``kernels.int4_matmul``:
  exact integer sums per group, VNNI where the CPU has it); it reads the
  weights once, as the "kernel" path does, with less arithmetic per byte.

Which is fastest depends on the CPU and the shape, so it is measured per layer
shape and row bucket when a model is quantized or loaded (``rgemma.autotune``,
cached on disk); without a measurement a layer uses "kernel" for up to 16 rows
and "dense" above.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from rgemma import autotune, kernels
from rgemma.layers import (
    VOCAB_BLOCK,
    Linear,
    converted,
    low_precision_matmul_dtype,
    plus_bias,
    widened_plus_bias,
    workspace_like,
)

_DECODE_ROWS = 16  # at most this many rows: use the packed kernels
_FEW_ROWS_PATHS = ("kernel", "w4a8")  # paths only for up to _DECODE_ROWS rows
# Inside a compiled step a call to rgemma's kernel (a custom op) costs ~13 us
# against ~6 us for PyTorch's; below ~1M weights that outweighs the faster
# streaming, so small layers (the demo model's) keep PyTorch's kernel there.
_NATIVE_MIN_WEIGHTS_COMPILED = 1 << 20


class QuantizationError(ValueError):
    """A quantization request that cannot be honoured (bits, group size...)."""


# --------------------------------------------------------------------------
# The math: quantize / dequantize (reference, used by tests and prefill)
# --------------------------------------------------------------------------


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] -> (q int8 [N, K], scale float32 [N])."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return q.to(dtype) * scale.to(dtype)[:, None]


def quantize_int4(
    w: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W [N, K] -> (q uint8 [N, K] in 0..15, scale [N, K/G], minimum [N, K/G]) float32."""
    N, K = w.shape
    if K % group_size:
        raise QuantizationError(
            f"int4: input width {K} is not divisible by group size {group_size}"
        )
    g = w.float().reshape(N, K // group_size, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scale = ((hi - lo) / 15.0).clamp(min=1e-12)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
    return q.reshape(N, K), scale, lo


def dequantize_int4(
    q: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, dtype=torch.float32
) -> torch.Tensor:
    N, K = q.shape
    G = K // scale.shape[1]
    w = q.reshape(N, -1, G).to(dtype) * scale.to(dtype)[..., None] + lo.to(dtype)[..., None]
    return w.reshape(N, K)


def quantize_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations x [M, K] -> (int8 [M, K], scale float32 [M]), symmetric per row:
    sx_m = max_k |x[m, k]| / 127, xq = round(x / sx)."""
    x = x.float()
    sx = x.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    return torch.round(x / sx[:, None]).clamp(-127, 127).to(torch.int8), sx


def w8a8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ (q * scale).T with x quantized per row on the fly -> [..., N] float32.

        y[m, n] = sx[m] * scale[n] * sum_k xq[m, k] * q[n, k]

    The sums are int32 and exact (|sum| <= K * 127^2 < 2^31 for K < 133,000); the
    only error is rounding x to 255 levels per row: |dy| <= sx / 2 * sum_k |W[n, k]|.
    """
    flat = x.reshape(-1, x.shape[-1])
    native = kernels.step_kernels_take(flat)
    xq, sx = kernels.quantize_rows_int8(flat) if native else quantize_rows_int8(flat)
    acc = torch._int_mm(xq, q.t())
    if native:  # the same float32 operations, one pass instead of three
        y = kernels.dequantize_rows(acc, sx, scale)
    else:
        y = acc.to(torch.float32).mul_(sx[:, None]).mul_(scale.to(torch.float32))
    return y.reshape(*x.shape[:-1], -1)


def int8_linear(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """x [..., K] @ dequantize_int8(q, scale).T in ``dtype``, computed as (x @ q.T) * scale:
    q converted exactly (int8 fits bf16, through a reused buffer), the scale on the output."""
    return F.linear(x.to(dtype), converted(q, dtype)) * scale.to(dtype)


# Rows a layer quantizes at a time: each block's float32 temporaries stay small
# (in cache, and never a fresh multi-MB allocation, whose pages the system must
# zero and fault in; for a [256000, 2560] table those cost more than the math).
_QUANTIZE_BLOCK_WEIGHTS = 1 << 18


def row_blocks(w: torch.Tensor):
    """Slices of W [N, K]'s rows, about _QUANTIZE_BLOCK_WEIGHTS weights each (at least one row)."""
    rows = max(1, _QUANTIZE_BLOCK_WEIGHTS // max(1, w.shape[1]))
    return (slice(i, i + rows) for i in range(0, w.shape[0], rows))


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] of values 0..15 -> uint8 [N, K/2] (even column in the low nibble)."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_nibbles(p: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_nibbles: uint8 [N, K/2] -> uint8 [N, K]."""
    return torch.stack([p & 0xF, p >> 4], dim=-1).reshape(p.shape[0], -1)


def _has_op(name: str) -> bool:
    return hasattr(torch.ops.aten, name)


# --------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------


class _QuantLinear(nn.Module):
    """What the int8 and int4 layers share. Few rows (decode) on the CPU go
    through a packed kernel (``_few_rows``, None where there is none): rgemma's
    own for int8, else PyTorch's, whose weights a subclass builds once, lazily
    (``_kernel_weights``), and which are dropped when the module moves or loads
    new weights. Many rows multiply densely (``_many_rows``)."""

    bias: torch.Tensor | None

    PATHS = ("kernel", "dense")

    def __init__(self):
        super().__init__()
        self._kernel: tuple[torch.Tensor, ...] | None = None
        self.paths: dict[int, str] = {}  # row bucket -> path, from ``tune``

    @classmethod
    def from_linear(cls, lin: nn.Linear, *args):
        """The quantized copy of ``lin`` (``args``: the subclass's settings, e.g. the int4
        group size); a bias stays in float32."""
        m = cls(
            lin.in_features, lin.out_features, lin.bias is not None, *args, device=lin.weight.device
        )
        m.set_weight(lin.weight.detach())
        if lin.bias is not None:
            m.bias = lin.bias.detach().float().clone()
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        y = None
        if x.device.type == "cpu" and not torch.is_grad_enabled():
            y = self._product(self.path(rows), x, rows)
        if y is None:
            y = self._many_rows(x, low_precision_matmul_dtype(x, rows))
        return widened_plus_bias(y.reshape(*x.shape[:-1], -1), x.dtype, self.bias)

    def path(self, rows: int) -> str:
        """The product for ``rows`` rows: the tuned one, else "kernel" up to 16 rows."""
        tuned = self.paths.get(autotune.row_bucket(rows)) if self.paths else None
        return tuned or ("kernel" if rows <= _DECODE_ROWS else "dense")

    def _product(self, path: str, x: torch.Tensor, rows: int) -> torch.Tensor | None:
        """x [..., K] -> [rows, N] or [..., N] by ``path``; None for the dense product."""
        if self._takes_few_rows(path, rows):
            return self._few_rows(x.reshape(rows, -1))
        return None

    @staticmethod
    def _takes_few_rows(path: str, rows: int) -> bool:
        """Whether ``path`` for ``rows`` rows is the packed kernel (``_few_rows``)."""
        return path == "kernel" and rows <= _DECODE_ROWS

    def tune(self, buckets: tuple[int, ...] = autotune.ROW_BUCKETS) -> dict[int, str]:
        """Measures (or reads from the cache) the fastest path per row bucket; CPU only."""
        self.paths = {}
        if self.qweight.device.type != "cpu":
            return self.paths
        for rows in buckets:
            x = torch.randn(rows, self.in_features)
            candidates = {
                p: functools.partial(self._product_or_dense, p, x, rows)
                for p in self.PATHS
                if p not in _FEW_ROWS_PATHS or rows <= _DECODE_ROWS
            }
            key = f"{type(self).__name__}|{self.out_features}|{self.in_features}|{rows}"
            self.paths[rows] = autotune.choose(key, candidates)
        return self.paths

    def first_outputs(self, n: int) -> _QuantLinear:
        """A layer of this one's first ``n`` outputs, sharing its buffers (for timing)."""
        part = copy.copy(self)
        part._buffers = {k: None if b is None else b[:n] for k, b in self._buffers.items()}
        part.out_features = min(n, self.out_features)
        part.paths, part._kernel = {}, None
        return part

    def _product_or_dense(self, path: str, x: torch.Tensor, rows: int) -> torch.Tensor:
        y = self._product(path, x, rows)
        return y if y is not None else self._many_rows(x, low_precision_matmul_dtype(x, rows))

    def _few_rows(self, flat: torch.Tensor) -> torch.Tensor | None:
        """[rows, K] -> [rows, N] through PyTorch's packed kernel, or None without one."""
        if not self._has_kernel():
            return None
        if self._kernel is None:
            self._kernel = self._kernel_weights()
        return self._kernel_mm(flat.to(torch.bfloat16), *self._kernel)

    def _many_rows(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[..., K] -> [..., N]: the dequantized weights, multiplied in ``dtype``."""
        return F.linear(x.to(dtype), self.dequantized(dtype))

    def _apply(self, fn, recurse=True):  # moving the module drops the kernel's weights
        self._kernel = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):  # so does loading new weights
        self._kernel = None
        return super()._load_from_state_dict(*args, **kwargs)


class Int8Linear(_QuantLinear):
    """y = x @ (q * scale).T + b with q int8 [N, K], scale [N]."""

    bits = 8
    PATHS = ("kernel", "dense", "w8a8")

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer(
            "qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer("scale", torch.zeros(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    def set_weight(self, w: torch.Tensor) -> None:
        """Quantizes W [N, K] into the buffers, ``row_blocks`` at a time (per row: the same
        values as one ``quantize_int8`` of all of W)."""
        for rows in row_blocks(w):
            self.qweight[rows], self.scale[rows] = quantize_int8(w[rows])

    def dequantized(self, dtype=torch.float32) -> torch.Tensor:
        """q * scale [N, K] in ``dtype``."""
        return dequantize_int8(self.qweight, self.scale, dtype)

    def _few_rows(self, flat: torch.Tensor) -> torch.Tensor | None:
        large = self.qweight.numel() >= _NATIVE_MIN_WEIGHTS_COMPILED
        if kernels.available() and (large or not torch.compiler.is_compiling()):
            return kernels.int8_matmul(flat, self.qweight, self.scale)
        return super()._few_rows(flat)

    def _many_rows(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return int8_linear(x, self.qweight, self.scale, dtype)

    def _product(self, path: str, x: torch.Tensor, rows: int) -> torch.Tensor | None:
        if path == "w8a8":
            return w8a8_linear(x, self.qweight, self.scale)
        return super()._product(path, x, rows)

    def native_into(self, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None] | None:
        """y = self(x) as a bound native call (x [M, K], y [M, N] float32), where forward
        would run rgemma's int8 kernel for M rows; else None."""
        rows = x.shape[0]
        if not (self._takes_few_rows(self.path(rows), rows) and kernels.available()):
            return None
        return plus_bias(kernels.int8_matmul_into(x, self.qweight, self.scale, y), y, self.bias)

    def _has_kernel(self) -> bool:
        return _has_op("_weight_int8pack_mm")

    def _kernel_weights(self) -> tuple[torch.Tensor]:
        """The scales in bf16, as the kernel takes them (a tensor, not an
        expression, so torch.compile can lower the kernel)."""
        return (self.scale.to(torch.bfloat16),)

    def _kernel_mm(self, flat: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(flat, self.qweight, scale)


class Int4Linear(_QuantLinear):
    """y = x @ W.T + b with W stored as int4 groups (q * scale + min)."""

    bits = 4
    PATHS = ("kernel", "dense", "w4a8")

    def __init__(
        self, in_features: int, out_features: int, bias: bool, group_size: int, device=None
    ):
        super().__init__()
        if in_features % group_size:
            raise QuantizationError(
                f"int4: in_features {in_features} not divisible by group size {group_size}"
            )
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        n_groups = in_features // group_size
        self.register_buffer(
            "qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device)
        )
        self.register_buffer("scale", torch.zeros(out_features, n_groups, device=device))
        self.register_buffer("minimum", torch.zeros(out_features, n_groups, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    def set_weight(self, w: torch.Tensor) -> None:
        """Quantizes W [N, K] into the buffers, ``row_blocks`` at a time (per row and group:
        the same values as one ``quantize_int4`` of all of W)."""
        for rows in row_blocks(w):
            q, self.scale[rows], self.minimum[rows] = quantize_int4(w[rows], self.group_size)
            self.qweight[rows] = pack_nibbles(q)

    def dequantized(self, dtype=torch.float32) -> torch.Tensor:
        """q * scale + min [N, K] in ``dtype``: ``dequantize_int4``, computed in place
        in reused buffers where they may be used (~10x faster than the reference's
        temporaries at 2B shapes, bit for bit the same); bf16 in one native pass."""
        N, K = self.out_features, self.in_features
        on_cpu = self.qweight.device.type == "cpu"
        w = workspace_like((N, K), dtype) if on_cpu else None
        if w is None:
            return dequantize_int4(unpack_nibbles(self.qweight), self.scale, self.minimum, dtype)
        if dtype == torch.bfloat16 and kernels.available() and not torch.compiler.is_compiling():
            return kernels.dequantize_int4_bf16(self.qweight, self.scale, self.minimum, w)
        nibbles = workspace_like((N, K // 2), torch.uint8)  # each nibble plane, in turn
        pairs = w.view(N, K // 2, 2)  # even column: low nibble
        pairs[..., 0].copy_(torch.bitwise_and(self.qweight, 0xF, out=nibbles))
        pairs[..., 1].copy_(torch.bitwise_right_shift(self.qweight, 4, out=nibbles))
        groups = w.view(N, -1, self.group_size)
        groups.mul_(self.scale.to(dtype)[..., None]).add_(self.minimum.to(dtype)[..., None])
        return w

    def _product(self, path: str, x: torch.Tensor, rows: int) -> torch.Tensor | None:
        if self._takes_w4a8(path, rows):
            return kernels.int4_matmul(x.reshape(rows, -1), self.qweight, self.scale, self.minimum)
        return super()._product(path, x, rows)

    def native_into(self, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None] | None:
        """y = self(x) as a bound native call (x [M, K], y [M, N] float32), where forward
        would run rgemma's W4A8 kernel for M rows; else None."""
        if not self._takes_w4a8(self.path(x.shape[0]), x.shape[0]):
            return None
        call = kernels.int4_matmul_into(x, self.qweight, self.scale, self.minimum, y)
        return plus_bias(call, y, self.bias)

    @staticmethod
    def _takes_w4a8(path: str, rows: int) -> bool:
        """Whether ``path`` for ``rows`` rows is rgemma's W4A8 kernel."""
        return path == "w4a8" and rows <= _DECODE_ROWS and kernels.available()

    def _has_kernel(self) -> bool:
        return self.out_features % 16 == 0 and _has_op("_weight_int4pack_mm_for_cpu")

    def _kernel_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights in the layout of PyTorch's CPU int4 kernel.

        That kernel computes W = (q - 8) * scale + zero, so zero = min + 8 * scale.
        """
        q = unpack_nibbles(self.qweight).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        zero = self.minimum + 8 * self.scale
        scales_zeros = torch.stack([self.scale, zero], dim=-1).transpose(0, 1).contiguous()
        return packed, scales_zeros.to(torch.bfloat16)

    def _kernel_mm(
        self, flat: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor
    ) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            flat, packed, self.group_size, scales_zeros
        )


class QuantEmbedding(nn.Module):
    """The tied embedding table, quantized: row lookups dequantize only the rows
    they read; ``attend`` (the logits matmul) goes through the quantized linear."""

    def __init__(self, table: Int8Linear | Int4Linear):
        super().__init__()
        self.table = table  # [V, D] as a linear layer: logits = x @ table.T

    def rows(self, index, dtype=torch.float32) -> torch.Tensor:
        """Dequantized table rows ``index`` (an index tensor or a slice) -> [n, D]."""
        t = self.table
        if isinstance(t, Int8Linear):
            return dequantize_int8(t.qweight[index], t.scale[index], dtype)
        return dequantize_int4(
            unpack_nibbles(t.qweight[index]), t.scale[index], t.minimum[index], dtype
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.rows(tokens.reshape(-1)).reshape(*tokens.shape, -1)

    def tune(self) -> dict[int, str]:
        """The table's product per row bucket. Up to 16 rows the logits are one product of
        the whole table; past that ``attend`` multiplies VOCAB_BLOCK rows at a time, so
        that is the shape those buckets are timed at (a [256000, 2560] product timed five
        times per bucket would also take minutes)."""
        t = self.table
        few = tuple(b for b in autotune.ROW_BUCKETS if b <= _DECODE_ROWS)
        many = tuple(b for b in autotune.ROW_BUCKETS if b > _DECODE_ROWS)
        paths = t.tune(few)
        paths.update(t.first_outputs(VOCAB_BLOCK).tune(many))
        t.paths = paths
        return paths

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """[..., D] -> [..., V]."""
        if x.numel() // x.shape[-1] <= _DECODE_ROWS:
            return self.table(x)
        V = self.table.out_features
        dtype = low_precision_matmul_dtype(x, x.numel() // x.shape[-1])
        xd = x.to(dtype)
        parts = [
            self._block_logits(xd, slice(i, i + VOCAB_BLOCK), dtype)  # block by block
            for i in range(0, V, VOCAB_BLOCK)
        ]
        return torch.cat(parts, dim=-1).to(x.dtype)

    def _block_logits(self, x: torch.Tensor, index: slice, dtype: torch.dtype) -> torch.Tensor:
        """x [..., D] against table rows ``index``; int8 as (x @ q.T) * scale, or W8A8
        where the table's path for these rows is "w8a8"."""
        t = self.table
        if isinstance(t, Int8Linear):
            if t.path(x.numel() // x.shape[-1]) == "w8a8" and not torch.is_grad_enabled():
                return w8a8_linear(x, t.qweight[index], t.scale[index]).to(dtype)
            return int8_linear(x, t.qweight[index], t.scale[index], dtype)
        return F.linear(x, self.rows(index, dtype))


# --------------------------------------------------------------------------
# Whole models
# --------------------------------------------------------------------------


def _quantized(lin: nn.Linear, bits: int, group_size: int) -> nn.Module:
    if bits == 8:
        return Int8Linear.from_linear(lin)
    return Int4Linear.from_linear(lin, group_size)


def quantize_model(model, bits: int = 8, group_size: int = 128, *, embedding: bool = True):
    """Replaces the model's linear layers (and embedding) with quantized ones, in place.

    The model then computes in float32 (``compute_dtype``) whatever it held before.
    """
    if bits not in (8, 4):
        raise QuantizationError(f"bits must be 8 or 4, got {bits}")
    if bits == 4 and model.config.width % group_size:
        raise QuantizationError(
            f"int4 group size {group_size} must divide the width {model.config.width}"
        )
    with torch.no_grad():
        for block in model.layers:
            for name, module in list(block.named_modules()):
                if isinstance(module, Linear):
                    parent_name, _, attr = name.rpartition(".")
                    parent = block.get_submodule(parent_name) if parent_name else block
                    setattr(parent, attr, _quantized(module, bits, group_size))
        if embedding:
            emb = model.embed_tokens
            lin = nn.Linear(emb.weight.shape[1], emb.weight.shape[0], bias=False, device="meta")
            lin.weight = emb.weight  # (built on meta: no table-sized init to throw away)
            model.embed_tokens = QuantEmbedding(_quantized(lin, bits, group_size))
    model.quantization = {
        "bits": bits,
        "group_size": group_size if bits == 4 else None,
        "embedding": embedding,
    }
    return ready_quantized(model)


def ready_quantized(model):
    """The last step of ``quantize_model`` and of loading a quantized checkpoint. What stays
    unquantized (RG-LRU gates and a, conv, norms, biases: ~1% of a model) is
    held in float32, the dtype the model then computes in, so a decode step does
    not convert it on every call; an int8 model builds rgemma's kernel now (once
    per machine), not inside a compiled step, which cannot trace the build."""
    with torch.no_grad():
        for module in model.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                if p.is_floating_point() and p.dtype != torch.float32:
                    setattr(module, name, nn.Parameter(p.float(), requires_grad=p.requires_grad))
    if int(model.quantization["bits"]) == 8:
        kernels.available()
    model.set_compute_dtype(torch.float32)
    tune_model(model)
    return model


def tune_model(model) -> dict[str, dict[int, str]]:
    """Each quantized layer's product per row bucket, measured once per shape on this
    machine (``rgemma.autotune``); returns {layer name: {rows: path}}."""
    chosen = {}
    tables = {f"{n}.table" for n, m in model.named_modules() if isinstance(m, QuantEmbedding)}
    for name, module in model.named_modules():
        if isinstance(module, QuantEmbedding) and module.table.qweight.device.type == "cpu":
            chosen[f"{name}.table"] = module.tune()
        elif isinstance(module, _QuantLinear) and not isinstance(module.qweight, nn.Parameter):
            if module.qweight.device.type == "meta" or name in tables:
                continue
            chosen[name] = module.tune()
    return chosen


def quantized_bytes(model) -> int:
    """Bytes of all parameters and buffers (what the weights occupy in memory)."""
    tensors = list(model.parameters()) + [b for b in model.buffers() if b is not None]
    return sum(t.numel() * t.element_size() for t in tensors)
