"""rgemma: RecurrentGemma (Griffin) in PyTorch with a first-class fixed-size state."""

__version__ = "0.1.0"

from .config import GriffinConfig  # noqa: E402
from .model import Griffin  # noqa: E402
from .state import State  # noqa: E402

__all__ = ["Griffin", "GriffinConfig", "State", "__version__", "load"]


def load(path, **kwargs):
    """(model, tokenizer) from a checkpoint path; see ``rgemma.checkpoint.load``."""
    from .checkpoint import load as _load
    return _load(path, **kwargs)
