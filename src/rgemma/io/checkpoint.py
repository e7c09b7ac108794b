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

import math
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from rgemma import weights
from rgemma.config import GriffinConfig
from rgemma.dtypes import as_dtype
from rgemma.io.files import (
    CONFIG_FILE,
    GENERATION_CONFIG_FILE,
    INDEX_FILE,
    OFFICIAL_SUFFIXES,
    SINGLE_FILE,
    CheckpointError,
    atomic_dir,
    copy_tokenizer,
    has_tokenizer,
    progress_bar,
    release_pages,
    umask,
    write_json,
)
from rgemma.io.sources import SafetensorsStore, Source, open_checkpoint
from rgemma.weights import WeightsError

__all__ = [
    "CheckpointError",
    "INDEX_FILE",
    "SINGLE_FILE",
    "Source",
    "convert",
    "load",
    "open_checkpoint",
    "parse_size",
    "plan_shards",
    "save_hf",
    "save_official",
    "shard_file_name",
]


# ========================================================================= load
def load(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    preset: str | None = None,
    progress: bool = True,
    quantize: int | None = None,
):
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
    from rgemma.io import quantized

    directory = Path(path)
    if directory.is_dir() and quantized.is_quantized_dir(directory):
        return quantized.load_quantized(directory, device=device), load_tokenizer(directory)
    source = open_checkpoint(path, preset=preset)
    model = build_model(source, dtype=dtype, device=device, progress=progress)
    if quantize:
        from rgemma.quantize import quantize_model

        quantize_model(model, bits=int(quantize))
    return model, load_tokenizer(source.directory)


def build_model(
    source: Source,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
):
    """Griffin for ``source.config`` with the source's tensors, copied one at a time.

    Each tensor is copied into fresh memory of ``dtype`` on ``device`` and then
    dropped (a plain-dict source is consumed), so the peak is about the model
    plus one tensor. Parameters are contiguous and own their memory.
    """
    from rgemma.model import Griffin

    source.check()
    dtype = as_dtype(dtype) or source.dtype()
    with torch.device("meta"):
        model = Griffin(source.config, dtype=dtype)
    state = {}
    with progress_bar(source.nbytes(), progress, source.label) as bar:
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


def iter_tensors(
    tensors: Mapping[str, torch.Tensor], names: list[str]
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) in checkpoint order when known; drops each from a dict once read."""
    if isinstance(tensors, SafetensorsStore):
        names = sorted(names, key=lambda n: tensors.file_of(n))
    for name in names:
        yield name, (tensors.pop(name) if isinstance(tensors, dict) else tensors[name])


def _check_materialized(model: torch.nn.Module) -> None:
    left = [
        n
        for n, t in list(model.named_parameters()) + list(model.named_buffers())
        if t.device.type == "meta"
    ]
    if left:
        raise RuntimeError(f"internal error: tensors left on the meta device: {left[:5]}")


def tokenizer_source(source: Source, tokenizer_dir: str | os.PathLike | None = None) -> Path | None:
    """The directory whose tokenizer files go with ``source``: ``tokenizer_dir`` (which must
    hold them), else the source's own directory if it has them, else None."""
    if tokenizer_dir is not None:
        if not has_tokenizer(Path(tokenizer_dir)):
            raise CheckpointError(f"{tokenizer_dir}: no tokenizer.model or tokenizer.json there")
        return Path(tokenizer_dir)
    return source.directory if has_tokenizer(source.directory) else None


def load_tokenizer(directory: Path):
    """``rgemma.io.tokenizer.Tokenizer`` of ``directory`` (or its parent), or None."""
    for d in (directory, directory.parent):
        if any((d / f).exists() for f in ("tokenizer.model", "tokenizer.json")):
            from rgemma.io.tokenizer import Tokenizer

            return Tokenizer.from_dir(d)
    return None


# ======================================================================== save
def parse_size(size: int | str) -> int:
    """ "5GB" / "500MB" / "2GiB" / "1000" / 1000 -> bytes (decimal units, like HF)."""
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


def save_hf(
    model,
    directory: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    shard_size: int | str = "5GB",
    tokenizer_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    config: GriffinConfig | None = None,
    release_source_pages: bool = False,
) -> Path:
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
    with atomic_dir(dst, overwrite) as tmp:
        _write_shards(tensors, info, tmp, dtype, parse_size(shard_size), release_source_pages)
        _write_generation_config(config, tmp)
        if tokenizer_dir is not None:
            copy_tokenizer(Path(tokenizer_dir), tmp)
        hf = config.to_hf_dict()
        hf["torch_dtype"] = str(dtype or info[weights.EMBED][1]).removeprefix("torch.")
        write_json(tmp / CONFIG_FILE, hf)  # last: a directory without it is not loadable
    return dst


def _tensors_and_config(
    model, config: GriffinConfig | None
) -> tuple[Mapping[str, torch.Tensor], GriffinConfig]:
    if isinstance(model, Mapping):
        if config is None:
            raise TypeError("save_hf: pass config= when saving a state dict")
        if any(k.startswith(weights.HF_PREFIX) or k == weights.LM_HEAD for k in model):
            model = weights.strip_hf_prefix(model)
        return model, config
    return model.state_dict(), config or model.config


def tensor_info(
    tensors: Mapping[str, torch.Tensor],
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """name -> (shape, dtype), without reading a lazily stored tensor."""
    if isinstance(tensors, SafetensorsStore):
        return {k: (shape, tensors.dtype_of(k)) for k, shape in tensors.shapes().items()}
    return {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}


def _check_tensors(tensors: Mapping[str, torch.Tensor], config: GriffinConfig, label: str) -> None:
    try:
        weights.check_state_dict(tensors, config, label)
    except WeightsError as e:
        raise CheckpointError(str(e)) from None


def _write_shards(
    tensors: Mapping[str, torch.Tensor],
    info: Mapping[str, tuple],
    out: Path,
    dtype: torch.dtype | None,
    shard_size: int,
    release: bool = False,
) -> None:
    """model.safetensors, or shards + model.safetensors.index.json, into ``out``.

    Only one shard's tensors are in memory at a time.
    """
    from safetensors.torch import save_file

    sizes = {name: math.prod(shape) * (dtype or dt).itemsize for name, (shape, dt) in info.items()}
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
        index = {
            "metadata": {"total_size": sum(sizes.values())},
            "weight_map": dict(sorted(weight_map.items())),
        }
        write_json(out / INDEX_FILE, index)


def _stored(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``t`` on the CPU in ``dtype``, contiguous and owning its whole storage.

    (safetensors refuses tensors that share memory, e.g. the gate / up views
    of an official ``ffw_up.w``; views are cloned, whole tensors are not.)
    """
    t = t.detach().to(device="cpu", dtype=dtype or t.dtype)
    whole = (
        t.is_contiguous()
        and t.storage_offset() == 0
        and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    )
    return t if whole else t.clone(memory_format=torch.contiguous_format)


def _write_generation_config(config: GriffinConfig, out: Path) -> None:
    write_json(
        out / GENERATION_CONFIG_FILE,
        {
            "bos_token_id": config.bos_token_id,
            "eos_token_id": config.eos_token_id,
            "pad_token_id": config.pad_token_id,
        },
    )


def save_official(
    model_or_sd,
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    *,
    overwrite: bool = False,
) -> Path:
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
    os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes it private (0600)
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
    """ "hf" or "official": ``to`` if given, else "official" for a .pt/.pth/.ckpt name."""
    if to is not None:
        return to
    return "official" if str(dst).lower().endswith(OFFICIAL_SUFFIXES) else "hf"


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    to: str | None = None,
    dtype: torch.dtype | str | None = None,
    shard_size: int | str = "5GB",
    preset: str | None = None,
    overwrite: bool = False,
    tokenizer_dir: str | os.PathLike | None = None,
) -> Path:
    """Converts a checkpoint without building a model (tensors stream through).

    Args:
      src: any layout ``load`` reads.
      dst: a directory (Hugging Face layout) or a file (official layout).
      to: "hf" or "official"; None picks from ``dst``'s name (see output_layout).
      dtype: the stored dtype (None keeps the source's).
      shard_size: the largest safetensors shard of a HF output.
      preset: for official / Orbax sources, the preset of the non-shape fields.
      overwrite: replace an existing ``dst``.
      tokenizer_dir: where the tokenizer files are, for a HF output (default:
        beside the source; see ``tokenizer_source``).
    Returns:
      ``dst`` as a Path.
    """
    to = output_layout(dst, to)
    source = open_checkpoint(src, preset=preset)
    source.check()
    if to == "hf":
        tok = tokenizer_source(source, tokenizer_dir)
        return save_hf(
            source.tensors,
            dst,
            config=source.config,
            dtype=dtype,
            shard_size=shard_size,
            tokenizer_dir=tok,
            overwrite=overwrite,
            release_source_pages=source.file_mapped,
        )
    if to == "official":
        return save_official(source.tensors, dst, dtype, overwrite=overwrite)
    raise CheckpointError(f"unknown output layout {to!r}; use 'hf' or 'official'")
