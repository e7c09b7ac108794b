"""Names of the dtypes rgemma reads, stores and computes in, and their parsing."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DTYPE_NAMES = ("float32", "bfloat16", "float16")  # what the command line offers
_ALIASES = {
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "fp32": "float32",
    "float": "float32",
}
_ACCEPTED = DTYPE_NAMES + ("float64",)


def as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """torch.bfloat16 / "bfloat16" / "bf16" / "torch.bfloat16" -> torch.bfloat16.

    None and "auto" give None (keep the checkpoint's); anything else is a
    ValueError naming the accepted names.
    """
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    name = _ALIASES.get(name, name)
    if name == "auto":
        return None
    if name not in _ACCEPTED:
        raise ValueError(f"unsupported dtype {dtype!r}; use float32, bfloat16 or float16")
    return getattr(torch, name)
