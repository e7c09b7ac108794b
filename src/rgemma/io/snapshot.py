"""State snapshots: save a State to a file, load it back, fork it.

A snapshot is one safetensors file:

* tensors: every tensor of the State under its ``State.tensors()`` name
  (``num_tokens``, ``doc_start``, ``layers.{i}.{conv,h,k,v}``), plus
  ``rng.{row}`` (uint8) for rows whose sampling generator state was saved, so
  a seeded run continues exactly;
* metadata (JSON strings): ``format`` ("rgemma.state"), ``format_version``,
  ``rgemma_version``, ``config_fingerprint`` (``GriffinConfig.fingerprint()``),
  ``config`` (the architecture), ``layout`` (name -> shape, dtype),
  ``num_tokens`` (tokens seen per row), ``batch_size`` and ``extra``: the
  caller's JSON metadata (e.g. the token ids of the history, the pending
  token, chat messages), and ``sha256``: a checksum of every tensor's bytes,
  checked on loading (files of format version 1 have none).

Files are written atomically (a temporary file in the same directory, then
``os.replace``): a crash never leaves a half-written snapshot under the name.
Loading checks the format, the config fingerprint against the model and the
tensor layout; any mismatch or a corrupt / truncated file raises
``SnapshotError`` with a one-line reason.

Forking a conversation is ``state.clone()`` (``fork``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import torch

from rgemma.errors import one_line
from rgemma.state import State
from rgemma.version import __version__

FORMAT = "rgemma.state"
FORMAT_VERSION = 2  # 2: with the sha256 of the tensors; 1 still loads
READABLE_VERSIONS = ("1", "2")
MAX_ROWS = 1 << 16  # rows a state file may declare


class SnapshotError(ValueError):
    """A state file that cannot be used with this model (corrupt, truncated, other model)."""


def fork(state: State) -> State:
    """An independent copy of ``state`` (branch a conversation)."""
    return state.clone()


def save_state(
    path: str | os.PathLike,
    state: State,
    *,
    model_config,
    extra: dict[str, Any] | None = None,
    rng_states: Sequence[torch.Tensor | None] | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
) -> str:
    """Writes ``state`` to ``path`` (safetensors + JSON metadata), atomically.

    Args:
      state: the State to save (any batch size).
      model_config: the GriffinConfig of the model that made the state.
      extra: JSON-serialisable metadata kept with it (history ids, text...).
      rng_states: per row, a ``torch.Generator.get_state()`` or None.
      tensors: more tensors kept with it (e.g. the logits after the state), stored as
        ``extra.<name>`` and returned by ``load_state`` in ``metadata["tensors"]``.
    Returns:
      the path written.
    """
    from safetensors.torch import save_file

    path = os.fspath(path)
    extra_tensors = tensors or {}
    tensors = {
        name: t.detach().to("cpu").contiguous().clone() for name, t in state.tensors().items()
    }
    for name, t in extra_tensors.items():
        tensors[f"extra.{name}"] = t.detach().to("cpu").contiguous().clone()
    for row, rng in enumerate(rng_states or []):
        if rng is not None:
            tensors[f"rng.{row}"] = rng.detach().to("cpu", torch.uint8).contiguous().clone()
    layout = {
        name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        for name, t in state.tensors().items()
    }
    metadata = {
        "sha256": _checksum(tensors),
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "rgemma_version": __version__,
        "config_fingerprint": model_config.fingerprint(),
        "config": json.dumps(model_config.to_dict()),
        "layout": json.dumps(layout),
        "num_tokens": json.dumps(state.num_tokens.tolist()),
        "batch_size": str(state.batch_size),
        "extra": json.dumps(extra or {}),
    }
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(
        dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp"
    )
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The raw metadata of a snapshot; SnapshotError if it is not one."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise SnapshotError(f"{path}: no such state file")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as e:  # safetensors raises several error types
        raise SnapshotError(
            f"{path}: not a valid state file, corrupt or truncated ({one_line(e)})"
        ) from None
    if metadata.get("format") != FORMAT:
        raise SnapshotError(f"{path}: not an rgemma state file (no '{FORMAT}' format marker)")
    if metadata.get("format_version") not in READABLE_VERSIONS:
        raise SnapshotError(
            f"{path}: state file format version "
            f"{metadata.get('format_version')!r}; this rgemma reads "
            f"{', '.join(READABLE_VERSIONS)}"
        )
    return metadata


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of every tensor's name, dtype, shape and bytes, in name order."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def load_state(
    path: str | os.PathLike, model, *, device: torch.device | str | None = None
) -> tuple[State, dict[str, Any]]:
    """Reads a snapshot for ``model``.

    Returns:
      (state, metadata): the State on ``device`` (default: the model's), K/V
      and conv in the model's dtype; metadata is the ``extra`` dict plus
      ``rgemma_version``, ``config_fingerprint``, ``num_tokens``, ``batch_size``
      ``rng_states`` (a list with a uint8 tensor or None per row) and ``tensors`` (those
      saved with ``tensors=``, by name).
    Raises:
      SnapshotError: a corrupt / truncated file, or a state of another model.
    """
    from safetensors.torch import load_file

    path = os.fspath(path)
    raw = read_metadata(path)
    mine = model.config.fingerprint()
    if raw.get("config_fingerprint") != mine:
        raise SnapshotError(
            f"{path}: the state comes from another model (config fingerprint "
            f"{raw.get('config_fingerprint')}, this model's is {mine})"
        )
    try:
        tensors = load_file(path)
        batch_size = int(raw["batch_size"])
        extra = json.loads(raw.get("extra", "{}"))
    except Exception as e:
        raise SnapshotError(
            f"{path}: not a valid state file, corrupt or truncated ({one_line(e)})"
        ) from None
    if "sha256" in raw and raw["sha256"] != _checksum(tensors):
        raise SnapshotError(
            f"{path}: the state file's data does not match its checksum (the file is corrupt)"
        )
    if raw.get("format_version") != "1" and "sha256" not in raw:
        raise SnapshotError(f"{path}: the state file has no checksum (corrupt metadata)")
    if not 1 <= batch_size <= MAX_ROWS:
        raise SnapshotError(
            f"{path}: batch_size {batch_size} in the metadata is not in "
            f"[1, {MAX_ROWS}] (corrupt file)"
        )
    expected = model.init_state(batch_size, device="meta").tensors()
    state = _assemble(
        path,
        tensors,
        expected,
        model,
        batch_size,
        torch.device(device) if device is not None else model.device,
    )
    metadata = dict(extra) if isinstance(extra, dict) else {"extra": extra}
    metadata.update(
        rgemma_version=raw.get("rgemma_version"),
        config_fingerprint=mine,
        num_tokens=state.num_tokens.tolist(),
        batch_size=batch_size,
        rng_states=[_rng_state(path, tensors.get(f"rng.{b}")) for b in range(batch_size)],
        tensors={k.removeprefix("extra."): t for k, t in tensors.items() if k.startswith("extra.")},
    )
    return state, metadata


def _rng_state(path: str, rng: torch.Tensor | None) -> torch.Tensor | None:
    """A saved generator state, checked to be one (torch.Generator states have one size)."""
    if rng is None:
        return None
    size = torch.Generator().get_state().numel()
    if rng.dtype != torch.uint8 or rng.dim() != 1 or rng.numel() != size:
        raise SnapshotError(
            f"{path}: a saved sampling state has {rng.numel()} bytes, not {size} (corrupt file)"
        )
    return rng


def _assemble(
    path: str,
    tensors: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
    model,
    batch_size: int,
    device: torch.device,
) -> State:
    """A State of ``model`` from the file's tensors, checking every name and shape."""
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise SnapshotError(
            f"{path}: the state file lacks {len(missing)} tensors "
            f"(e.g. {missing[0]}); it does not fit this model"
        )
    for name, want in expected.items():
        got = tensors[name]
        if tuple(got.shape) != tuple(want.shape):
            raise SnapshotError(
                f"{path}: tensor {name} has shape {tuple(got.shape)}, this "
                f"model needs {tuple(want.shape)}"
            )
        if got.is_floating_point() != want.is_floating_point():
            raise SnapshotError(
                f"{path}: tensor {name} has dtype {got.dtype}, expected {want.dtype}"
            )
    state = model.init_state(batch_size, device=device)
    for name, t in state.tensors().items():
        t.copy_(tensors[name])
    n, d = state.num_tokens, state.doc_start
    if bool((n < 0).any() or (d < 0).any() or (d > n).any()):
        raise SnapshotError(f"{path}: token counts are inconsistent (corrupt file)")
    if any(
        not bool(torch.isfinite(t).all()) for t in state.tensors().values() if t.is_floating_point()
    ):
        raise SnapshotError(f"{path}: the state holds NaN or infinite values (corrupt file)")
    return state


# ------------------------------------------------------------ conversations
@dataclasses.dataclass
class Conversation:
    """One row of state saved by ``rgemma generate --save-state`` or chat's ``/save``.

    history_ids: every token the state has consumed, in order.
    pending_ids: the last answer's final token, not yet consumed (fed first
      when the conversation goes on).
    rng_state: the sampling generator's state after its last draw, or None.
    extra: the rest of the saved metadata (chat messages, system text...).
    """

    state: State
    history_ids: list[int]
    pending_ids: list[int]
    rng_state: torch.Tensor | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def save_conversation(path: str | os.PathLike, conversation: Conversation, *, model_config) -> str:
    """Writes a one-row conversation (its ids go in the metadata as ``token_ids`` =
    history + pending, and ``pending_ids``)."""
    extra = {
        **conversation.extra,
        "token_ids": list(conversation.history_ids) + list(conversation.pending_ids),
        "pending_ids": list(conversation.pending_ids),
    }
    return save_state(
        path,
        conversation.state,
        model_config=model_config,
        extra=extra,
        rng_states=[conversation.rng_state],
    )


def load_conversation(path: str | os.PathLike, model) -> Conversation:
    """Reads a one-row conversation for ``model``; SnapshotError if it is not one."""
    state, meta = load_state(path, model)
    if state.batch_size != 1:
        raise SnapshotError(
            f"{os.fspath(path)}: holds {state.batch_size} rows; a conversation continues one"
        )
    vocab = model.config.vocab_size
    pending = _token_ids(path, meta.pop("pending_ids", []), vocab, "pending_ids")
    ids = _token_ids(path, meta.pop("token_ids", []), vocab, "token_ids")
    if ids[len(ids) - len(pending) :] != pending:
        raise SnapshotError(
            f"{os.fspath(path)}: pending_ids are not the end of token_ids (corrupt metadata)"
        )
    rng_states = meta.pop("rng_states", None) or [None]
    for key in ("rgemma_version", "config_fingerprint", "num_tokens", "batch_size"):
        meta.pop(key, None)
    return Conversation(state, ids[: len(ids) - len(pending)], pending, rng_states[0], meta)


def _token_ids(path, value: Any, vocab_size: int, field: str) -> list[int]:
    """A saved list of token ids, each an int in [0, vocab_size); SnapshotError otherwise."""
    if not isinstance(value, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in value
    ):
        raise SnapshotError(
            f"{os.fspath(path)}: {field} in the metadata must be a list of token "
            f"ids in [0, {vocab_size}) (corrupt metadata)"
        )
    return value
