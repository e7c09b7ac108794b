"""rgemma's quantized checkpoint directory (written by ``rgemma quantize``).

config.json (Hugging Face fields + "rgemma_quantization": {bits, group_size,
embedding}), model.safetensors with the quantized buffers (qweight, scale,
minimum) and the float tensors that stay unquantized, and the tokenizer files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rgemma.config import GriffinConfig
from rgemma.io.files import CONFIG_FILE, CheckpointError, atomic_dir, copy_tokenizer, write_json
from rgemma.model import Griffin
from rgemma.quantize import QuantizationError, quantize_model, ready_quantized

QUANT_KEY = "rgemma_quantization"


def save_quantized(model, directory, *, tokenizer_dir=None, overwrite: bool = False) -> None:
    """Writes a quantized model atomically (temp dir beside it, then rename)."""
    from safetensors.torch import save_file
    if not getattr(model, "quantization", None):
        raise QuantizationError("model is not quantized: call quantize_model first")
    dst = Path(directory)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    config = {**model.config.to_hf_dict(), QUANT_KEY: model.quantization}
    with atomic_dir(dst, overwrite) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer_dir is not None:
            copy_tokenizer(Path(tokenizer_dir), tmp)
        write_json(tmp / CONFIG_FILE, config)     # last: marks it complete


def load_quantized(directory, *, device="cpu"):
    """A quantized Griffin from a directory written by ``save_quantized``."""
    from safetensors import safe_open
    directory = Path(directory)
    with open(directory / "config.json", encoding="utf-8") as f:
        raw = json.load(f)
    spec = raw[QUANT_KEY]
    config = GriffinConfig.from_hf_dict(raw)
    with torch.device("meta"):
        model = Griffin(config, dtype=torch.bfloat16)
        quantize_model(model, bits=int(spec["bits"]), group_size=int(spec.get("group_size") or 128),
                       embedding=bool(spec.get("embedding", True)))
    expected = model.state_dict()
    path = directory / "model.safetensors"
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for damaged files
        raise CheckpointError(f"{path}: cannot read ({e})") from None
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    bad = [f"{k}: expected {tuple(expected[k].shape)}, found {tuple(stored[k].shape)}"
           for k in expected if k in stored and stored[k].shape != expected[k].shape]
    if missing or unexpected or bad:
        raise CheckpointError(
            f"{path}: does not match its config ({len(missing)} missing, {len(unexpected)} "
            f"unexpected, {len(bad)} mis-shaped: {(missing + unexpected + bad)[:5]})")
    model.load_state_dict(stored, assign=True)
    model.quantization = spec
    return ready_quantized(model.to(device))




def is_quantized_dir(directory: Path) -> bool:
    """Whether ``directory`` holds a checkpoint written by ``save_quantized``."""
    try:
        with open(Path(directory) / CONFIG_FILE, encoding="utf-8") as f:
            return QUANT_KEY in json.load(f)
    except (OSError, ValueError):
        return False
