"""State snapshots: round trip, exact continuation in a fresh process, bad files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import small_config, small_model
from rgemma.inference.generate import generate
from rgemma.io import snapshot
from rgemma.io.snapshot import SnapshotError, fork, load_state, read_metadata, save_state

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "once upon a time there was a model"
SAMPLING = {"greedy": {}, "seeded": dict(temperature=1.0, top_p=0.95, repetition_penalty=1.1)}


def test_round_trip(loaded, tmp_path):
    model, tok = loaded
    c = generate(
        model, tok, [PROMPT, "hello"], max_new_tokens=20, stop_token_ids=[], temperature=1.0, seed=3
    )
    state = model.init_state(2)
    with torch.no_grad():
        model(
            torch.tensor([[2, 10, 11, 12, 13, 14], [2, 20, 21, 22, 23, 24]]),
            torch.arange(6).repeat(2, 1),
            state,
        )
    path = tmp_path / "s.safetensors"
    save_state(
        path,
        state,
        model_config=model.config,
        extra={"token_ids": [1, 2, 3]},
        rng_states=[c[0].rng_state, None],
    )
    assert os.listdir(tmp_path) == ["s.safetensors"]  # no temp file left
    back, meta = load_state(path, model)
    for name, t in state.tensors().items():
        assert torch.equal(back.tensors()[name], t), name
    assert meta["token_ids"] == [1, 2, 3] and meta["num_tokens"] == [6, 6]
    assert meta["config_fingerprint"] == model.config.fingerprint()
    assert torch.equal(meta["rng_states"][0], c[0].rng_state) and meta["rng_states"][1] is None
    raw = read_metadata(path)
    assert raw["format"] == "rgemma.state" and "layers.2.k" in json.loads(raw["layout"])


def test_fork_is_independent(loaded):
    model, tok = loaded
    a = generate(model, tok, [PROMPT], max_new_tokens=5, stop_token_ids=[])[0]
    b = fork(a.state)
    before = {k: t.clone() for k, t in b.tensors().items()}
    generate(model, tok, [a.pending_ids], state=a.state, max_new_tokens=5, stop_token_ids=[])
    assert all(torch.equal(before[k], t) for k, t in b.tensors().items())
    assert int(a.state.num_tokens[0]) > int(b.num_tokens[0])


CONTINUE_SCRIPT = r"""
import json, sys
import torch
from rgemma.io import checkpoint
from rgemma.inference.generate import generate
from rgemma.io.snapshot import load_state
torch.set_num_threads(1)
model, tok = checkpoint.load(sys.argv[1])
out = {}
for name, path in json.loads(sys.argv[2]).items():
    state, meta = load_state(path, model)
    c = generate(model, tok, [meta["pending_ids"]], state=state, rng_states=meta["rng_states"],
                 context_ids=[meta["token_ids"][:-1]], max_new_tokens=200, stop_token_ids=[],
                 **meta["sampling"])[0]
    out[name] = c.token_ids
print(json.dumps(out))
"""


def test_resume_in_fresh_process_equals_uninterrupted(loaded, model_dir, tmp_path):
    """Run A = 300 tokens; run B = 100, save, load in a new process, 200 more: A == B.

    Seeded sampling continues exactly because the snapshot keeps the row's
    generator state (``rng.0``) and the history for the repetition penalty.
    """
    model, tok = loaded
    paths, full = {}, {}
    for name, kw in SAMPLING.items():
        seed = 11 if kw else None
        full[name] = generate(
            model, tok, [PROMPT], max_new_tokens=300, stop_token_ids=[], seed=seed, **kw
        )[0].token_ids
        part = generate(
            model, tok, [PROMPT], max_new_tokens=100, stop_token_ids=[], seed=seed, **kw
        )[0]
        paths[name] = str(tmp_path / f"{name}.safetensors")
        save_state(
            paths[name],
            part.state,
            model_config=model.config,
            rng_states=[part.rng_state],
            extra={
                "token_ids": part.prompt_ids + part.token_ids,
                "pending_ids": part.pending_ids,
                "sampling": kw,
            },
        )
        assert int(part.state.num_tokens[0]) == len(part.prompt_ids) + 99
    out = subprocess.run(
        [sys.executable, "-c", CONTINUE_SCRIPT, str(model_dir), json.dumps(paths)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    rest = json.loads(out.stdout)
    for name in SAMPLING:
        assert full[name][:100] + rest[name] == full[name], name


def test_other_model_is_rejected(loaded, tmp_path):
    model, tok = loaded
    path = tmp_path / "s.safetensors"
    save_state(path, model.init_state(1), model_config=model.config)
    other = small_model(small_config(tok.vocab_size, window=8))
    with pytest.raises(SnapshotError, match="another model"):
        load_state(path, other)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "flip_header", "missing"])
def test_corrupt_files_are_rejected(loaded, tmp_path, damage):
    model, _ = loaded
    path = tmp_path / "s.safetensors"
    save_state(path, model.init_state(1), model_config=model.config)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(os.urandom(len(data)))
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "flip_header":
        path.write_bytes(data[:8] + b"}" + data[9:])
    else:
        path.unlink()
    with pytest.raises(SnapshotError) as e:
        load_state(path, model)
    assert "\n" not in str(e.value)


def test_wrong_tensor_shapes_are_rejected(loaded, tmp_path):
    model, _ = loaded
    from safetensors.torch import load_file, save_file

    path = tmp_path / "s.safetensors"
    save_state(path, model.init_state(1), model_config=model.config)
    raw = read_metadata(path)
    tensors = load_file(path)
    tensors["layers.0.h"] = torch.zeros(1, 7)
    raw["sha256"] = snapshot._checksum(tensors)  # a consistent, crafted file
    save_file(tensors, path, metadata=raw)
    with pytest.raises(SnapshotError, match="layers.0.h"):
        load_state(path, model)


def test_failed_save_leaves_nothing(loaded, tmp_path, monkeypatch):
    model, _ = loaded
    import safetensors.torch

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError):
        save_state(tmp_path / "s.safetensors", model.init_state(1), model_config=model.config)
    assert os.listdir(tmp_path) == []
