"""Rows of different lengths as one model call, and the log-probabilities of tokens.

Every batched call in rgemma (generation's prefill, the engine, perplexity,
lm-eval scoring) pads its rows the same way: padding has segment position -1,
which the model ignores and which leaves a row's state untouched, so a row
gives the same numbers in a batch as alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

TopLogprobs = list[tuple[int, float]]


def pad_batch(
    rows: Sequence[Sequence[int]],
    starts: Sequence[int],
    *,
    side: Literal["left", "right"] = "left",
    width: int | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, width] and segment positions [B, width] of rows padded to ``width``.

    Row b's tokens get positions starts[b], starts[b] + 1, ...; padding gets
    token 0 and position -1. ``side="left"`` puts the padding first, so every
    row's last token is in the last column (what ``logits="last"`` reads);
    ``"right"`` puts it last, so column t is token t of every row.
    ``width`` defaults to the longest row.
    """
    width = max(len(r) for r in rows) if width is None else width
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    positions = torch.full((len(rows), width), -1, dtype=torch.long)
    for b, (ids, start) in enumerate(zip(rows, starts)):
        n = len(ids)
        cols = slice(width - n, width) if side == "left" else slice(0, n)
        tokens[b, cols] = torch.as_tensor(list(ids), dtype=torch.long)
        positions[b, cols] = torch.arange(start, start + n)
    return tokens.to(device), positions.to(device)


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets) under ``logits`` ([..., V] and [...]), in float32.

    Reference: ``log_softmax(logits)[..., targets]``; computed as the picked
    logit minus the logsumexp, without a [..., V] log-softmax tensor.
    """
    logits = logits.float()
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def top_logprobs(logprobs: torch.Tensor, k: int) -> list[TopLogprobs]:
    """The k best (token id, logprob) of each row of log-probabilities [..., V]."""
    values, ids = torch.topk(logprobs, min(k, logprobs.shape[-1]), dim=-1)
    flat_ids, flat_values = ids.reshape(-1, ids.shape[-1]), values.reshape(-1, ids.shape[-1])
    return [list(zip(i, v)) for i, v in zip(flat_ids.tolist(), flat_values.tolist())]
