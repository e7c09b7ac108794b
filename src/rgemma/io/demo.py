"""The demo model bundled with rgemma: a small RecurrentGemma trained by rgemma itself.

    from rgemma.io import demo
    model, tokenizer = demo.load()

or ``rgemma generate "def fibonacci(n):"``: the demo model is the default
``--model``. It is a ~6M-parameter Griffin (recurrent, recurrent,
attention blocks) trained for about half an hour on one CPU core on the
Python standard library's own sources; see ``demo/MODEL_CARD.md``. It
writes Python-looking code, nothing more: a working example of the whole
pipeline (tokenizer training, training, export, loading, generation)
without downloads.

``scripts/train_demo.sh`` rebuilds it (``rgemma train``, then
``scripts/build_demo.py``, which copies the exported model here and writes
the model card).
"""

from __future__ import annotations

import importlib.resources
import os

FILES = ("config.json", "model.safetensors", "tokenizer.model", "generation_config.json")
CARD = "MODEL_CARD.md"


class DemoMissingError(FileNotFoundError):
    """The bundled demo model is not in this installation."""


def _demo_dir():
    return importlib.resources.files("rgemma").joinpath("demo")


def path() -> str:
    """The directory of the bundled demo model (Hugging Face layout).

    Raises DemoMissingError naming the missing files and how to rebuild them.
    """
    directory = _demo_dir()
    missing = [name for name in FILES if not directory.joinpath(name).is_file()]
    if missing:
        raise DemoMissingError(
            f"the bundled demo model is missing from {directory} ({', '.join(missing)} not "
            "found): this rgemma installation was built without its package data. Reinstall "
            "rgemma from a complete source tree, or rebuild the model with "
            "scripts/train_demo.sh (about 30 minutes on a CPU)"
        )
    return os.fspath(directory)


def load(**kwargs):
    """(model, tokenizer) of the demo model; keyword arguments go to ``checkpoint.load``."""
    from rgemma.io import checkpoint

    model, tokenizer = checkpoint.load(path(), **kwargs)
    if tokenizer is None:
        from rgemma.io.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_dir(path())
    return model.eval(), tokenizer
