"""Prefix cache: the state after a prompt prefix, reused by later prompts that start with it.

A fixed-size state makes this cheap: an entry costs the state's bytes
(about 17 MB for 2B), whatever the prefix's length.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import torch

from rgemma.io.tokenizer import common_prefix_length
from rgemma.state import State


class PrefixCache:
    """Token-id prefix -> (1-row State after it, logits [1, V] after it); LRU, bounded bytes."""

    def __init__(self, max_bytes: int, min_tokens: int = 16, recent: int = 16):
        self.max_bytes = max_bytes
        self.min_tokens = max(1, min_tokens)
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: collections.OrderedDict[tuple, tuple[State, torch.Tensor, int]] = (
            collections.OrderedDict()
        )
        self._lengths: collections.Counter[int] = collections.Counter()
        self._recent: collections.deque[tuple] = collections.deque(maxlen=recent)

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, ids: Sequence[int]) -> tuple[int, State, torch.Tensor] | None:
        """The longest cached prefix of ``ids``: (its length, a state copy, logits copy)."""
        for n in sorted(self._lengths, reverse=True):
            if n > len(ids):
                continue
            key = tuple(ids[:n])
            if key in self._entries:
                self._entries.move_to_end(key)
                state, logits, _ = self._entries[key]
                self.hits += 1
                return n, state.clone(), logits.clone()
        self.misses += 1
        return None

    def split_point(self, ids: Sequence[int], start: int) -> int | None:
        """A prefix length in (start, len(ids)) shared with a recent prompt, worth caching."""
        best = 0
        for other in self._recent:
            best = max(best, common_prefix_length(ids, other))
        self._recent.append(tuple(ids))
        worth = best >= self.min_tokens and start < best < len(ids)
        return best if worth and tuple(ids[:best]) not in self._entries else None

    def store(self, ids: Sequence[int], state: State, logits: torch.Tensor) -> None:
        """Keeps copies of the state and logits after ``ids`` (evicting the oldest)."""
        key = tuple(ids)
        size = state.nbytes + logits.numel() * logits.element_size()
        if len(key) < self.min_tokens or size > self.max_bytes or key in self._entries:
            return
        while self.bytes + size > self.max_bytes:
            self._evict_oldest()
        self._entries[key] = (state.clone(), logits.clone(), size)
        self._lengths[len(key)] += 1
        self.bytes += size

    def _evict_oldest(self) -> None:
        key, (_, _, size) = self._entries.popitem(last=False)
        self.bytes -= size
        self._lengths[len(key)] -= 1
        if not self._lengths[len(key)]:
            del self._lengths[len(key)]
