"""Opening a checkpoint in any published layout as a ``Source``: its config and its
tensors under our (Hugging Face) names, read lazily.

* a Hugging Face directory: ``config.json`` + ``model.safetensors`` (or
  ``model-0000K-of-0000N.safetensors`` shards + ``model.safetensors.index.json``);
* an official PyTorch state dict file (``.pt`` / ``.pth`` / ``.ckpt``, the
  ``recurrentgemma.torch.Griffin`` names; its config is inferred from the
  shapes, or given by ``preset``);
* an official Flax checkpoint directory written by Orbax (needs the optional
  extra ``rgemma[jax]``).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from rgemma import weights
from rgemma.config import ConfigError, GriffinConfig
from rgemma.errors import one_line
from rgemma.io.files import (
    CONFIG_FILE,
    INDEX_FILE,
    OFFICIAL_SUFFIXES,
    SINGLE_FILE,
    CheckpointError,
    check_regular,
    read_config,
    read_json,
)
from rgemma.weights import WeightsError

ORBAX_MARKERS = ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt", "checkpoint")


JAX_HINT = "pip install 'rgemma[jax]'"


@dataclasses.dataclass
class Source:
    """An opened checkpoint: its config and its tensors under our names, read lazily.

    Attributes:
      config: the model's shape.
      tensors: our names -> tensors; reading an item reads that tensor only.
      directory: where tokenizer / generation config files may be found.
      label: the path, for messages.
      locations: our names -> the file holding each tensor (for messages).
      file_mapped: the tensors are views of one memory-mapped file (pages of
        a tensor already copied can be released, see release_pages).
    """

    config: GriffinConfig
    tensors: Mapping[str, torch.Tensor]
    directory: Path
    label: str
    locations: Mapping[str, str] = dataclasses.field(default_factory=dict)
    file_mapped: bool = False

    def shapes(self) -> dict[str, tuple[int, ...]]:
        if isinstance(self.tensors, SafetensorsStore):
            return self.tensors.shapes()
        return {k: tuple(v.shape) for k, v in self.tensors.items()}

    def dtype(self) -> torch.dtype:
        """The stored dtype of the embeddings (the checkpoint's dtype)."""
        if isinstance(self.tensors, SafetensorsStore):
            return self.tensors.dtype_of(weights.EMBED)
        return self.tensors[weights.EMBED].dtype

    def nbytes(self) -> int:
        if isinstance(self.tensors, SafetensorsStore):
            return self.tensors.nbytes()
        return weights.num_bytes(self.tensors)

    def check(self) -> None:
        """CheckpointError unless the tensors are exactly the config's, in floating point."""
        try:
            weights.check_state_dict(
                self.shapes(), self.config, self.label, locations=self.locations
            )
        except WeightsError as e:
            raise CheckpointError(str(e)) from None
        self.check_float()

    def check_float(self) -> None:
        """CheckpointError naming a tensor that is not floating point (an integer or bool
        tensor where a weight belongs would otherwise be cast silently)."""
        if isinstance(self.tensors, SafetensorsStore):
            stored = {k: self.tensors.stored_dtype(k) for k in self.tensors}
            bad = {k: v for k, v in stored.items() if v not in _SAFETENSORS_DTYPES}
        else:
            bad = {
                k: str(v.dtype).removeprefix("torch.")
                for k, v in self.tensors.items()
                if not v.is_floating_point()
            }
        if bad:
            name, dtype = next(iter(bad.items()))
            raise CheckpointError(
                f"{self.locations.get(name, self.label)}: tensor {name} is "
                f"{dtype}, not floating point: not model weights"
            )


def open_checkpoint(path: str | os.PathLike, *, preset: str | None = None) -> Source:
    """Detects the layout of ``path`` and opens it (nothing big is read yet)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir():
        if (path / CONFIG_FILE).exists():
            return _open_hf(path, preset)
        if any((path / m).exists() for m in ORBAX_MARKERS):
            return _open_orbax(path, preset)
        raise CheckpointError(
            f"{path}: not a checkpoint directory: no {CONFIG_FILE} (Hugging Face layout) "
            "and no Orbax metadata (_METADATA, _CHECKPOINT_METADATA, manifest.ocdbt)"
        )
    if path.suffix in OFFICIAL_SUFFIXES:
        return _open_torch_file(path, preset)
    if path.suffix == ".safetensors":
        raise CheckpointError(
            f"{path}: a bare .safetensors file has no config; pass the directory holding it "
            f"and its {CONFIG_FILE}"
        )
    raise CheckpointError(
        f"{path}: unknown checkpoint layout; expected a Hugging Face directory, an Orbax "
        f"directory or a PyTorch state dict file ({'/'.join(OFFICIAL_SUFFIXES)})"
    )


class SafetensorsStore(Mapping):
    """Our names -> tensors of safetensors files, each read on access.

    Args:
      files: the shard files.
      weight_map: Hugging Face name -> shard file name, or None to list each
        file's own tensors.
    """

    def __init__(self, files: list[Path], weight_map: Mapping[str, str] | None = None):
        self._where: dict[str, tuple[Path, str]] = {}  # ours -> (file, stored name)
        self._meta: dict[str, tuple[tuple[int, ...], str]] = {}  # ours -> (shape, dtype)
        for file in files:
            for stored, shape, dtype in _list_safetensors(file):
                if weight_map is not None and weight_map.get(stored) != file.name:
                    continue
                ours = stored.removeprefix(weights.HF_PREFIX)
                self._where[ours] = (file, stored)
                self._meta[ours] = (shape, dtype)
        if weight_map is not None:
            self._check_weight_map(weight_map, files)

    def _check_weight_map(self, weight_map: Mapping[str, str], files: list[Path]) -> None:
        found = {stored for _, stored in self._where.values()}
        absent = [k for k in weight_map if k not in found]
        if absent:
            file = files[0].parent / weight_map[absent[0]]
            raise CheckpointError(
                f"{file}: lacks tensor {absent[0]} that {INDEX_FILE} places there"
                + (f" (and {len(absent) - 1} more)" if len(absent) > 1 else "")
            )

    def __getitem__(self, name: str) -> torch.Tensor:
        """The tensor, memory-mapped from its file.

        The file is opened for this one tensor, so once the caller drops the
        tensor its pages leave the process (a handle kept open would keep
        every page read so far mapped, i.e. resident).
        """
        from safetensors import safe_open

        file, stored = self._where[name]
        try:
            with safe_open(str(file), framework="pt") as f:
                return f.get_tensor(stored)
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(
                f"{file}: cannot read tensor {stored}: {one_line(e)} (truncated or corrupted file?)"
            ) from None

    def drop(self, name: str) -> None:
        """Forgets tensor ``name`` (e.g. a tied lm_head)."""
        del self._where[name], self._meta[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: shape for k, (shape, _) in self._meta.items()}

    def dtype_of(self, name: str) -> torch.dtype:
        return _SAFETENSORS_DTYPES.get(self._meta[name][1], torch.float32)

    def stored_dtype(self, name: str) -> str:
        """The dtype as the file names it ("BF16", "I64"...)."""
        return self._meta[name][1]

    def file_of(self, name: str) -> str:
        return str(self._where[name][0])

    def nbytes(self) -> int:
        return sum(
            math.prod(shape) * self.dtype_of(k).itemsize for k, (shape, _) in self._meta.items()
        )


_SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def _list_safetensors(file: Path) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, dtype string) of every tensor of a safetensors file."""
    from safetensors import safe_open

    check_regular(file, "safetensors file")
    try:
        with safe_open(str(file), framework="pt") as f:
            out = []
            for name in f.keys():
                s = f.get_slice(name)
                out.append((name, tuple(s.get_shape()), s.get_dtype()))
            return out
    except Exception as e:
        raise CheckpointError(
            f"{file}: not a valid safetensors file ({one_line(e)}); is it truncated or corrupted?"
        ) from None


def _open_hf(directory: Path, preset: str | None) -> Source:
    config = read_config(directory / CONFIG_FILE)
    if preset is not None:
        _check_preset(config, preset, str(directory / CONFIG_FILE))
    files, weight_map = _hf_weight_files(directory)
    store = SafetensorsStore(files, weight_map)
    _check_tied_head(store, directory)
    locations = {k: store.file_of(k) for k in store}
    return Source(config, store, directory, str(directory), locations)


def _hf_weight_files(directory: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of a HF directory (and the index's weight map, if sharded)."""
    index = directory / INDEX_FILE
    if index.exists():
        weight_map = _read_index(index)
        names = sorted(set(weight_map.values()))
        for name in names:
            if Path(name).name != name or name in (".", ".."):
                raise CheckpointError(
                    f"{index}: names shard {name!r}, which is not a file name inside {directory}"
                )
            if not (directory / name).exists():
                raise CheckpointError(
                    f"{index}: names shard {name}, which does not exist in {directory}"
                )
        return [directory / n for n in names], weight_map
    if (directory / SINGLE_FILE).exists():
        return [directory / SINGLE_FILE], None
    other = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt")]
    hint = f" (found {', '.join(other)}: only safetensors weights are read)" if other else ""
    raise CheckpointError(f"{directory}: no {SINGLE_FILE} and no {INDEX_FILE}{hint}")


def _read_index(index: Path) -> dict[str, str]:
    data = read_json(index, "safetensors index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: not a valid safetensors index (no weight_map object)")
    bad = [k for k, v in weight_map.items() if not isinstance(v, str)]
    if bad:
        raise CheckpointError(
            f"{index}: not a valid safetensors index: the shard of {bad[0]!r} is not a file name"
        )
    return weight_map


def _check_tied_head(store: SafetensorsStore, directory: Path) -> None:
    """A stored lm_head must equal the embeddings (it is dropped from the store)."""
    if weights.LM_HEAD not in store:
        return
    try:
        weights.strip_hf_prefix(
            {weights.LM_HEAD: store[weights.LM_HEAD], weights.EMBED: store[weights.EMBED]}
        )
    except WeightsError as e:
        raise CheckpointError(f"{directory}: {e}") from None
    store.drop(weights.LM_HEAD)


def _check_preset(config: GriffinConfig, preset: str, label: str) -> None:
    try:
        reference = GriffinConfig.from_preset(preset)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    for field in ("width", "mlp_width", "num_heads", "lru_width", "block_types"):
        if getattr(config, field) != getattr(reference, field):
            raise CheckpointError(
                f"{label}: does not match preset {preset!r}: {field} is "
                f"{getattr(config, field)} but the preset has "
                f"{getattr(reference, field)}"
            )


def _open_torch_file(path: Path, preset: str | None) -> Source:
    check_regular(path, "checkpoint")
    sd, mapped = _torch_load_state_dict(path)
    try:
        if weights.EMBED in sd or weights.HF_PREFIX + weights.EMBED in sd:
            ours = weights.strip_hf_prefix(sd)  # a torch.save'd rgemma / HF state dict
            official_shapes = weights.hf_to_official(_meta_like(ours))
        else:
            official_shapes = sd
            ours = weights.official_to_hf(sd)
    except WeightsError as e:
        raise CheckpointError(f"{path}: {e}") from None
    config = _infer_config(official_shapes, preset, path)
    return Source(config, ours, path.parent, str(path), file_mapped=mapped)


def _torch_load_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """``torch.load`` with weights_only, memory-mapped when the format allows.

    Returns:
      (state dict, whether its tensors are memory-mapped from the file).
    """
    mapped = True
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            mapped = False  # legacy (non-zip) format: read into memory
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise CheckpointError(
                f"{path}: not a plain state dict: it holds Python objects other than tensors, "
                "which are not unpickled for safety (re-save it as a dict of tensors)"
            ) from None
        raise CheckpointError(
            f"{path}: cannot read as a PyTorch checkpoint: {one_line(e)} "
            "(truncated or corrupted file?)"
        ) from None
    if not isinstance(sd, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()
    ):
        raise CheckpointError(
            f"{path}: not a plain state dict (a mapping of names to tensors); "
            f"found {type(sd).__name__}"
        )
    return dict(sd), mapped


def _meta_like(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Shape-only (meta) copies of ``sd``, for cheap name/shape transforms."""
    return {k: torch.empty(tuple(v.shape), dtype=v.dtype, device="meta") for k, v in sd.items()}


def _infer_config(official: Mapping[str, Any], preset: str | None, path: Path) -> GriffinConfig:
    try:
        return weights.infer_config_from_official(official, preset, source=str(path))
    except (WeightsError, ConfigError) as e:
        raise CheckpointError(str(e) if str(path) in str(e) else f"{path}: {e}") from None


def _open_orbax(directory: Path, preset: str | None) -> Source:
    params = read_orbax_params(directory)
    official = weights.flax_to_official(params)
    del params
    config = _infer_config(official, preset, directory)
    try:
        ours = weights.official_to_hf(official)
    except WeightsError as e:
        raise CheckpointError(f"{directory}: {e}") from None
    return Source(config, ours, directory, str(directory))


def read_orbax_params(directory: str | os.PathLike) -> dict[str, Any]:
    """The Flax params tree of an Orbax checkpoint, restored as numpy arrays."""
    try:
        import jax
        import numpy as np
        import orbax.checkpoint as ocp
    except ImportError as e:
        raise CheckpointError(
            f"{directory} is an Orbax (Flax) checkpoint; reading it needs orbax-checkpoint and "
            f"jax ({e.name} is missing): {JAX_HINT}"
        ) from None
    directory = Path(directory).absolute()
    checkpointer = ocp.PyTreeCheckpointer()
    try:
        metadata = checkpointer.metadata(directory)
        tree = getattr(getattr(metadata, "item_metadata", metadata), "tree", metadata)
        restore_args = jax.tree_util.tree_map(
            lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree
        )
        params = checkpointer.restore(directory, restore_args=restore_args)
    except Exception as e:
        raise CheckpointError(
            f"{directory}: cannot restore the Orbax checkpoint: {one_line(e)}"
        ) from None
    if not isinstance(params, Mapping):
        raise CheckpointError(f"{directory}: the Orbax checkpoint is not a params tree")
    return dict(params)
