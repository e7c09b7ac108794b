"""Hostile and mistaken input, by class: loaders, snapshots, the command line.

Each case asserts a one-line error (no traceback), a non-zero exit, that it
comes quickly (no unbounded read or allocation), and that nothing was
written or executed.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from rgemma.cli import main
from rgemma.inference.sampling import Sampler, SamplingError, SamplingParams
from rgemma.io import checkpoint, snapshot
from rgemma.io.files import CheckpointError
from rgemma.io.snapshot import SnapshotError, load_conversation, read_metadata


@pytest.fixture
def copy_dir(model_dir, tmp_path):
    def make(name="copy"):
        dst = tmp_path / name
        shutil.copytree(model_dir, dst)
        return dst

    return make


def one_line_error(capsys, verb: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"rgemma {verb}: error: "), err
    assert "\n" not in err and "Traceback" not in err, err
    return err


def load_error(path, **kwargs) -> str:
    """The CheckpointError of loading ``path``, which must come within 10 s."""
    start = time.monotonic()
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(path, **kwargs)
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert len(message) < 1000 and "\n" not in message.strip()
    return message


# ===================================================================== loaders
def test_official_file_with_a_huge_block_index(tmp_path):
    """Keys blocks.0 and blocks.10^11: refused at once, in a short message."""
    sd = {
        "embedder.input_embedding": torch.zeros(8, 4),
        "final_norm.scale": torch.zeros(4),
        "blocks.0.mlp_block.ffw_up.w": torch.zeros(2, 4, 8),
        "blocks.100000000000.temporal_pre_norm.scale": torch.zeros(4),
    }
    path = tmp_path / "evil.pt"
    torch.save(sd, path)
    assert path.stat().st_size < 5000
    message = load_error(path)
    assert "blocks are not numbered" in message and "100000000000" in message


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("num_hidden_layers", 3_000_000, "num_layers"),
        ("attention_window_size", 10**12, "attention_window"),
        ("vocab_size", 10**10, "vocab_size"),
        ("hidden_size", "wide", "positive integer"),
        ("block_types", 7, "block_types"),
    ],
)
def test_config_sizes_are_bounded(copy_dir, field, value, words):
    ckpt = copy_dir()
    config = json.loads((ckpt / "config.json").read_text())
    config[field] = value
    (ckpt / "config.json").write_text(json.dumps(config))
    message = load_error(ckpt)
    assert "config.json" in message and words in message


@pytest.mark.parametrize("target", ["fifo", "/dev/zero", "/dev/urandom", "directory"])
@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_special_files_are_refused_without_blocking(copy_dir, target, name):
    ckpt = copy_dir()
    (ckpt / name).unlink()
    if target == "fifo":
        os.mkfifo(ckpt / name)
    elif target == "directory":
        (ckpt / name).mkdir()
    else:
        (ckpt / name).symlink_to(target)
    assert "not a regular file" in load_error(ckpt)


def test_index_shard_outside_the_directory_is_not_opened(copy_dir, tmp_path):
    ckpt = copy_dir()
    outside = tmp_path / "outside.safetensors"
    os.mkfifo(outside)  # opening it would hang a reader without O_NONBLOCK
    (ckpt / "model.safetensors").rename(ckpt / "model-00001-of-00001.safetensors")
    names = list(load_file(ckpt / "model-00001-of-00001.safetensors"))
    index = {"weight_map": {n: "model-00001-of-00001.safetensors" for n in names}}
    index["weight_map"][names[0]] = "../outside.safetensors"
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "not a file name inside" in load_error(ckpt)


def test_index_values_must_be_file_names(copy_dir):
    ckpt = copy_dir()
    names = list(load_file(ckpt / "model.safetensors"))
    (ckpt / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {n: ["model.safetensors"] for n in names}})
    )
    assert "is not a file name" in load_error(ckpt)


def test_a_huge_json_file_is_refused(copy_dir, monkeypatch):
    from rgemma.io import files

    monkeypatch.setattr(files, "MAX_JSON_BYTES", 1000)
    ckpt = copy_dir()
    config = json.loads((ckpt / "config.json").read_text())
    config["padding"] = "x" * 2000
    (ckpt / "config.json").write_text(json.dumps(config))
    assert "larger than" in load_error(ckpt)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.uint8])
def test_integer_weights_are_refused(copy_dir, dtype):
    ckpt = copy_dir()
    tensors = load_file(ckpt / "model.safetensors")
    name = next(n for n in tensors if n.endswith("final_norm.weight"))
    tensors[name] = tensors[name].to(dtype)
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    message = load_error(ckpt)
    assert "final_norm.weight" in message and "not floating point" in message


def test_integer_weights_in_an_official_file(tmp_path):
    from helpers import official_model
    from helpers import tiny_config as small

    sd = official_model(small()).state_dict()
    sd["final_norm.scale"] = sd["final_norm.scale"].long()
    torch.save(sd, tmp_path / "m.pt")
    assert "not floating point" in load_error(tmp_path / "m.pt")


def test_nan_logits_are_an_error_not_a_token():
    """The sampler used to return token V-1 for a NaN distribution."""
    logits = torch.randn(2, 11)
    logits[1, 3] = float("nan")
    sampler = Sampler([SamplingParams(), SamplingParams(temperature=1.0)], 11, seeds=[0, 1])
    with pytest.raises(SamplingError, match="NaN or infinite logits \\(row 1\\)"):
        sampler.sample(logits)


def test_generate_with_nan_weights_fails_in_one_line(copy_dir, capsys):
    ckpt = copy_dir()
    tensors = load_file(ckpt / "model.safetensors")
    name = next(n for n in tensors if n.endswith("final_norm.weight"))
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    assert main(["generate", "hello", "--model", str(ckpt), "-m", "4"]) != 0
    assert "NaN" in one_line_error(capsys, "generate")


def test_quantized_directories_are_not_recurrent_gemma_to_other_loaders(
    model_dir, tmp_path, capsys
):
    out = tmp_path / "q8"
    assert main(["quantize", str(model_dir), str(out), "--bits", "8"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] != "recurrent_gemma"
    import transformers

    with pytest.raises(ValueError):
        transformers.AutoConfig.from_pretrained(out)
    model, _ = checkpoint.load(out)  # rgemma still opens it
    assert model.quantization["bits"] == 8
    capsys.readouterr()
    again = tmp_path / "q8q8"
    assert main(["quantize", str(out), str(again)]) == 2
    assert "already quantized" in one_line_error(capsys, "quantize")
    assert not again.exists()


# =================================================================== snapshots
@pytest.fixture
def saved(model_dir, tmp_path):
    model, tok = checkpoint.load(model_dir)
    path = tmp_path / "s.safetensors"
    assert (
        main(
            [
                "generate",
                "hello there",
                "--model",
                str(model_dir),
                "-m",
                "5",
                "--temp",
                "1",
                "--seed",
                "3",
                "--save-state",
                str(path),
            ]
        )
        == 0
    )
    return model, path


def rewrite(path, *, tensors=None, **metadata):
    """Rewrites a snapshot with changed tensors / metadata and a consistent checksum."""
    raw = read_metadata(path)
    tensors = tensors if tensors is not None else load_file(path)
    raw.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    raw["sha256"] = snapshot._checksum(tensors)
    save_file(tensors, path, metadata=raw)


def test_a_flipped_bit_in_a_snapshot_is_detected(saved):
    model, path = saved
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # inside the last tensor's bytes
    path.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match="checksum"):
        load_conversation(path, model)


@pytest.mark.parametrize("batch_size", ["-1", "10000000000000000000", "0"])
def test_snapshot_batch_size_out_of_range(saved, batch_size):
    model, path = saved
    rewrite(path, batch_size=batch_size)
    with pytest.raises(SnapshotError, match="batch_size"):
        load_conversation(path, model)


@pytest.mark.parametrize(
    "extra",
    [
        {"pending_ids": ["x"], "token_ids": [5, "x"]},
        {"pending_ids": [10**9], "token_ids": [5, 10**9]},
        {"pending_ids": [5], "token_ids": [6, 7]},
        {"token_ids": "12"},
    ],
)
def test_snapshot_token_ids_are_checked(saved, extra):
    model, path = saved
    meta = json.loads(read_metadata(path)["extra"])
    rewrite(path, extra={**meta, **extra})
    with pytest.raises(SnapshotError, match="ids"):
        load_conversation(path, model)


def test_snapshot_rng_entry_of_the_wrong_size(saved):
    model, path = saved
    tensors = load_file(path)
    tensors["rng.0"] = torch.zeros(7, dtype=torch.uint8)
    rewrite(path, tensors=tensors)
    with pytest.raises(SnapshotError, match="7 bytes"):
        load_conversation(path, model)


def test_cli_reports_a_corrupt_state_in_one_line(saved, model_dir, capsys):
    model, path = saved
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10
    path.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["generate", "more", "--model", str(model_dir), "--load-state", str(path)]) != 0
    assert "checksum" in one_line_error(capsys, "generate")


# ================================================================ command line
def test_continue_a_loaded_state_without_a_prompt(saved, model_dir, capsys):
    """README's `rgemma generate "" --load-state s.safetensors` continues the state."""
    model, path = saved
    capsys.readouterr()
    assert (
        main(["generate", "", "--model", str(model_dir), "--load-state", str(path), "-m", "4"]) == 0
    )
    assert capsys.readouterr().out.endswith("\n")


def test_non_utf8_prompt_on_stdin(model_dir, capsys, monkeypatch):
    stdin = io.TextIOWrapper(io.BytesIO("caf\xe9 cr\xe8me".encode("latin-1")))
    monkeypatch.setattr(sys, "stdin", stdin)
    assert main(["generate", "-", "--model", str(model_dir)]) == 2
    assert "not UTF-8" in one_line_error(capsys, "generate")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a PyTorch without CUDA")
def test_device_cuda_without_cuda(model_dir, capsys):
    assert main(["generate", "hi", "--model", str(model_dir), "--device", "cuda"]) == 2
    assert "--device cpu" in one_line_error(capsys, "generate")


def test_save_state_into_a_missing_directory_fails_before_generating(model_dir, tmp_path, capsys):
    target = tmp_path / "missing" / "s.safetensors"
    assert main(["generate", "hi", "--model", str(model_dir), "--save-state", str(target)]) == 2
    out = capsys.readouterr()
    assert out.out == ""  # nothing was generated
    assert "does not exist" in out.err and "\n" not in out.err.strip()


def test_a_traceback_never_reaches_the_user(model_dir, tmp_path):
    """Through a real process: a corrupt checkpoint gives one line and exit 1."""
    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    (bad / "model.safetensors").write_bytes(b"\x00" * 100)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "rgemma", "generate", "hi", "--model", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("rgemma generate: error: ") and "Traceback" not in proc.stderr


def test_convert_says_when_the_tokenizer_is_missing_and_takes_one(model_dir, tmp_path, capsys):
    model, _ = checkpoint.load(model_dir)
    pt = tmp_path / "m.pt"
    checkpoint.save_official(model, pt)
    assert main(["convert", str(pt), str(tmp_path / "bare")]) == 0
    err = capsys.readouterr().err
    assert "no tokenizer" in err and "--tokenizer DIR" in err
    assert main(["generate", "hi", "--model", str(tmp_path / "bare")]) == 1
    assert "--tokenizer PATH" in one_line_error(capsys, "generate")
    assert (
        main(
            [
                "generate",
                "hi",
                "--model",
                str(tmp_path / "bare"),
                "-m",
                "3",
                "--tokenizer",
                str(model_dir / "tokenizer.model"),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["convert", str(pt), str(tmp_path / "full"), "--tokenizer", str(model_dir)]) == 0
    assert "no tokenizer" not in capsys.readouterr().err
    assert (tmp_path / "full" / "tokenizer.model").read_bytes() == (
        model_dir / "tokenizer.model"
    ).read_bytes()
    assert main(["convert", str(pt), str(tmp_path / "x"), "--tokenizer", str(tmp_path)]) == 2
    assert "no tokenizer.model" in one_line_error(capsys, "convert")
    assert not (tmp_path / "x").exists()
