"""State: everything a Griffin model remembers about B sequences, in fixed size.

Per batch row, whatever the number of tokens seen:

* ``num_tokens`` [B] int64: real tokens fed so far (the stream index of the
  next token; padding does not count).
* ``doc_start`` [B] int64: stream index of the latest document start
  (segment position 0). Keys and conv inputs before it are invisible.
* per recurrent layer: ``conv`` [B, conv_width - 1, lru_width] (the last
  inputs of the causal convolution, weight dtype) and ``h`` [B, lru_width]
  (RG-LRU state, always float32);
* per attention layer: ``k``, ``v`` [B, window, head_dim] ring buffers. The
  key of stream index i sits in slot i % window, so the slot contents are
  derived from ``num_tokens`` alone (see ``ring_positions``).

The model updates a State in place (like a KV cache); ``clone`` takes a
snapshot. Rows can be selected, reordered, dropped and concatenated: the basis
of batching, beam search and branching a conversation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import torch


@dataclasses.dataclass
class RecurrentLayerState:
    conv: torch.Tensor  # [B, conv_width - 1, lru_width]
    h: torch.Tensor  # [B, lru_width] float32

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"conv": self.conv, "h": self.h}


@dataclasses.dataclass
class AttentionLayerState:
    k: torch.Tensor  # [B, window, head_dim]
    v: torch.Tensor  # [B, window, head_dim]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"k": self.k, "v": self.v}


LayerState = RecurrentLayerState | AttentionLayerState


def clone_layer(layer: LayerState) -> LayerState:
    """An independent copy of one layer's state."""
    return type(layer)(**{name: t.clone() for name, t in layer.tensors().items()})


@dataclasses.dataclass
class State:
    """The fixed-size state of a Griffin model for a batch of sequences."""

    num_tokens: torch.Tensor  # [B] int64
    doc_start: torch.Tensor  # [B] int64
    layers: list[LayerState]

    # ----------------------------------------------------------- creation
    @classmethod
    def empty(
        cls,
        config,
        batch_size: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> State:
        """An empty state (no tokens seen) for ``batch_size`` rows."""
        from rgemma.config import RECURRENT

        layers: list[LayerState] = []
        for kind in config.block_types:
            if kind == RECURRENT:
                layers.append(
                    RecurrentLayerState(
                        conv=torch.zeros(
                            batch_size,
                            config.conv1d_width - 1,
                            config.lru_width,
                            dtype=dtype,
                            device=device,
                        ),
                        h=torch.zeros(
                            batch_size, config.lru_width, dtype=torch.float32, device=device
                        ),
                    )
                )
            else:
                shape = (batch_size, config.attention_window, config.head_dim)
                layers.append(
                    AttentionLayerState(
                        k=torch.zeros(shape, dtype=dtype, device=device),
                        v=torch.zeros(shape, dtype=dtype, device=device),
                    )
                )
        zeros = torch.zeros(batch_size, dtype=torch.int64, device=device)
        return cls(num_tokens=zeros, doc_start=zeros.clone(), layers=layers)

    # -------------------------------------------------------------- facts
    @property
    def batch_size(self) -> int:
        return int(self.num_tokens.shape[0])

    @property
    def device(self) -> torch.device:
        return self.num_tokens.device

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor by a stable name (``layers.3.k``, ``num_tokens``...)."""
        out = {"num_tokens": self.num_tokens, "doc_start": self.doc_start}
        for i, layer in enumerate(self.layers):
            for name, t in layer.tensors().items():
                out[f"layers.{i}.{name}"] = t
        return out

    @property
    def nbytes(self) -> int:
        """Bytes held by the state (constant whatever the sequence length)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def ring_positions(self, window: int) -> torch.Tensor:
        """[B, window] stream index held by each ring slot; -1 where invisible.

        Slot s holds the latest index i < num_tokens with i % window == s,
        visible if i >= doc_start.
        """
        n = self.num_tokens[:, None]
        slots = torch.arange(window, device=n.device)[None]
        idx = n - 1 - torch.remainder(n - 1 - slots, window)
        return torch.where(idx >= self.doc_start[:, None], idx, torch.full_like(idx, -1))

    def ring_slots_in_use(self, window: int) -> int:
        """How many leading ring slots can hold a key (at least 1): min(window, the
        most tokens any row has seen). Index i goes to slot i % window, so while a
        row has seen n < window tokens its slots n.. are empty."""
        seen = int(self.num_tokens.max()) if self.num_tokens.numel() else 0
        return max(1, min(window, seen))

    # ---------------------------------------------------------- batch ops
    def _map(self, fn) -> State:
        layers: list[LayerState] = []
        for layer in self.layers:
            kwargs = {name: fn(t) for name, t in layer.tensors().items()}
            layers.append(type(layer)(**kwargs))
        return State(num_tokens=fn(self.num_tokens), doc_start=fn(self.doc_start), layers=layers)

    def clone(self) -> State:
        """An independent copy (a snapshot, or a branch of a conversation)."""
        return self._map(lambda t: t.clone())

    fork = clone

    def head(self, k: int) -> State:
        """Rows [0, k) as views: updating the result in place updates this state."""
        return self._map(lambda t: t[:k])

    def select(self, rows: Sequence[int] | torch.Tensor) -> State:
        """A new state with the given rows, in the given order (repeats allowed)."""
        index = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        if index.ndim != 1:
            raise ValueError("State.select: rows must be a 1-D list of row indices")
        if index.numel() and (index.min() < -self.batch_size or index.max() >= self.batch_size):
            raise IndexError(
                f"State.select: row index out of range for batch size {self.batch_size}"
            )
        return self._map(lambda t: t.index_select(0, index % max(self.batch_size, 1)))

    reorder = select

    def drop(self, rows: Iterable[int]) -> State:
        """A new state without the given rows."""
        gone = {int(r) % self.batch_size for r in rows}
        return self.select([i for i in range(self.batch_size) if i not in gone])

    def expand(self, n: int) -> State:
        """Each row repeated n times (row i -> rows i*n ... i*n + n - 1)."""
        return self.select(torch.arange(self.batch_size).repeat_interleave(n))

    @staticmethod
    def concat(states: Sequence[State]) -> State:
        """Stacks states of the same model along the batch dimension."""
        if not states:
            raise ValueError("State.concat needs at least one state")
        first = states[0]
        for s in states[1:]:
            if len(s.layers) != len(first.layers) or any(
                type(a) is not type(b)
                or any(
                    x.shape[1:] != y.shape[1:]
                    for x, y in zip(a.tensors().values(), b.tensors().values())
                )
                for a, b in zip(first.layers, s.layers)
            ):
                raise ValueError("State.concat: states come from models with different shapes")
        layers: list[LayerState] = []
        for i, layer in enumerate(first.layers):
            kwargs = {
                name: torch.cat([s.layers[i].tensors()[name] for s in states])
                for name in layer.tensors()
            }
            layers.append(type(layer)(**kwargs))
        return State(
            num_tokens=torch.cat([s.num_tokens for s in states]),
            doc_start=torch.cat([s.doc_start for s in states]),
            layers=layers,
        )

    def copy_(self, other: State, rows: Sequence[int] | torch.Tensor | None = None) -> State:
        """Writes ``other`` into this state in place (into ``rows`` if given)."""
        mine, theirs = self.tensors(), other.tensors()
        for name, t in mine.items():
            if rows is None:
                t.copy_(theirs[name])
            else:
                t[torch.as_tensor(rows, dtype=torch.long, device=t.device)] = theirs[name].to(
                    t.device
                )
        return self

    def to(self, device=None, dtype: torch.dtype | None = None) -> State:
        """Moves the state; ``dtype`` applies to conv/K/V (h stays float32)."""
        out = self._map(lambda t: t.to(device) if device is not None else t)
        if dtype is not None:
            for layer in out.layers:
                if isinstance(layer, RecurrentLayerState):
                    layer.conv = layer.conv.to(dtype)
                else:
                    layer.k, layer.v = layer.k.to(dtype), layer.v.to(dtype)
        return out
