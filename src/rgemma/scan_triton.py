"""The RG-LRU's linear recurrence h_t = a_t * h_{t-1} + x_t as one Triton kernel.

The math of ``scan.linear_scan_reference``, on the GPU, in one launch. One program
owns BLOCK_L channels of one row and walks time in tiles of BLOCK_T steps. Inside a
tile the recurrence is an associative scan of the pairs (a_t, x_t), each the map
h -> a_t h + x_t, under composition:

    (a1, x1) then (a2, x2) = (a1 a2, a2 x1 + x2),

which gives every step of the tile as (A_t, X_t) with h_t = A_t h_in + X_t, where
h_in is the state carried in from the tile before; the tile's last h_t carries on.
Steps past T are the identity (a = 1, x = 0). a and x are read once and h written
once, so the kernel runs at the speed of memory; the result equals the loop's up to
float32 (or float64) re-association inside a tile, as the chunked scan's does.

The backward is the same scan run backwards in time (see ``scan.py``), so it reuses
this kernel on time-reversed inputs.

Imported only where Triton and a CUDA device are present (``scan.linear_scan``).
With ``TRITON_INTERPRET=1`` set before Triton is imported, the same kernel runs on
CPU tensors, which is how the tests check it without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_T = 64  # time steps a program holds at once
BLOCK_L = 16  # channels a program owns: a [1, 4096, 2560] scan is 160 programs


@triton.jit
def _then(a1, x1, a2, x2):
    """The map h -> a2 (a1 h + x1) + x2 as a pair (a, x)."""
    return a1 * a2, a2 * x1 + x2


@triton.jit
def _scan_kernel(
    a_ptr,
    x_ptr,
    h0_ptr,
    y_ptr,
    h_last_ptr,
    T,
    L,
    BLOCK_T: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    col_ok = cols < L
    h = tl.load(h0_ptr + row * L + cols, mask=col_ok, other=0.0)
    steps = tl.arange(0, BLOCK_T)
    base = row.to(tl.int64) * T * L
    for t0 in range(0, T, BLOCK_T):
        t = t0 + steps
        offsets = base + t[:, None].to(tl.int64) * L + cols[None, :]
        ok = (t[:, None] < T) & col_ok[None, :]
        a = tl.load(a_ptr + offsets, mask=ok, other=1.0)
        x = tl.load(x_ptr + offsets, mask=ok, other=0.0)
        a_cum, x_cum = tl.associative_scan((a, x), axis=0, combine_fn=_then)
        y = a_cum * h[None, :] + x_cum
        tl.store(y_ptr + offsets, y, mask=ok)
        # the tile's last step (identity steps past T keep the last real h)
        h = tl.sum(tl.where(steps[:, None] == BLOCK_T - 1, y, 0.0), axis=0)
    tl.store(h_last_ptr + row * L + cols, h, mask=col_ok)


def scan_forward(
    a: torch.Tensor, x: torch.Tensor, h0: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """h_t = a_t h_{t-1} + x_t without autograd.

    Args:
      a, x: [B, T, L] float32 or float64, on the kernel's device.
      h0: [B, L] state before the first step (T == 0 returns it as h_last).
    Returns:
      y: [B, T, L] every h_t; h_last: [B, L].
    """
    B, T, L = x.shape
    a, x, h0 = a.contiguous(), x.contiguous(), h0.contiguous()
    y = torch.empty_like(x)
    h_last = torch.empty(B, L, dtype=x.dtype, device=x.device)
    grid = (B, triton.cdiv(L, BLOCK_L))
    _scan_kernel[grid](a, x, h0, y, h_last, T, L, BLOCK_T=BLOCK_T, BLOCK_L=BLOCK_L)
    return y, h_last
