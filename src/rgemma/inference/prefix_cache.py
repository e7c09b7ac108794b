"""Prefix cache: the state after a prompt prefix, reused by later prompts that start with it.

A fixed-size state makes this cheap: an entry costs the state's bytes
(about 17 MB for 2B), whatever the prefix's length.

With a disk tier (``io.disk_tier.DiskTier``, shared with the server's state
handles) an entry evicted from RAM is written there instead of dropped, named
``prefix-<length>-<sha256 of its ids>``, with its ids and logits beside the
state; a lookup that misses in RAM tries the disk, and a restarted server
finds the entries again.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Sequence

import torch

from rgemma.io.disk_tier import DiskTier
from rgemma.io.snapshot import SnapshotError
from rgemma.io.tokenizer import common_prefix_length
from rgemma.state import State

DISK_PREFIX = "prefix-"


def disk_name(ids: Sequence[int]) -> str:
    """The disk tier's name for the entry after ``ids``."""
    digest = hashlib.sha256(torch.tensor(list(ids), dtype=torch.int64).numpy().tobytes())
    return f"{DISK_PREFIX}{len(ids)}-{digest.hexdigest()[:40]}"


class PrefixCache:
    """Token-id prefix -> (1-row State after it, logits [1, V] after it); LRU, bounded bytes."""

    def __init__(
        self,
        max_bytes: int,
        min_tokens: int = 16,
        recent: int = 16,
        disk: DiskTier | None = None,
        model=None,
    ):
        if disk is not None and model is None:
            raise ValueError("PrefixCache: a disk tier needs the model (to load states back)")
        self.disk, self.model = disk, model
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
        for n in sorted(set(self._lengths) | self._disk_lengths(), reverse=True):
            if n > len(ids):
                continue
            key = tuple(ids[:n])
            if key in self._entries:
                self._entries.move_to_end(key)
                state, logits, _ = self._entries[key]
                self.hits += 1
                return n, state.clone(), logits.clone()
            found = self._from_disk(key)
            if found is not None:
                self.hits += 1
                return n, *found
        self.misses += 1
        return None

    def _disk_lengths(self) -> set[int]:
        if self.disk is None:
            return set()
        return {int(name.split("-")[1]) for name in self.disk.names(DISK_PREFIX)}

    def _from_disk(self, key: tuple) -> tuple[State, torch.Tensor] | None:
        """(state, logits) of ``key`` from the disk tier, checked to be for these ids."""
        if self.disk is None:
            return None
        try:
            loaded = self.disk.get(disk_name(key), self.model)
        except SnapshotError:
            return None  # a damaged file: dropped by the tier, a miss here
        if loaded is None:
            return None
        state, metadata = loaded
        saved = metadata["tensors"]
        if saved.get("ids") is None or saved["ids"].tolist() != list(key):
            return None  # a hash collision
        device = self.model.device
        return state.to(device), saved["logits"].to(device)

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

    def flush(self) -> None:
        """Writes every RAM entry to the disk tier (a server shutting down keeps them)."""
        if self.disk is not None:
            while self._entries:
                self._evict_oldest()

    def _evict_oldest(self) -> None:
        key, (state, logits, size) = self._entries.popitem(last=False)
        if self.disk is not None:  # spilled, not lost
            ids = torch.tensor(key, dtype=torch.int64)
            self.disk.put(disk_name(key), state, tensors={"ids": ids, "logits": logits})
        self.bytes -= size
        self._lengths[len(key)] -= 1
        if not self._lengths[len(key)]:
            del self._lengths[len(key)]
