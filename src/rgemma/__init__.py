"""rgemma: RecurrentGemma (Griffin) in PyTorch with a first-class fixed-size state.

    import rgemma
    model, tokenizer = rgemma.load("path/to/checkpoint")
    logits, state = model(tokens, positions, state)
    rgemma.save(model, "out/", tokenizer_dir="path/to/checkpoint")

The names below are imported on first use, so ``import rgemma`` (and
``rgemma --help``) does not import torch.
"""

from rgemma.version import __version__

__all__ = ["Griffin", "GriffinConfig", "State", "__version__", "load", "save"]

_LAZY = {"Griffin": "rgemma.model", "GriffinConfig": "rgemma.config", "State": "rgemma.state"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rgemma' has no attribute {name!r}")


def load(path, **kwargs):
    """(model, tokenizer) from a checkpoint path; see ``rgemma.io.checkpoint.load``."""
    from rgemma.io.checkpoint import load as _load

    return _load(path, **kwargs)


def save(model, directory, **kwargs):
    """Writes a Hugging Face checkpoint directory that ``transformers`` opens; see
    ``rgemma.io.checkpoint.save_hf``."""
    from rgemma.io.checkpoint import save_hf

    return save_hf(model, directory, **kwargs)
