"""rgemma.checkpoint and ``rgemma convert``: every layout in, HF / official out.

Oracles: transformers' RecurrentGemmaForCausalLM (HF directories), the
official torch Griffin (official .pt files), the official conversion of
Flax params (Orbax). Tiny random models only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from rgemma import weights as W
from rgemma.cli import convert as convert_verb
from rgemma.cli import main as rgemma_main
from rgemma.io import checkpoint as C
from rgemma.io.files import read_config

try:
    from rgemma.model import Griffin  # noqa: F401

    HAVE_MODEL = True
except ImportError:  # the model is written in parallel
    HAVE_MODEL = False
needs_model = pytest.mark.skipif(not HAVE_MODEL, reason="rgemma.model is not importable yet")

common = pytest.importorskip("recurrentgemma.common")
official_griffin = pytest.importorskip("recurrentgemma.torch.griffin")
R, A = common.TemporalBlockType.RECURRENT, common.TemporalBlockType.ATTENTION

# The attention window is not in an official state dict: keep the official
# default so that the inferred config is exactly the model's.
OFFICIAL_TINY = dict(
    vocab_size=128,
    width=64,
    mlp_expanded_width=96,
    num_heads=4,
    block_types=(R, R, A, R),
    embeddings_scale_by_sqrt_dim=True,
    attention_window_size=2048,
    logits_soft_cap=30.0,
    lru_width=96,
)


def official_model(dtype=torch.float32, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = official_griffin.Griffin(
        common.GriffinConfig(**{**OFFICIAL_TINY, **overrides}), gradient_checkpointing=False
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.to(dtype).eval()


def hf_model(seed: int = 0):
    """A tiny random transformers RecurrentGemma (window 16; MQA like the real ones)."""
    from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM

    torch.manual_seed(seed)
    cfg = RecurrentGemmaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=2 * 48,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        lru_width=32,
        attention_window_size=16,
        block_types=["recurrent", "recurrent", "attention"],
    )
    model = RecurrentGemmaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def tokens_and_positions(vocab: int, T: int, B: int = 2):
    tokens = torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(7))
    return tokens, torch.arange(T).expand(B, T)


def our_logits(model, tokens, positions):
    with torch.no_grad():
        logits, _ = model(tokens, positions)
    return logits


@pytest.fixture(scope="module")
def official():
    return official_model()


@pytest.fixture()
def official_pt(official, tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(official.state_dict(), path)
    return path


def files_of(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------ loading
@needs_model
@pytest.mark.parametrize("shard", [None, "20KB"])
def test_transformers_checkpoint_loads_with_equal_logits(tmp_path, shard):
    hf = hf_model()
    kwargs = {"max_shard_size": shard} if shard else {}
    hf.save_pretrained(tmp_path, **kwargs)
    if shard:
        assert (tmp_path / C.INDEX_FILE).exists()
    model, tokenizer = C.load(tmp_path)
    assert tokenizer is None and model.config.attention_window == 16
    tokens, positions = tokens_and_positions(96, 16)  # T <= window
    with torch.no_grad():
        want = hf(tokens, use_cache=False).logits
    torch.testing.assert_close(our_logits(model, tokens, positions), want, atol=1e-4, rtol=1e-4)


@needs_model
def test_official_state_dict_loads_with_equal_logits(official, official_pt):
    model, _ = C.load(official_pt)
    assert model.config == W.infer_config_from_official(official.state_dict())
    tokens, positions = tokens_and_positions(128, 40)
    with torch.no_grad():
        want, _ = official(tokens, positions)
    torch.testing.assert_close(our_logits(model, tokens, positions), want, atol=1e-4, rtol=1e-4)


@needs_model
def test_load_dtype_and_copies(official_pt):
    model, _ = C.load(official_pt, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(p.is_contiguous() for p in model.parameters())
    sd = torch.load(official_pt)
    ours = model.state_dict()
    torch.testing.assert_close(
        ours["layers.0.temporal_block.conv_1d.weight"][:, 0].t(),
        sd["blocks.0.recurrent_block.conv_1d.w"].bfloat16(),
    )
    ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert len(ptrs) == len(list(model.parameters())), "parameters share memory"


@needs_model
def test_save_hf_opens_in_transformers(official, tmp_path):
    from transformers import AutoModelForCausalLM

    model, _ = C.load(_save(official, tmp_path / "o.pt"))
    out = C.save_hf(model, tmp_path / "hf", shard_size="30KB")
    assert {"config.json", "generation_config.json", C.INDEX_FILE} <= files_of(out)
    index = json.loads((out / C.INDEX_FILE).read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors" and len(shards) > 1
    assert set(index["weight_map"].values()) == set(shards)
    assert all(k.startswith("model.") for k in index["weight_map"])
    assert index["metadata"]["total_size"] == sum(
        p.numel() * p.element_size() for p in model.parameters()
    )
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    tokens, positions = tokens_and_positions(128, 12)
    with torch.no_grad():
        got = hf(tokens, use_cache=False).logits
    torch.testing.assert_close(got, our_logits(model, tokens, positions), atol=1e-4, rtol=1e-4)
    again, _ = C.load(out)
    assert_same_tensors(again.state_dict(), model.state_dict())


def _save(official, path: Path) -> Path:
    torch.save(official.state_dict(), path)
    return path


@needs_model
def test_tokenizer_is_found(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {p: i for i, p in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "a", "b"])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    hf_model().save_pretrained(tmp_path)
    tok.save(str(tmp_path / "tokenizer.json"))
    _, tokenizer = C.load(tmp_path)
    assert tokenizer is not None and tokenizer.eos_id == 1


# --------------------------------------------------------- convert round trip
@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_official_to_hf_to_official_is_bit_exact(official, official_pt, tmp_path, dtype):
    hf_dir, back = tmp_path / "hf", tmp_path / "back.pt"
    C.convert(official_pt, hf_dir, dtype=dtype, shard_size="40KB")
    assert (hf_dir / C.INDEX_FILE).exists() and "config.json" in files_of(hf_dir)
    C.convert(hf_dir, back)
    want = official.state_dict()
    if dtype:
        want = {k: v.to(getattr(torch, dtype)) for k, v in want.items()}
    assert_same_tensors(torch.load(back, weights_only=True), want)


def test_convert_verb_through_argparse(official_pt, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="rgemma")
    convert_verb.register(parser.add_subparsers())
    dst = tmp_path / "out"
    args = parser.parse_args(
        [
            "convert",
            str(official_pt),
            str(dst),
            "--dtype",
            "float16",
            "--preset",
            "recurrentgemma-2b",
        ]
    )
    # the tiny weights are not 2B-shaped: one error line, exit status 2
    assert args.func(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rgemma convert: error: ") and "\n" not in err and "width" in err
    assert not dst.exists()
    args = parser.parse_args(["convert", str(official_pt), str(dst), "--dtype", "float16"])
    assert args.func(args) == 0
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["model_type"] == "recurrent_gemma" and cfg["torch_dtype"] == "float16"
    assert convert_verb.run(parser.parse_args(["convert", str(official_pt), str(dst)])) == 2
    assert "already exists" in capsys.readouterr().err
    back = tmp_path / "back.pth"
    assert rgemma_main(["convert", str(dst), str(back)]) == 0
    sd = torch.load(back, weights_only=True)
    assert sd["embedder.input_embedding"].dtype == torch.float16


def test_convert_overwrite_replaces_destination(official_pt, tmp_path):
    dst = tmp_path / "out"
    C.convert(official_pt, dst, shard_size="30KB")
    C.convert(official_pt, dst, overwrite=True)
    assert not (dst / C.INDEX_FILE).exists() and (dst / C.SINGLE_FILE).exists()
    assert files_of(tmp_path) == {"tiny.pt", "out"}


# ------------------------------------------------------------------- Orbax
def _flax_params(seed: int = 0):
    """A random official Flax params tree (structure from the official jax Griffin)."""
    jax = pytest.importorskip("jax")
    np = pytest.importorskip("numpy")
    from recurrentgemma.jax import griffin as jax_griffin

    model = jax_griffin.Griffin(common.GriffinConfig(**OFFICIAL_TINY))
    tokens = jax.numpy.zeros((1, 4), jax.numpy.int32)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens, jax.numpy.arange(4)[None])
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda s: (rng.standard_normal(s.shape) * 0.1).astype(np.float32), shapes
    )


@needs_model
def test_orbax_checkpoint_loads_with_equal_logits(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    from recurrentgemma.conversion import flax_params_to_pytorch_state_dict

    params = _flax_params()
    ocp.PyTreeCheckpointer().save((tmp_path / "ckpt").absolute(), params)
    model, _ = C.load(tmp_path / "ckpt")
    official = official_griffin.Griffin(
        common.GriffinConfig(**OFFICIAL_TINY), gradient_checkpointing=False
    ).eval()
    official.load_state_dict(flax_params_to_pytorch_state_dict(params["params"]))
    tokens, positions = tokens_and_positions(128, 20)
    with torch.no_grad():
        want, _ = official(tokens, positions)
    torch.testing.assert_close(our_logits(model, tokens, positions), want, atol=1e-4, rtol=1e-4)
    out = C.convert(tmp_path / "ckpt", tmp_path / "o.pt")
    assert_same_tensors(torch.load(out), official.state_dict())


def test_orbax_without_orbax_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "_METADATA").write_text("{}")
    monkeypatch.setitem(sys.modules, "orbax.checkpoint", None)
    with pytest.raises(C.CheckpointError, match=r"pip install 'rgemma\[jax\]'"):
        C.open_checkpoint(tmp_path)


# ---------------------------------------------------------------- bad inputs
def _hf_dir(tmp_path: Path, shard: str | None = None) -> Path:
    out = tmp_path / "hf"
    hf_model().save_pretrained(out, **({"max_shard_size": shard} if shard else {}))
    return out


def _error(path, **kwargs) -> str:
    """The CheckpointError message of opening (and reading every tensor of) ``path``."""
    with pytest.raises(C.CheckpointError) as err:
        source = C.open_checkpoint(path, **kwargs)
        W.check_state_dict(source.shapes(), source.config, source.label)
        for name in source.tensors:
            source.tensors[name]
    e = err.value  # no chained torch / safetensors traceback
    assert e.__cause__ is None and (e.__context__ is None or e.__suppress_context__)
    return str(err.value)


def test_missing_path(tmp_path):
    assert "no such file or directory" in _error(tmp_path / "nope")


def test_directory_without_weights(tmp_path):
    out = _hf_dir(tmp_path)
    (out / C.SINGLE_FILE).unlink()
    assert f"no {C.SINGLE_FILE}" in _error(out)
    assert "not a checkpoint directory" in _error(tmp_path)


def test_truncated_shard(tmp_path):
    out = _hf_dir(tmp_path, shard="20KB")
    shard = sorted(out.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    msg = _error(out)
    assert str(shard) in msg and "truncated or corrupted" in msg


def test_corrupted_header(tmp_path):
    out = _hf_dir(tmp_path)
    file = out / C.SINGLE_FILE
    data = bytearray(file.read_bytes())
    data[8:40] = b"\x00garbage-not-json!!!!!!!!!!!!!!!"
    file.write_bytes(bytes(data))
    assert str(file) in _error(out)


def test_index_names_absent_shard(tmp_path):
    out = _hf_dir(tmp_path, shard="20KB")
    shard = sorted(out.glob("model-*.safetensors"))[-1]
    shard.unlink()
    msg = _error(out)
    assert C.INDEX_FILE in msg and shard.name in msg and "does not exist" in msg


@needs_model
def test_wrong_tensor_shape(tmp_path):
    from safetensors.torch import load_file, save_file

    out = _hf_dir(tmp_path)
    sd = load_file(out / C.SINGLE_FILE)
    sd["model.layers.1.temporal_block.linear_x.weight"] = torch.zeros(32, 31)
    save_file(sd, out / C.SINGLE_FILE, metadata={"format": "pt"})
    with pytest.raises(C.CheckpointError) as err:
        C.load(out)
    msg = str(err.value)
    assert "layers.1.temporal_block.linear_x.weight: expected (32, 32), found (32, 31)" in msg
    assert str(out / C.SINGLE_FILE) in msg


def test_unknown_model_type(tmp_path):
    out = _hf_dir(tmp_path)
    cfg = json.loads((out / "config.json").read_text())
    cfg["model_type"] = "gemma2"
    (out / "config.json").write_text(json.dumps(cfg))
    msg = _error(out)
    assert "gemma2" in msg and "config.json" in msg


class NotATensor:
    pass


def test_pickle_with_objects_is_refused(tmp_path):
    path = tmp_path / "obj.pt"
    torch.save({"weights": NotATensor()}, path)
    msg = _error(path)
    assert str(path) in msg and "not a plain state dict" in msg


def test_pickle_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    assert "not a plain state dict" in _error(path)


def test_truncated_torch_file(official_pt):
    data = official_pt.read_bytes()
    official_pt.write_bytes(data[: len(data) // 3])
    assert "truncated or corrupted" in _error(official_pt)


def test_official_file_with_unknown_tensors(official, tmp_path):
    path = tmp_path / "x.ckpt"
    torch.save({**official.state_dict(), "blocks.0.surprise": torch.zeros(1)}, path)
    assert "blocks.0.surprise" in _error(path)


def test_official_preset_mismatch(official_pt):
    msg = _error(official_pt, preset="recurrentgemma-9b")
    assert str(official_pt) in msg and "width is 64" in msg


def test_existing_destination_is_refused(official_pt, tmp_path):
    (tmp_path / "dst").mkdir()
    with pytest.raises(C.CheckpointError, match="already exists"):
        C.convert(official_pt, tmp_path / "dst")
    (tmp_path / "dst.pt").write_bytes(b"keep")
    with pytest.raises(C.CheckpointError, match="already exists"):
        C.convert(official_pt, tmp_path / "dst.pt")
    assert (tmp_path / "dst.pt").read_bytes() == b"keep"


# ----------------------------------------------------------------- atomicity
def test_failed_save_leaves_nothing(official_pt, tmp_path, monkeypatch):
    import safetensors.torch

    real, calls = safetensors.torch.save_file, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    with pytest.raises(OSError, match="disk full"):
        C.convert(official_pt, tmp_path / "out", shard_size="20KB")
    assert files_of(tmp_path) == {"tiny.pt"}


def test_killed_conversion_leaves_no_loadable_destination(official_pt, tmp_path):
    script = textwrap.dedent(f"""
        import os, safetensors.torch
        from rgemma.io import checkpoint
        real, calls = safetensors.torch.save_file, []
        def dying(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                os._exit(9)  # as if killed: no cleanup runs
            return real(*args, **kwargs)
        safetensors.torch.save_file = dying
        checkpoint.convert({str(official_pt)!r}, {str(tmp_path / "out")!r}, shard_size="20KB")
    """)
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 9, proc.stderr
    assert not (tmp_path / "out").exists()
    leftovers = [p for p in tmp_path.iterdir() if p.name != "tiny.pt"]
    assert leftovers  # the temp dir of the dead writer ...
    for p in leftovers:  # ... is not a checkpoint
        with pytest.raises(C.CheckpointError):
            C.open_checkpoint(p)


def test_save_official_is_atomic(official, tmp_path, monkeypatch):
    dst = tmp_path / "o.pt"

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    sd = W.official_to_hf(official.state_dict())
    with pytest.raises(OSError):
        C.save_official(sd, dst)
    assert list(tmp_path.iterdir()) == []


def test_parse_size_and_plan_shards():
    assert C.parse_size("5GB") == 5 * 10**9 and C.parse_size("2MiB") == 2 * 2**20
    assert C.parse_size(123) == 123 and C.parse_size("1.5KB") == 1500
    with pytest.raises(C.CheckpointError):
        C.parse_size("lots")
    assert C.plan_shards({"a": 5, "b": 5, "c": 20, "d": 1}, 10) == [["a", "b"], ["c"], ["d"]]
    assert C.shard_file_name(2, 3) == "model-00002-of-00003.safetensors"
    assert C.shard_file_name(1, 1) == "model.safetensors"


def test_hf_preset_check(tmp_path):
    out = _hf_dir(tmp_path)
    assert "does not match preset" in _error(out, preset="recurrentgemma-2b")


def test_hf_config_round_trip_through_save(tmp_path, official_pt):
    out = C.convert(official_pt, tmp_path / "hf")
    cfg = read_config(out / "config.json")
    source = C.open_checkpoint(official_pt)
    assert cfg == source.config
    assert os.path.getsize(out / C.SINGLE_FILE) > source.nbytes()


def test_outputs_have_ordinary_permissions(official_pt, tmp_path):
    mask = os.umask(0o022)
    try:
        out = C.convert(official_pt, tmp_path / "hf")
        back = C.convert(out, tmp_path / "back.pt")
    finally:
        os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o755
    assert back.stat().st_mode & 0o777 == 0o644


@needs_model
def test_stored_lm_head_must_be_tied(tmp_path):
    from safetensors.torch import load_file, save_file

    out = _hf_dir(tmp_path)
    sd = load_file(out / C.SINGLE_FILE)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    save_file(sd, out / C.SINGLE_FILE, metadata={"format": "pt"})
    model, _ = C.load(out)
    assert "lm_head.weight" not in model.state_dict()
    sd["lm_head.weight"] += 1
    save_file(sd, out / C.SINGLE_FILE, metadata={"format": "pt"})
    assert "lm_head.weight differs" in _error(out)
