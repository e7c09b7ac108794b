"""Reading and writing RecurrentGemma checkpoints.

Three layouts are read, all with the same ``load(path)``:

* a Hugging Face directory: ``config.json`` + ``model.safetensors`` (or
  ``model-0000K-of-0000N.safetensors`` shards + ``model.safetensors.index.json``);
* an official PyTorch state dict file (``.pt`` / ``.pth`` / ``.ckpt``, the
  ``recurrentgemma.torch.Griffin`` names; its config is inferred from the
  shapes, or given by ``preset``);
* an official Flax checkpoint directory written by Orbax (needs the optional
  extra ``rgemma[jax]``).

Tensors are read one at a time (safetensors and ``torch.load(mmap=True)`` map
the file) and copied into a model built on the ``meta`` device, so a load
holds the model once plus one tensor being converted.

Writing: ``save_hf`` (a directory ``transformers`` opens) and
``save_official`` (a ``torch.save`` file), both atomic: a failure never leaves
a destination that ``load`` would accept.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import json
import math
import mmap
import os
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from rgemma import weights
from rgemma.config import ConfigError, GriffinConfig
from rgemma.weights import WeightsError

OFFICIAL_SUFFIXES = (".pt", ".pth", ".ckpt")
CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json")
ORBAX_MARKERS = ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt", "checkpoint")
PROGRESS_MIN_BYTES = 100 * 2**20
JAX_HINT = "pip install 'rgemma[jax]'"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written; the message names the file."""


# ====================================================================== sources
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
            "and no Orbax metadata (_METADATA, _CHECKPOINT_METADATA, manifest.ocdbt)")
    if path.suffix in OFFICIAL_SUFFIXES:
        return _open_torch_file(path, preset)
    if path.suffix == ".safetensors":
        raise CheckpointError(
            f"{path}: a bare .safetensors file has no config; pass the directory holding it "
            f"and its {CONFIG_FILE}")
    raise CheckpointError(
        f"{path}: unknown checkpoint layout; expected a Hugging Face directory, an Orbax "
        f"directory or a PyTorch state dict file ({'/'.join(OFFICIAL_SUFFIXES)})")


# ----------------------------------------------------------- Hugging Face
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
                + (f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""))

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
            raise CheckpointError(f"{file}: cannot read tensor {stored}: {_first_line(e)} "
                                  "(truncated or corrupted file?)") from None

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

    def file_of(self, name: str) -> str:
        return str(self._where[name][0])

    def nbytes(self) -> int:
        return sum(math.prod(shape) * self.dtype_of(k).itemsize
                   for k, (shape, _) in self._meta.items())


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                       "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn,
                       "F8_E5M2": torch.float8_e5m2}


def _list_safetensors(file: Path) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, dtype string) of every tensor of a safetensors file."""
    from safetensors import safe_open
    if not file.exists():
        raise CheckpointError(f"{file}: no such file")
    try:
        with safe_open(str(file), framework="pt") as f:
            out = []
            for name in f.keys():
                s = f.get_slice(name)
                out.append((name, tuple(s.get_shape()), s.get_dtype()))
            return out
    except Exception as e:
        raise CheckpointError(f"{file}: not a valid safetensors file ({_first_line(e)}); "
                              "is it truncated or corrupted?") from None


def _open_hf(directory: Path, preset: str | None) -> Source:
    try:
        config = GriffinConfig.from_json_file(directory / CONFIG_FILE)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
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
            if not (directory / name).exists():
                raise CheckpointError(f"{index}: names shard {name}, which does not exist in "
                                      f"{directory}")
        return [directory / n for n in names], weight_map
    if (directory / SINGLE_FILE).exists():
        return [directory / SINGLE_FILE], None
    other = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt")]
    hint = f" (found {', '.join(other)}: only safetensors weights are read)" if other else ""
    raise CheckpointError(f"{directory}: no {SINGLE_FILE} and no {INDEX_FILE}{hint}")


def _read_index(index: Path) -> dict[str, str]:
    try:
        with open(index, encoding="utf-8") as f:
            data = json.load(f)
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{index}: not a valid safetensors index ({_first_line(e)})") from None
    return weight_map


def _check_tied_head(store: SafetensorsStore, directory: Path) -> None:
    """A stored lm_head must equal the embeddings (it is dropped from the store)."""
    if weights.LM_HEAD not in store:
        return
    try:
        weights.strip_hf_prefix({weights.LM_HEAD: store[weights.LM_HEAD],
                                 weights.EMBED: store[weights.EMBED]})
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
            raise CheckpointError(f"{label}: does not match preset {preset!r}: {field} is "
                                  f"{getattr(config, field)} but the preset has "
                                  f"{getattr(reference, field)}")


# ------------------------------------------------------------ PyTorch file
def _open_torch_file(path: Path, preset: str | None) -> Source:
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
                "which are not unpickled for safety (re-save it as a dict of tensors)") from None
        raise CheckpointError(f"{path}: cannot read as a PyTorch checkpoint: {_first_line(e)} "
                              "(truncated or corrupted file?)") from None
    if not isinstance(sd, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise CheckpointError(f"{path}: not a plain state dict (a mapping of names to tensors); "
                              f"found {type(sd).__name__}")
    return dict(sd), mapped


def _meta_like(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Shape-only (meta) copies of ``sd``, for cheap name/shape transforms."""
    return {k: torch.empty(tuple(v.shape), dtype=v.dtype, device="meta") for k, v in sd.items()}


def _infer_config(official: Mapping[str, Any], preset: str | None, path: Path) -> GriffinConfig:
    try:
        return weights.infer_config_from_official(official, preset, source=str(path))
    except (WeightsError, ConfigError) as e:
        raise CheckpointError(str(e) if str(path) in str(e) else f"{path}: {e}") from None


# ------------------------------------------------------------------ Orbax
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
            f"jax ({e.name} is missing): {JAX_HINT}") from None
    directory = Path(directory).absolute()
    checkpointer = ocp.PyTreeCheckpointer()
    try:
        metadata = checkpointer.metadata(directory)
        tree = getattr(getattr(metadata, "item_metadata", metadata), "tree", metadata)
        restore_args = jax.tree_util.tree_map(
            lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        params = checkpointer.restore(directory, restore_args=restore_args)
    except Exception as e:
        raise CheckpointError(f"{directory}: cannot restore the Orbax checkpoint: "
                              f"{_first_line(e)}") from None
    if not isinstance(params, Mapping):
        raise CheckpointError(f"{directory}: the Orbax checkpoint is not a params tree")
    return dict(params)


# ========================================================================= load
def load(path: str | os.PathLike, *, dtype: torch.dtype | None = None,
         device: torch.device | str = "cpu", preset: str | None = None,
         progress: bool = True, quantize: int | None = None):
    """A Griffin model (and its tokenizer, if the checkpoint has one) from ``path``.

    Args:
      path: a Hugging Face directory, an official PyTorch state dict file, or
        an Orbax checkpoint directory.
      dtype: the parameters' dtype; None keeps the checkpoint's.
      device: where the parameters go.
      preset: for official checkpoints, the preset whose window / soft-cap /
        embedding scaling to use (also checks the shapes against it).
      progress: show a progress bar for checkpoints over 100 MB.
      quantize: 8 or 4 to quantize the linear layers and embedding at load time
        (see rgemma.quantize). Directories written by ``rgemma quantize`` load
        quantized whatever this says.
    Returns:
      (model, tokenizer or None).
    Raises:
      CheckpointError naming the file and the problem.
    """
    from rgemma import quantize as q
    directory = Path(path)
    if directory.is_dir() and _is_quantized_dir(directory):
        return q.load_quantized(directory, device=device), load_tokenizer(directory)
    source = open_checkpoint(path, preset=preset)
    model = build_model(source, dtype=dtype, device=device, progress=progress)
    if quantize:
        q.quantize_model(model, bits=int(quantize))
    return model, load_tokenizer(source.directory)


def _is_quantized_dir(directory: Path) -> bool:
    try:
        with open(directory / CONFIG_FILE, encoding="utf-8") as f:
            return "rgemma_quantization" in json.load(f)
    except (OSError, ValueError):
        return False


def build_model(source: Source, *, dtype: torch.dtype | None = None,
                device: torch.device | str = "cpu", progress: bool = True):
    """Griffin for ``source.config`` with the source's tensors, copied one at a time.

    Each tensor is copied into fresh memory of ``dtype`` on ``device`` and then
    dropped (a plain-dict source is consumed), so the peak is about the model
    plus one tensor. Parameters are contiguous and own their memory.
    """
    from rgemma.model import Griffin
    try:
        weights.check_state_dict(source.shapes(), source.config, source.label,
                                 locations=source.locations)
    except WeightsError as e:
        raise CheckpointError(str(e)) from None
    dtype = as_dtype(dtype) or source.dtype()
    with torch.device("meta"):
        model = Griffin(source.config, dtype=dtype)
    state = {}
    with _progress_bar(source.nbytes(), progress, source.label) as bar:
        for name, tensor in iter_tensors(source.tensors, list(model.state_dict())):
            state[name] = torch.empty(tuple(tensor.shape), dtype=dtype, device=device)
            state[name].copy_(tensor)
            bar.update(tensor.numel() * tensor.element_size())
            if source.file_mapped:
                release_pages(tensor)
            del tensor
    model.load_state_dict(state, strict=True, assign=True)
    _check_materialized(model)
    return model.eval()


def iter_tensors(tensors: Mapping[str, torch.Tensor], names: list[str]
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) in checkpoint order when known; drops each from a dict once read."""
    if isinstance(tensors, SafetensorsStore):
        names = sorted(names, key=lambda n: tensors.file_of(n))
    for name in names:
        yield name, (tensors.pop(name) if isinstance(tensors, dict) else tensors[name])


def release_pages(tensor: torch.Tensor) -> None:
    """Drops the resident pages of a tensor memory-mapped from a file (Linux only).

    ``torch.load(mmap=True)`` maps the whole file once: every page read stays
    resident until the last tensor of the file dies, so copying a checkpoint
    into a model would hold it twice. After a tensor has been copied, its pages
    are dropped with ``madvise(MADV_DONTNEED)``; a later read of them (an
    overlapping neighbour) reloads them from the file, so nothing changes but
    the memory use. Only for read-only views of file mappings: on anonymous
    memory MADV_DONTNEED would zero the data.
    """
    if sys.platform != "linux" or tensor.numel() == 0:
        return
    libc = _libc()
    if libc is None:
        return
    page = mmap.PAGESIZE
    start = tensor.data_ptr() // page * page
    end = tensor.data_ptr() + _extent_bytes(tensor)
    libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)


_MADV_DONTNEED = 4


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _extent_bytes(t: torch.Tensor) -> int:
    """Bytes from ``t.data_ptr()`` to just past its last element (any strides)."""
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if n > 0)
    return (last + 1) * t.element_size()


def _check_materialized(model: torch.nn.Module) -> None:
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
            if t.device.type == "meta"]
    if left:
        raise RuntimeError(f"internal error: tensors left on the meta device: {left[:5]}")


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def _progress_bar(total: int, enabled: bool, label: str):
    if not enabled or total < PROGRESS_MIN_BYTES:
        return _NoBar()
    from tqdm.auto import tqdm
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                desc=f"loading {Path(label).name}", leave=False)


def load_tokenizer(directory: Path):
    """``rgemma.tokenizer.Tokenizer`` of ``directory`` (or its parent), or None."""
    for d in (directory, directory.parent):
        if any((d / f).exists() for f in ("tokenizer.model", "tokenizer.json")):
            try:
                from rgemma.tokenizer import Tokenizer
            except ImportError as e:
                warnings.warn(f"{d} has a tokenizer but rgemma.tokenizer is unavailable ({e})")
                return None
            return Tokenizer.from_dir(d)
    return None


# ======================================================================== save
def parse_size(size: int | str) -> int:
    """"5GB" / "500MB" / "2GiB" / "1000" / 1000 -> bytes (decimal units, like HF)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise CheckpointError(f"invalid size {size!r}; use e.g. 5GB, 500MB or a number of bytes")
    unit = (m.group(2) or "B").upper()
    power = " KMGT".index(unit[0]) if unit != "B" else 0
    base = 1024 if "I" in unit else 1000
    return int(float(m.group(1)) * base**power)


def plan_shards(sizes: Mapping[str, int], shard_size: int) -> list[list[str]]:
    """Greedy split of names (in order) into shards of at most ``shard_size`` bytes.

    A tensor larger than ``shard_size`` gets a shard of its own.
    """
    shards: list[list[str]] = [[]]
    used = 0
    for name, n in sizes.items():
        if shards[-1] and used + n > shard_size:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += n
    return shards


def shard_file_name(k: int, n: int) -> str:
    """Hugging Face shard naming: ``model-00001-of-00003.safetensors`` (k is 1-based)."""
    return SINGLE_FILE if n == 1 else f"model-{k:05d}-of-{n:05d}.safetensors"


def save_hf(model, directory: str | os.PathLike, *, dtype: torch.dtype | None = None,
            shard_size: int | str = "5GB", tokenizer_dir: str | os.PathLike | None = None,
            overwrite: bool = False, config: GriffinConfig | None = None,
            release_source_pages: bool = False) -> Path:
    """Writes a Hugging Face RecurrentGemma directory, atomically.

    Args:
      model: a Griffin (or any module with ``config`` and our state dict
        names), or a mapping of our names -> tensors with ``config`` given.
      directory: the destination (must not exist unless ``overwrite``).
      dtype: the stored dtype; None keeps each tensor's.
      shard_size: the largest shard ("5GB", "500MB", bytes); one file
        ``model.safetensors`` when everything fits.
      tokenizer_dir: tokenizer files (and a generation_config.json) there are
        copied along.
      overwrite: replace an existing destination.
      config: the config when ``model`` is a mapping.
      release_source_pages: the tensors are views of a memory-mapped file
        (``Source.file_mapped``): drop their pages once each shard is written.
    Returns:
      the destination path.
    """
    dtype = as_dtype(dtype)
    tensors, config = _tensors_and_config(model, config)
    info = tensor_info(tensors)
    _check_tensors({k: shape for k, (shape, _) in info.items()}, config, "the model to save")
    dst = Path(directory)
    with _atomic_dir(dst, overwrite) as tmp:
        _write_shards(tensors, info, tmp, dtype, parse_size(shard_size), release_source_pages)
        _write_generation_config(config, tmp)
        if tokenizer_dir is not None:
            _copy_tokenizer(Path(tokenizer_dir), tmp)
        hf = config.to_hf_dict()
        hf["torch_dtype"] = str(dtype or info[weights.EMBED][1]).removeprefix("torch.")
        _write_json(tmp / CONFIG_FILE, hf)  # last: a directory without it is not loadable
    return dst


def _tensors_and_config(model, config: GriffinConfig | None
                        ) -> tuple[Mapping[str, torch.Tensor], GriffinConfig]:
    if isinstance(model, Mapping):
        if config is None:
            raise TypeError("save_hf: pass config= when saving a state dict")
        if any(k.startswith(weights.HF_PREFIX) or k == weights.LM_HEAD for k in model):
            model = weights.strip_hf_prefix(model)
        return model, config
    return model.state_dict(), config or model.config


def tensor_info(tensors: Mapping[str, torch.Tensor]
                ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """name -> (shape, dtype), without reading a lazily stored tensor."""
    if isinstance(tensors, SafetensorsStore):
        return {k: (shape, tensors.dtype_of(k)) for k, shape in tensors.shapes().items()}
    return {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}


def _check_tensors(tensors: Mapping[str, torch.Tensor], config: GriffinConfig,
                   label: str) -> None:
    try:
        weights.check_state_dict(tensors, config, label)
    except WeightsError as e:
        raise CheckpointError(str(e)) from None


def _write_shards(tensors: Mapping[str, torch.Tensor], info: Mapping[str, tuple],
                  out: Path, dtype: torch.dtype | None, shard_size: int,
                  release: bool = False) -> None:
    """model.safetensors, or shards + model.safetensors.index.json, into ``out``.

    Only one shard's tensors are in memory at a time.
    """
    from safetensors.torch import save_file
    sizes = {name: math.prod(shape) * (dtype or dt).itemsize
             for name, (shape, dt) in info.items()}
    shards = plan_shards(sizes, shard_size)
    weight_map = {}
    for k, names in enumerate(shards, start=1):
        file = shard_file_name(k, len(shards))
        part = {weights.HF_PREFIX + n: _stored(tensors[n], dtype) for n in names}
        save_file(part, str(out / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in part})
        del part
        if release:
            for n in names:
                release_pages(tensors[n])
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())},
                 "weight_map": dict(sorted(weight_map.items()))}
        _write_json(out / INDEX_FILE, index)


def _stored(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``t`` on the CPU in ``dtype``, contiguous and owning its whole storage.

    (safetensors refuses tensors that share memory, e.g. the gate / up views
    of an official ``ffw_up.w``; views are cloned, whole tensors are not.)
    """
    t = t.detach().to(device="cpu", dtype=dtype or t.dtype)
    whole = (t.is_contiguous() and t.storage_offset() == 0
             and t.untyped_storage().nbytes() == t.numel() * t.element_size())
    return t if whole else t.clone(memory_format=torch.contiguous_format)


def _write_generation_config(config: GriffinConfig, out: Path) -> None:
    _write_json(out / GENERATION_CONFIG_FILE, {
        "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id})


def _copy_tokenizer(src: Path, out: Path) -> None:
    for name in TOKENIZER_FILES + (GENERATION_CONFIG_FILE,):
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


class _atomic_dir:
    """Context: a temp directory beside ``dst`` renamed to ``dst`` on success.

    On failure the temp directory is removed and ``dst`` is left untouched.
    """

    def __init__(self, dst: Path, overwrite: bool):
        self.dst, self.overwrite = dst, overwrite

    def __enter__(self) -> Path:
        if self.dst.exists() and not self.overwrite:
            raise CheckpointError(f"{self.dst}: already exists (pass overwrite=True / "
                                  "--overwrite to replace it)")
        self.dst.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.dst.name}.tmp-", dir=self.dst.parent))
        os.chmod(self.tmp, 0o777 & ~_umask())  # mkdtemp makes it private (0700)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = None
        if self.dst.exists():
            old = self.dst.parent / f".{self.dst.name}.old-{os.getpid()}"
            os.replace(self.dst, old)
        os.replace(self.tmp, self.dst)
        if old is not None:
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()


def save_official(model_or_sd, path: str | os.PathLike, dtype: torch.dtype | None = None,
                  *, overwrite: bool = False) -> Path:
    """``torch.save`` of the official-named state dict, atomically.

    Args:
      model_or_sd: a Griffin, or a state dict with our / Hugging Face names.
      path: the destination file (``.pt`` by convention).
      dtype: the stored dtype; None keeps each tensor's.
      overwrite: replace an existing file.
    """
    dtype = as_dtype(dtype)
    sd = model_or_sd.state_dict() if hasattr(model_or_sd, "state_dict") else model_or_sd
    try:
        official = weights.hf_to_official(sd)
    except WeightsError as e:
        raise CheckpointError(f"cannot save {path}: {e}") from None
    official = {k: _stored(v, dtype) for k, v in official.items()}
    dst = Path(path)
    if dst.exists() and not overwrite:
        raise CheckpointError(f"{dst}: already exists (pass overwrite=True / --overwrite)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.tmp-", dir=dst.parent)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private (0600)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(official, f)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dst


# ==================================================================== convert
def output_layout(dst: str | os.PathLike, to: str | None = None) -> str:
    """"hf" or "official": ``to`` if given, else "official" for a .pt/.pth/.ckpt name."""
    if to is not None:
        return to
    return "official" if str(dst).lower().endswith(OFFICIAL_SUFFIXES) else "hf"


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, to: str | None = None,
            dtype: torch.dtype | str | None = None, shard_size: int | str = "5GB",
            preset: str | None = None, overwrite: bool = False) -> Path:
    """Converts a checkpoint without building a model (tensors stream through).

    Args:
      src: any layout ``load`` reads.
      dst: a directory (Hugging Face layout) or a file (official layout).
      to: "hf" or "official"; None picks from ``dst``'s name (see output_layout).
      dtype: the stored dtype (None keeps the source's).
      shard_size: the largest safetensors shard of a HF output.
      preset: for official / Orbax sources, the preset of the non-shape fields.
      overwrite: replace an existing ``dst``.
    Returns:
      ``dst`` as a Path.
    """
    to = output_layout(dst, to)
    source = open_checkpoint(src, preset=preset)
    try:
        weights.check_state_dict(source.shapes(), source.config, source.label,
                                 locations=source.locations)
    except WeightsError as e:
        raise CheckpointError(str(e)) from None
    if to == "hf":
        tok = source.directory if _has_tokenizer(source.directory) else None
        return save_hf(source.tensors, dst, config=source.config, dtype=dtype,
                       shard_size=shard_size, tokenizer_dir=tok, overwrite=overwrite,
                       release_source_pages=source.file_mapped)
    if to == "official":
        return save_official(source.tensors, dst, dtype, overwrite=overwrite)
    raise CheckpointError(f"unknown output layout {to!r}; use 'hf' or 'official'")


def _has_tokenizer(directory: Path) -> bool:
    return any((directory / f).is_file() for f in TOKENIZER_FILES)


def as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """torch.bfloat16 / "bfloat16" / "bf16" -> torch.bfloat16 (None stays None)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
            "float": "float32"}.get(str(dtype), str(dtype)).removeprefix("torch.")
    if name not in ("float32", "bfloat16", "float16", "float64"):
        raise CheckpointError(f"unsupported dtype {dtype!r}; use float32, bfloat16 or float16")
    return getattr(torch, name)


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]
