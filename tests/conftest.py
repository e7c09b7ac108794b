"""Shared fixtures. Plain helpers (random models, tiny tokenizers, ...) are in helpers.py.

Artifacts that tests only read (a trained tokenizer, a saved checkpoint) are built once a
session; what tests change (loaded models, engines) is built once a module.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from helpers import (
    WINDOW,
    random_model,
    server_config,
    small_config,
    small_model,
    tiny_config,
    torch_threads,
    train_tokenizer,
)

# Quantized layers pick their product by timing on the machine (rgemma.autotune); the suite
# keeps the defaults so its numbers do not depend on the machine's load. The autotune tests
# turn it on for themselves.
os.environ.setdefault("RGEMMA_AUTOTUNE", "0")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(1234)
    yield


# ================================================================== threads
@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a whole module (``pytestmark =
    pytest.mark.usefixtures("one_thread")``): tiny matmuls gain nothing from two, and the
    machines running these tests share 2 cores."""
    with torch_threads(1):
        yield


@pytest.fixture
def one_thread_per_test():
    """One intra-op torch thread during each test (not during module-scoped fixtures)."""
    with torch_threads(1):
        yield


# ============================================ the tiny checkpoint of the generation tests
@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory):
    """A directory holding the 512-piece Gemma-layout ``tokenizer.model`` of
    ``helpers.train_tokenizer``. Read only."""
    path = tmp_path_factory.mktemp("tok")
    train_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def model_dir(tok_dir, tmp_path_factory):
    """``small_model(small_config(vocab))`` saved in HF layout with its tokenizer.model.
    Read only: tests that change files copy it first."""
    from rgemma.io import checkpoint
    from rgemma.io.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tok_dir)
    with torch_threads(1):
        model = small_model(small_config(tok.vocab_size))
        out = tmp_path_factory.mktemp("ckpt") / "tiny"
        checkpoint.save_hf(model, out, tokenizer_dir=tok_dir)
    return out


@pytest.fixture(scope="module")
def loaded(model_dir):
    """(model, tokenizer) of ``model_dir``, loaded afresh for each module."""
    from rgemma.io import checkpoint

    model, tok = checkpoint.load(model_dir)
    return model, tok


# ==================================== the tiny checkpoint of the engine and server tests
@pytest.fixture(scope="session")
def engine_dir(tmp_path_factory):
    """``tok/``: a 400-piece Gemma-layout tokenizer (no Chinese in its training lines);
    ``model/``: a width-64 ``small_model`` saved with ``checkpoint.save_hf``. Read only."""
    from rgemma.io import checkpoint

    directory = tmp_path_factory.mktemp("engine")
    tok_dir = directory / "tok"
    tok_dir.mkdir()
    tok = train_tokenizer(tok_dir, vocab_size=400, cjk=False)
    with torch_threads(1):
        model = small_model(small_config(tok.vocab_size, width=64))
        checkpoint.save_hf(model, directory / "model", tokenizer_dir=tok_dir)
    return directory


@pytest.fixture(scope="module")
def tiny(engine_dir):
    """(model, tokenizer, path) of the engine checkpoint, loaded afresh for each module
    (tests patch the model's forward)."""
    from rgemma.io import checkpoint

    path = engine_dir / "model"
    model, tok = checkpoint.load(path, progress=False)
    return model.eval(), tok, path


@pytest.fixture(scope="module")
def url(engine, tiny):
    """A live server (``helpers.server_config``) over the requesting module's ``engine``."""
    from rgemma.serving.app import ServerThread, create_app

    with ServerThread(create_app(engine, tiny[1], server_config())) as u:
        yield u


# ======================== a tokenizer trained on the module's text, a random model over it
@pytest.fixture(scope="module")
def tokenizer(request, tmp_path_factory):
    """A 600-piece SentencePiece tokenizer with Gemma's special ids, trained on the
    requesting module's ``TOKENIZER_TEXTS``."""
    from rgemma.io.tokenizer import Tokenizer
    from rgemma.training.data import train_tokenizer as train_text_tokenizer

    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    train_text_tokenizer(list(request.module.TOKENIZER_TEXTS), str(path), vocab_size=600)
    return Tokenizer.from_file(path)


@pytest.fixture(scope="module")
def model(tokenizer):
    """A random ``tiny_config`` model over ``tokenizer``, attention window ``WINDOW``."""
    return random_model(tiny_config(vocab_size=tokenizer.vocab_size, attention_window=WINDOW))


@pytest.fixture(scope="module")
def checkpoint(model, tokenizer, tmp_path_factory):
    """The random model and its tokenizer as a Hugging Face checkpoint directory."""
    import rgemma

    path = tmp_path_factory.mktemp("ckpt") / "model"
    rgemma.save(model, path)
    shutil.copy(tokenizer._backend.path, path / "tokenizer.model")
    return path
