"""State handles: named fixed-size states a client builds, continues from, forks and deletes.

    store = StateStore(model, memory_bytes=2**30, disk=DiskTier(dir, 8 * 2**30, model.config))
    entry = store.create(metadata={"title": "the manual"})
    ...feed tokens with the engine, then store.put(entry)...
    store.get(entry.id)          # from RAM, or loaded back from the disk tier

A handle costs the state's bytes (about 17 MB for 2B), whatever the length of
what it has read. What a handle holds:

* ``state``: a 1-row State that has seen ``fed`` tokens;
* ``pending_ids``: tokens not yet in the state. The last token appended is
  always kept here: feeding it is what gives the logits a continuation
  samples from, so a handle never needs to store logits ([1, V]);
* ``pending_text``: the tail of appended text not yet tokenized. Text comes
  in chunks cut anywhere; the tokens near a cut may change once the next
  chunk arrives, so the last ``HOLD_CHARS`` characters wait (see
  ``split_stable_text``). A document appended in many chunks thus gives the
  same tokens as the whole document tokenized at once.

Tiers: the most recently used handles keep their State in RAM (up to
``memory_bytes``); with a disk tier every handle is also written there when
it changes (a crash or restart loses nothing), and the disk tier evicts its
least recently used files past its own budget. Without a disk tier a handle
evicted from RAM is gone.
"""

from __future__ import annotations

import collections
import dataclasses
import secrets
import threading
import time
from collections.abc import Sequence
from typing import Any

from rgemma.io.disk_tier import DiskTier
from rgemma.state import State

PREFIX = "state-"
HOLD_CHARS = 256  # appended text held back from tokenizing until more follows


class StateNotFound(KeyError):
    """No handle with that id (never made, deleted, or evicted under the budgets)."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclasses.dataclass
class StoredState:
    """One handle (see the module doc). ``ends_with_answer``: the last thing in it is a
    chat answer (its final token pending), so a chat continues with the next user turn."""

    id: str
    state: State | None
    pending_ids: list[int] = dataclasses.field(default_factory=list)
    pending_text: str = ""
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))
    ends_with_answer: bool = False
    fed: int = 0

    @property
    def tokens(self) -> int:
        """Tokens the handle holds: fed to the state or pending."""
        return self.fed + len(self.pending_ids)

    @property
    def empty(self) -> bool:
        return self.tokens == 0 and not self.pending_text

    def extra(self) -> dict[str, Any]:
        """What the disk tier keeps beside the tensors."""
        return {
            "id": self.id,
            "pending_ids": self.pending_ids,
            "pending_text": self.pending_text,
            "metadata": self.metadata,
            "created": self.created,
            "ends_with_answer": self.ends_with_answer,
        }

    @classmethod
    def from_snapshot(cls, id: str, state: State, extra: dict[str, Any]) -> StoredState:
        """A handle from a snapshot's state and ``extra`` (a file a client uploaded, or
        the disk tier's). Raises ValueError naming a field of the wrong type."""
        pending = extra.get("pending_ids", [])
        if not isinstance(pending, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in pending
        ):
            raise ValueError("the state file's pending_ids is not a list of token ids")
        for name, kind in (("pending_text", str), ("metadata", dict)):
            if name in extra and not isinstance(extra[name], kind):
                raise ValueError(f"the state file's {name} is not a {kind.__name__}")
        created = extra.get("created")
        return cls(
            id=id,
            state=state,
            pending_ids=list(pending),
            pending_text=extra.get("pending_text", ""),
            metadata=extra.get("metadata", {}),
            created=created if isinstance(created, int) else int(time.time()),
            ends_with_answer=bool(extra.get("ends_with_answer", False)),
            fed=int(state.num_tokens[0]),
        )


def split_stable_text(tokenizer, text: str, final: bool = False) -> tuple[list[int], str]:
    """(ids, rest): the tokens of the start of ``text`` that more text cannot change, and
    the rest, to be tokenized with what follows. ``final``: nothing follows.

    A cut is trusted when tokenizing the text up to it gives a prefix of the tokens of
    the whole text, with ``HOLD_CHARS`` characters after it; tokenizers merge locally,
    so such tokens stay as they are when more text comes.
    """
    if final:
        return (tokenizer.encode(text, add_bos=False) if text else []), ""
    cut = len(text) - HOLD_CHARS
    if cut <= 0:
        return [], text
    whole = tokenizer.encode(text, add_bos=False)
    while cut > 0:
        cut = _space_before(text, cut)
        head = tokenizer.encode(text[:cut], add_bos=False) if cut else []
        if whole[: len(head)] == head:
            return head, text[cut:]
        cut -= HOLD_CHARS
    return [], text


def _space_before(text: str, cut: int) -> int:
    """A cut at or before ``cut`` just before a whitespace character (0 if none is near):
    tokens rarely span from a word into the space before the next."""
    lowest = max(0, cut - HOLD_CHARS)
    while cut > lowest and not text[cut].isspace():
        cut -= 1
    return cut if cut > lowest else max(lowest, 0)


class StateStore:
    """The handles of one model: RAM tier (LRU, ``memory_bytes``) over an optional
    ``DiskTier``. Thread-safe."""

    def __init__(self, model, memory_bytes: int = 2**30, disk: DiskTier | None = None):
        self.model = model
        self.memory_bytes = memory_bytes
        self.disk = disk
        self._lock = threading.Lock()
        self._ram: collections.OrderedDict[str, StoredState] = collections.OrderedDict()
        self.state_bytes = model.init_state(1, device="meta").nbytes

    # ------------------------------------------------------------- lookups
    def __contains__(self, id: str) -> bool:
        with self._lock:
            if id in self._ram:
                return True
        return self.disk is not None and id in self.disk

    def ids(self) -> list[str]:
        """Every handle id, least recently used first."""
        with self._lock:
            ram = list(self._ram)
        on_disk = self.disk.names(PREFIX) if self.disk is not None else []
        return [i for i in on_disk if i not in self._ram] + ram

    def get(self, id: str) -> StoredState:
        """The handle (loaded back from disk if needed). Raises StateNotFound."""
        with self._lock:
            entry = self._ram.get(id)
            if entry is not None:
                self._ram.move_to_end(id)
                return entry
        loaded = self.disk.get(id, self.model) if self.disk is not None else None
        if loaded is None:
            raise StateNotFound(
                f"no state {id!r} (never created, deleted, or evicted under the budgets)"
            )
        state, metadata = loaded
        entry = StoredState.from_snapshot(id, state, metadata)
        self._keep_in_ram(entry)
        return entry

    # ------------------------------------------------------------- changes
    def new_id(self) -> str:
        return PREFIX + secrets.token_hex(12)

    def create(self, metadata: dict[str, Any] | None = None) -> StoredState:
        """A new empty handle (stored)."""
        entry = StoredState(self.new_id(), self.model.init_state(1), metadata=metadata or {})
        self.put(entry)
        return entry

    def fork(self, entry: StoredState, metadata: dict[str, Any] | None = None) -> StoredState:
        """A copy of ``entry`` under a new id (stored)."""
        copy = dataclasses.replace(
            entry,
            id=self.new_id(),
            state=entry.state.clone(),
            pending_ids=list(entry.pending_ids),
            metadata=dict(entry.metadata) if metadata is None else metadata,
            created=int(time.time()),
        )
        self.put(copy)
        return copy

    def put(self, entry: StoredState) -> None:
        """Stores ``entry`` (new or changed): written to the disk tier, kept in RAM."""
        entry.fed = int(entry.state.num_tokens[0])
        if self.disk is not None:
            self.disk.put(entry.id, entry.state, entry.extra())
        self._keep_in_ram(entry)

    def delete(self, id: str) -> bool:
        """Removes the handle; False if there was none."""
        with self._lock:
            found = self._ram.pop(id, None) is not None
        if self.disk is not None:
            found = self.disk.delete(id) or found
        return found

    def _keep_in_ram(self, entry: StoredState) -> None:
        with self._lock:
            self._ram[entry.id] = entry
            self._ram.move_to_end(entry.id)
            while len(self._ram) > 1 and len(self._ram) * self.state_bytes > self.memory_bytes:
                self._ram.popitem(last=False)  # on disk if there is a disk tier, else gone


def text_after(
    tokenizer, entry: StoredState, text: str | None = None, ids: Sequence[int] = (), *, final: bool
) -> tuple[list[int], str]:
    """(new ids, text still pending) of ``text`` or token ``ids`` following ``entry``'s
    pending text (ids make that text final: it is tokenized before them)."""
    if text is not None:
        return split_stable_text(tokenizer, entry.pending_text + text, final=final)
    return split_stable_text(tokenizer, entry.pending_text, final=True)[0] + list(ids), ""


def continuation_ids(
    tokenizer, entry: StoredState, new_ids: Sequence[int] = (), text: str | None = None
) -> list[int]:
    """The ids to feed after ``entry``'s state for a completion that continues it with
    ``text`` (tokenized after the pending text) or ``new_ids``: pending ids first."""
    return list(entry.pending_ids) + text_after(tokenizer, entry, text, new_ids, final=True)[0]
