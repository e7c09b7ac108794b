"""rgemma's quantized checkpoint directory (written by ``rgemma quantize``).

config.json (Hugging Face fields + "rgemma_quantization": {bits, group_size,
embedding}), model.safetensors with the quantized buffers (qweight, scale,
minimum) and the float tensors that stay unquantized, and the tokenizer files.

Its ``model_type`` is ``rgemma_quantized``, not ``recurrent_gemma``: other
loaders (``transformers``) refuse the directory instead of filling a model with
random weights where the quantized tensors do not match their names.
Directories of earlier versions (``recurrent_gemma`` + the quantization key)
still load.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rgemma.config import ConfigError, GriffinConfig
from rgemma.io.files import (
    CONFIG_FILE,
    CheckpointError,
    atomic_dir,
    check_regular,
    copy_tokenizer,
    read_json,
    write_json,
)
from rgemma.model import Griffin
from rgemma.quantize import QuantizationError, quantize_model, ready_quantized

QUANT_KEY = "rgemma_quantization"
MODEL_TYPE = "rgemma_quantized"


def save_quantized(model, directory, *, tokenizer_dir=None, overwrite: bool = False) -> None:
    """Writes a quantized model atomically (temp dir beside it, then rename)."""
    from safetensors.torch import save_file

    if not getattr(model, "quantization", None):
        raise QuantizationError("model is not quantized: call quantize_model first")
    dst = Path(directory)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    config = {**model.config.to_hf_dict(), "model_type": MODEL_TYPE, QUANT_KEY: model.quantization}
    with atomic_dir(dst, overwrite) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer_dir is not None:
            copy_tokenizer(Path(tokenizer_dir), tmp)
        write_json(tmp / CONFIG_FILE, config)  # last: marks it complete


def load_quantized(directory, *, device="cpu"):
    """A quantized Griffin from a directory written by ``save_quantized``."""
    from safetensors import safe_open

    directory = Path(directory)
    raw = read_json(directory / CONFIG_FILE, "config.json")
    spec = raw.get(QUANT_KEY) if isinstance(raw, dict) else None
    if not isinstance(spec, dict) or spec.get("bits") not in (8, 4):
        raise CheckpointError(
            f"{directory / CONFIG_FILE}: not an rgemma quantized checkpoint "
            f"({QUANT_KEY} must name bits 8 or 4)"
        )
    try:
        config = GriffinConfig.from_hf_dict({**raw, "model_type": "recurrent_gemma"})
    except ConfigError as e:
        raise CheckpointError(f"{directory / CONFIG_FILE}: {e}") from None
    with torch.device("meta"):
        model = Griffin(config, dtype=torch.bfloat16)
        quantize_model(
            model,
            bits=int(spec["bits"]),
            group_size=int(spec.get("group_size") or 128),
            embedding=bool(spec.get("embedding", True)),
        )
    expected = model.state_dict()
    path = directory / "model.safetensors"
    check_regular(path, "safetensors file")
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for damaged files
        raise CheckpointError(f"{path}: cannot read ({e})") from None
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    bad = [
        f"{k}: expected {tuple(expected[k].shape)}, found {tuple(stored[k].shape)}"
        for k in expected
        if k in stored and stored[k].shape != expected[k].shape
    ]
    if missing or unexpected or bad:
        raise CheckpointError(
            f"{path}: does not match its config ({len(missing)} missing, {len(unexpected)} "
            f"unexpected, {len(bad)} mis-shaped: {(missing + unexpected + bad)[:5]})"
        )
    model.load_state_dict(stored, assign=True)
    model.quantization = spec
    return ready_quantized(model.to(device))


def is_quantized_dir(directory: Path) -> bool:
    """Whether ``directory`` holds a checkpoint written by ``save_quantized``."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        return False
    raw = read_json(path, "config.json")
    return isinstance(raw, dict) and (raw.get("model_type") == MODEL_TYPE or QUANT_KEY in raw)
