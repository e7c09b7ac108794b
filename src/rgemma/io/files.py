"""The files of a checkpoint on disk: their names, and reading and writing them safely.

Every directory or file rgemma writes appears whole or not at all: it is
written beside its destination under a temporary name and renamed into
place (``atomic_dir``).
"""

from __future__ import annotations

import ctypes
import functools
import json
import mmap
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

OFFICIAL_SUFFIXES = (".pt", ".pth", ".ckpt")


CONFIG_FILE = "config.json"


SINGLE_FILE = "model.safetensors"


INDEX_FILE = "model.safetensors.index.json"


GENERATION_CONFIG_FILE = "generation_config.json"


TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


PROGRESS_MIN_BYTES = 100 * 2**20


MAX_JSON_BYTES = 64 << 20  # config, index and tokenizer JSON: far above any real one


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written; the message names the file."""


def open_regular(path: str | os.PathLike, what: str = "file"):
    """Opens ``path`` for reading if it is a regular file; CheckpointError otherwise.

    A FIFO, a device (``/dev/zero``) or a directory under a checkpoint's file
    name would block or never end; the check is made on the opened file, so
    a name swapped between a check and the open cannot slip through.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open the {what} ({e.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(f"{path}: the {what} is not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def check_regular(path: str | os.PathLike, what: str = "file") -> None:
    """CheckpointError unless ``path`` is a regular file (see ``open_regular``)."""
    open_regular(path, what).close()


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """The JSON value of a regular file of at most MAX_JSON_BYTES; CheckpointError naming
    the file otherwise (not a file, too large, not UTF-8 JSON)."""
    with open_regular(path, what) as f:
        data = f.read(MAX_JSON_BYTES + 1)
    if len(data) > MAX_JSON_BYTES:
        raise CheckpointError(f"{path}: the {what} is larger than {MAX_JSON_BYTES >> 20} MB")
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def read_config(path: str | os.PathLike):
    """The GriffinConfig of a Hugging Face ``config.json``; CheckpointError naming the file."""
    from rgemma.config import ConfigError, GriffinConfig

    d = read_json(path, "config.json")
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    try:
        return GriffinConfig.from_hf_dict(d)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


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


def progress_bar(total: int, enabled: bool, label: str):
    """A byte progress bar for reading ``label``, shown for large checkpoints only."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=f"loading {Path(label).name}",
        leave=False,
        disable=not enabled or total < PROGRESS_MIN_BYTES,
    )


def copy_tokenizer(src: Path, out: Path) -> None:
    for name in TOKENIZER_FILES + (GENERATION_CONFIG_FILE,):
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: Path, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


class atomic_dir:
    """Context: a temp directory beside ``dst`` renamed to ``dst`` on success.

    On failure the temp directory is removed and ``dst`` is left untouched.
    """

    def __init__(self, dst: Path, overwrite: bool):
        self.dst, self.overwrite = dst, overwrite

    def __enter__(self) -> Path:
        if self.dst.exists() and not self.overwrite:
            raise CheckpointError(
                f"{self.dst}: already exists (pass overwrite=True / --overwrite to replace it)"
            )
        self.dst.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.dst.name}.tmp-", dir=self.dst.parent))
        os.chmod(self.tmp, 0o777 & ~umask())  # mkdtemp makes it private (0700)
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


def has_tokenizer(directory: Path) -> bool:
    return any((directory / f).is_file() for f in TOKENIZER_FILES)
