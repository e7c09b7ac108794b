"""A directory of state snapshots under a byte budget: the disk tier of the server's states.

    tier = DiskTier("/var/cache/rgemma", max_bytes=8 * 2**30, model_config=model.config)
    tier.put("state-1a2b", state, extra={"pending_ids": [42]})
    state, metadata = tier.get("state-1a2b", model)        # None once evicted

Files are ``io.snapshot`` files (checksummed, written atomically), one per
name, in a subdirectory named after the model's config fingerprint, so
states of two models never mix and a restarted server finds its own. When
the files pass ``max_bytes``, the least recently used go first; "used" is
the file's modification time (``get`` touches it), so the order survives a
restart too.

Thread-safe: one lock guards the index; the files are written outside it
under a temporary name.
"""

from __future__ import annotations

import os
import re
import threading
from typing import Any

import torch

from rgemma.io.snapshot import SnapshotError, load_state, save_state
from rgemma.state import State

SUFFIX = ".safetensors"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class DiskTier:
    """Named snapshot files of one model, least recently used evicted past ``max_bytes``."""

    def __init__(self, directory: str | os.PathLike, max_bytes: int, model_config):
        if max_bytes <= 0:
            raise ValueError("DiskTier: max_bytes must be > 0")
        self.model_config = model_config
        self.max_bytes = max_bytes
        self.directory = os.path.join(os.fspath(directory), model_config.fingerprint()[:16])
        os.makedirs(self.directory, exist_ok=True)
        self._lock = threading.Lock()
        self._sizes: dict[str, int] = {}  # name -> bytes, least recently used first
        self.bytes = 0
        self._scan()

    def _scan(self) -> None:
        """Indexes the files already there (a restarted server), oldest use first."""
        found = []
        for entry in os.scandir(self.directory):
            name = entry.name.removesuffix(SUFFIX)
            if entry.is_file() and entry.name.endswith(SUFFIX) and NAME.match(name):
                stat = entry.stat()
                found.append((stat.st_mtime, name, stat.st_size))
            elif entry.is_file() and entry.name.startswith(".") and entry.name.endswith(".tmp"):
                os.unlink(entry.path)  # a write a crash interrupted
        for _, name, size in sorted(found):
            self._sizes[name] = size
            self.bytes += size

    def path(self, name: str) -> str:
        if not NAME.match(name):
            raise ValueError(f"invalid state name {name!r}")
        return os.path.join(self.directory, name + SUFFIX)

    def __contains__(self, name: str) -> bool:
        with self._lock:
            return name in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    def names(self, prefix: str = "") -> list[str]:
        """The names held, least recently used first."""
        with self._lock:
            return [n for n in self._sizes if n.startswith(prefix)]

    def put(
        self,
        name: str,
        state: State,
        extra: dict[str, Any] | None = None,
        tensors: dict[str, torch.Tensor] | None = None,
    ) -> list[str]:
        """Writes (or replaces) ``name``; returns the names evicted to stay in budget."""
        path = self.path(name)
        save_state(path, state, model_config=self.model_config, extra=extra, tensors=tensors)
        size = os.path.getsize(path)
        with self._lock:
            self.bytes -= self._sizes.pop(name, 0)
            self._sizes[name] = size
            self.bytes += size
            evicted = []
            while self.bytes > self.max_bytes and len(self._sizes) > 1:
                old = next(iter(self._sizes))
                self._remove(old)
                evicted.append(old)
        return evicted

    def get(self, name: str, model) -> tuple[State, dict[str, Any]] | None:
        """(state, metadata) of ``name`` (marked as just used), or None if not held.
        Raises SnapshotError if its file was damaged (it is then dropped)."""
        with self._lock:
            if name not in self._sizes:
                return None
            self._sizes[name] = self._sizes.pop(name)  # most recently used now
        path = self.path(name)
        try:
            state, metadata = load_state(path, model, device="cpu")
            os.utime(path)
        except (SnapshotError, OSError) as e:
            self.delete(name)
            raise SnapshotError(f"state {name}: its file is unreadable ({e})") from None
        return state, metadata

    def delete(self, name: str) -> bool:
        """Removes ``name``; False if it was not held."""
        with self._lock:
            if name not in self._sizes:
                return False
            self._remove(name)
            return True

    def _remove(self, name: str) -> None:
        self.bytes -= self._sizes.pop(name)
        try:
            os.unlink(self.path(name))
        except FileNotFoundError:
            pass
