"""Local multi-query attention with RoPE, and its ring-buffer state.

Shapes: B batch, T time, D width, H heads, Dh head dim, W window. See
``layers.Chunk`` for the per-call facts (padding, positions, documents).
"""

from __future__ import annotations

import torch
from torch import nn

from rgemma import kernels
from rgemma.layers import Chunk, Linear
from rgemma.state import AttentionLayerState

_MASKED = -2.3819763e38  # the official code's "minus infinity" for masked logits
NATIVE_STEP = True  # False: the decode step in PyTorch ops, always (for comparisons)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """RoPE on the first half of the last dim, split-half pairing.

    x: [B, T, N, Dh]; positions: [B, T]. With r = x[..., :Dh/2] = (r1, r2):
      r1' = r1 cos(p f) - r2 sin(p f),  r2' = r2 cos(p f) + r1 sin(p f),
      f_j = base^(-2j / (Dh/2)).  The second half of x passes through.
    """
    rot, rest = torch.chunk(x, 2, dim=-1)
    half = rot.shape[-1] // 2
    freq = torch.arange(half, device=x.device)
    inv_freq = 1.0 / (base ** (2 * freq / rot.shape[-1]))
    angle = positions[..., None, None] * inv_freq  # [B, T, 1, half]
    sin, cos = torch.sin(angle).to(x.dtype), torch.cos(angle).to(x.dtype)
    r1, r2 = torch.chunk(rot, 2, dim=-1)
    return torch.cat([r1 * cos - r2 * sin, r2 * cos + r1 * sin, rest], dim=-1)


class LocalAttentionBlock(nn.Module):
    """Local multi-query attention (one K/V head) with a ring-buffer state.

    A query at stream index q sees keys k of its own document with
    0 <= q - k <= W (up to W + 1 keys): the W previous ones are in the ring.
    """

    def __init__(
        self,
        width: int,
        num_heads: int,
        window: int,
        rope_base: float,
        query_block: int = 512,
        final_init_scale: float = 1.0,
        **factory,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = width // num_heads
        self.window = window
        self.rope_base = rope_base
        self.query_block = query_block
        self.q_proj = Linear(width, width, bias=False, **factory)
        self.k_proj = Linear(width, self.head_dim, bias=False, **factory)
        self.v_proj = Linear(width, self.head_dim, bias=False, **factory)
        self.o_proj = Linear(width, width, bias=True, init_scale=final_init_scale, **factory)

    def forward(
        self, x: torch.Tensor, state: AttentionLayerState, chunk: Chunk, ring_index: torch.Tensor
    ) -> torch.Tensor:
        """x: [B, T, D] -> [B, T, D]; writes the new keys/values into the ring.

        ring_index: [B, R] stream index of each of the first R <= W ring slots before
        this call (-1 empty); the slots past R are empty.
        """
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, 1, self.head_dim)
        v = self.v_proj(x)
        q = apply_rope(q, chunk.positions, self.rope_base)
        k = apply_rope(k, chunk.positions, self.rope_base)[:, :, 0]
        R = ring_index.shape[1]
        keys = torch.cat([state.k[:, :R].to(x.dtype), k], dim=1)  # [B, R+T, Dh]
        values = torch.cat([state.v[:, :R].to(x.dtype), v], dim=1)
        key_index = torch.cat([ring_index, chunk.stream_index], dim=1)  # [B, R+T]
        out = torch.empty(B, T, self.num_heads, self.head_dim, dtype=x.dtype, device=x.device)
        W, Qb = self.window, self.query_block
        for a in range(0, T, Qb):
            b = min(a + Qb, T)
            # keys that can be seen from queries a..b-1: the ring while a query is
            # within W of it, then chunk keys from a - W on.
            lo = 0 if a - int(chunk.n_pad.min()) < W else R + a - W
            out[:, a:b] = self._attend(
                q[:, a:b],
                keys[:, lo : R + b],
                values[:, lo : R + b],
                key_index[:, lo : R + b],
                chunk.stream_index[:, a:b],
                chunk.doc_start[:, a:b],
            )
        self._write_ring(state, k, v, chunk)
        return self.o_proj(out.reshape(B, T, -1))

    def step(
        self, x: torch.Tensor, state: AttentionLayerState, chunk: Chunk, ring_index: torch.Tensor
    ) -> torch.Tensor:
        """One token: x [B, 1, D] -> [B, 1, D]. Attends to the ring's first R slots
        (R = ring_index.shape[1] <= W) and to itself without concatenating them, then
        writes its key/value into the ring."""
        B = x.shape[0]
        q = self.q_proj(x).view(B, 1, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, 1, 1, self.head_dim)
        v = self.v_proj(x)  # [B, 1, Dh]
        if self._native_step(q, state):  # the same math in one call of rgemma's kernel
            out = self.native_attend(q[:, 0], k[:, 0, 0], v[:, 0], state, chunk, ring_index)
            return self.o_proj(out.reshape(B, 1, -1))
        q = apply_rope(q, chunk.positions, self.rope_base)[:, 0]  # [B, H, Dh]
        k = apply_rope(k, chunk.positions, self.rope_base)[:, 0]  # [B, 1, Dh]
        R = ring_index.shape[1]
        ring_k, ring_v = state.k[:, :R].to(x.dtype), state.v[:, :R].to(x.dtype)
        scale = self.head_dim**-0.5
        ring_logits = torch.bmm(q, ring_k.transpose(1, 2)) * scale  # [B, H, R]
        self_logit = torch.bmm(q, k.transpose(1, 2)) * scale  # [B, H, 1]
        diff = chunk.stream_index - ring_index  # [B, R]
        visible = (diff <= self.window) & (ring_index >= chunk.doc_start) & (ring_index >= 0)
        logits = torch.cat([ring_logits, self_logit], dim=-1).float()
        logits[..., :-1].masked_fill_(~visible[:, None], _MASKED)
        probs = torch.softmax(logits, dim=-1).to(x.dtype)
        out = torch.baddbmm(probs[..., -1:] * v, probs[..., :-1], ring_v)  # [B, H, Dh]
        self._write_ring(state, k, v, chunk)
        return self.o_proj(out.reshape(B, 1, -1))

    def native_attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        state: AttentionLayerState,
        chunk: Chunk,
        ring_index: torch.Tensor,
    ) -> torch.Tensor:
        """``step`` between its projections, in one call of rgemma's kernel: q [B, H, Dh],
        k, v [B, Dh] -> [B, H, Dh]; writes k, v into the ring. Needs ``_native_step``."""
        return kernels.attention_step(
            q, k, v, chunk.positions[:, 0], self.rope_base, state.k, state.v, ring_index,
            chunk.stream_index[:, 0], chunk.doc_start[:, 0], chunk.is_real[:, 0], self.window,
        )  # fmt: skip

    def _native_step(self, q: torch.Tensor, state: AttentionLayerState) -> bool:
        """Whether ``step`` goes through ``kernels.attention_step``."""
        return NATIVE_STEP and kernels.attention_step_supports(q, state.k, state.v)

    def _attend(self, q, keys, values, key_index, q_index, q_doc) -> torch.Tensor:
        """q [B,Q,H,Dh], keys/values [B,S,Dh], key_index [B,S], q_index/q_doc [B,Q]
        -> [B,Q,H,Dh]."""
        B, Q, H, Dh = q.shape
        logits = torch.einsum("bqhd,bsd->bhqs", q, keys) * (Dh**-0.5)
        diff = q_index[:, :, None] - key_index[:, None, :]  # [B, Q, S]
        visible = (
            (diff >= 0)
            & (diff <= self.window)
            & (key_index[:, None, :] >= 0)
            & (key_index[:, None, :] >= q_doc[:, :, None])
        )
        logits = logits.float().masked_fill(~visible[:, None], _MASKED)
        probs = torch.softmax(logits, dim=-1).to(q.dtype)
        return torch.einsum("bhqs,bsd->bqhd", probs, values)

    def _write_ring(
        self, state: AttentionLayerState, k: torch.Tensor, v: torch.Tensor, chunk: Chunk
    ) -> None:
        """Stores the last min(R, W) real keys/values of each row at slot index % W."""
        W, T = self.window, k.shape[1]
        if T == 1:  # decode: one slot per row, in place
            rows = torch.arange(k.shape[0], device=k.device)
            slot = torch.remainder(chunk.num_tokens_before, W)
            real = chunk.is_real[:, 0, None]
            state.k[rows, slot] = torch.where(real, k[:, 0].to(state.k.dtype), state.k[rows, slot])
            state.v[rows, slot] = torch.where(real, v[:, 0].to(state.v.dtype), state.v[rows, slot])
            return
        n_real = chunk.is_real.sum(dim=1)[:, None]  # [B, 1]
        slots = torch.arange(W, device=k.device)[None]
        d = torch.remainder(slots - chunk.num_tokens_before[:, None], W)  # real index mod W
        written = d < n_real
        last = d + torch.div(n_real - 1 - d, W, rounding_mode="floor").clamp(min=0) * W
        src = (chunk.n_pad[:, None] + last).clamp(max=T - 1)  # [B, W] chunk position
        gather = src[..., None].expand(-1, -1, k.shape[-1])
        new_k = torch.gather(k, 1, gather).to(state.k.dtype)
        new_v = torch.gather(v, 1, gather).to(state.v.dtype)
        state.k.copy_(torch.where(written[..., None], new_k, state.k))
        state.v.copy_(torch.where(written[..., None], new_v, state.v))
