"""Hostile and mistaken input to ``rgemma train`` and ``rgemma eval``.

Each refusal asserts a one-line error (``rgemma VERB: error: ...``, no
traceback), a non-zero exit, and that nothing was executed or written (no
run folder, no checkpoint, no new file in an existing one).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import SRC, subprocess_env
from rgemma.cli import build_parser, main
from rgemma.config import PRESETS, GriffinConfig, griffin_pattern
from rgemma.io import checkpoint
from rgemma.model import Griffin
from rgemma.training import checkpoints, data, defaults, train

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")

try:
    import lm_eval
except ImportError:
    lm_eval = None
needs_lm_eval = pytest.mark.skipif(lm_eval is None, reason="lm-eval is not installed")

pytestmark = pytest.mark.usefixtures("one_thread_per_test")


# --------------------------------------------------------------------------
# fixtures and helpers
# --------------------------------------------------------------------------


def _text(i: int) -> str:
    return (
        f"def func_{i}(x, y={i}):\n    if x > y:\n        return x - y\n"
        f"    return [x * k for k in range({i % 5 + 2})]\n\n"
    ) * 3


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(folder of 12 .py files, a tokenizer.model trained on them)."""
    root = tmp_path_factory.mktemp("corpus")
    for i in range(12):
        (root / f"m{i:02d}.py").write_text(_text(i))
    tok = root.parent / "tokenizer.model"
    data.train_tokenizer([_text(i) for i in range(12)], str(tok), vocab_size=520)
    return str(root), str(tok)


def train_argv(corpus, out, *extra: str) -> list[str]:
    root, tok = corpus
    return [
        "train",
        "--data",
        root,
        "--tokenizer",
        tok,
        "--preset",
        "tiny",
        "--seq-len",
        "16",
        "--batch-size",
        "2",
        "--steps",
        "2",
        "--warmup",
        "0",
        "--eval-fraction",
        "0.2",
        "--threads",
        "1",
        "--no-progress",
        "--no-export",
        "--out",
        str(out),
        *extra,
    ]


def init_argv(root, init, out, *extra: str) -> list[str]:
    """``train`` fine-tuning ``init`` on ``root``: one step, no warmup."""
    return [
        "train",
        "--data",
        root,
        "--init",
        init,
        "--out",
        str(out),
        "--warmup",
        "0",
        "--steps",
        "1",
        *extra,
    ]


def one_line_error(capsys, verb: str = "train") -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"rgemma {verb}: error: "), err
    assert "\n" not in err and "Traceback" not in err, err
    return err


def refused(capsys, argv: list[str], verb: str = "train", code: int = 2) -> str:
    """Runs ``rgemma ARGV`` in this process: exit ``code`` and a one-line error."""
    assert main(argv) == code
    return one_line_error(capsys, verb)


def listing(folder) -> dict[str, int]:
    """Every file under ``folder`` with its size (to show nothing was written)."""
    out = {}
    for base, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(base, f)
            out[os.path.relpath(path, folder)] = os.path.getsize(path)
    return out


@pytest.fixture(scope="module")
def run_with_checkpoints(corpus, tmp_path_factory):
    """A finished 2-step run with a checkpoint after each step."""
    out = tmp_path_factory.mktemp("run") / "run"
    assert main(train_argv(corpus, out, "--save-every", "1", "--keep", "0")) == 0
    assert [os.path.basename(p) for p in checkpoints.list_checkpoints(out)] == [
        "step-00000001.pt",
        "step-00000002.pt",
    ]
    return out


@pytest.fixture
def run_copy(run_with_checkpoints, tmp_path):
    def make():
        import shutil

        dst = tmp_path / "copy"
        shutil.copytree(run_with_checkpoints, dst)
        return dst

    return make


class RunsCode:
    """Unpickling calls os.system: it would create the marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


# --------------------------------------------------------------------------
# 1. checkpoints are read with weights_only: code in a pickle never runs
# --------------------------------------------------------------------------


def _evil_checkpoint(path, marker, kind: str) -> None:
    payload = {
        "step": 1,
        "model": {},
        "optimizer": {},
        "train_config": {},
        "rng": {},
        "x": RunsCode(str(marker)),
    }
    if kind == "torch.save":
        torch.save(payload, path)
    else:  # a bare pickle, torch.load's legacy format
        with open(path, "wb") as f:
            pickle.dump(payload, f)


@pytest.mark.parametrize("kind", ["torch.save", "pickle"])
def test_resume_path_with_code_in_the_pickle_is_refused(corpus, tmp_path, capsys, kind):
    marker = tmp_path / "MARKER"
    evil = tmp_path / "evil.pt"
    _evil_checkpoint(evil, marker, kind)
    out = tmp_path / "out"
    err = refused(capsys, train_argv(corpus, out, "--resume", str(evil)))
    assert "evil.pt: refused" in err and "weights_only" in err
    assert not marker.exists()
    assert not out.exists()


def test_plain_resume_scanning_out_refuses_code_in_the_latest_checkpoint(
    corpus, run_copy, tmp_path, capsys
):
    out = run_copy()
    marker = tmp_path / "MARKER"
    _evil_checkpoint(out / "checkpoints" / "step-00000003.pt", marker, "torch.save")
    before = listing(out)
    err = refused(capsys, train_argv(corpus, out, "--resume"))
    assert "step-00000003.pt: refused" in err
    assert not marker.exists()
    assert listing(out) == before


def test_read_checkpoint_refuses_code_and_other_objects(tmp_path):
    marker = tmp_path / "MARKER"
    _evil_checkpoint(tmp_path / "evil.pt", marker, "torch.save")
    with pytest.raises(checkpoints.ResumeError, match="refused"):
        checkpoints.read_checkpoint(str(tmp_path / "evil.pt"))
    assert not marker.exists()
    torch.save({"weight": torch.zeros(2)}, tmp_path / "model.pt")  # a model, not a run
    with pytest.raises(checkpoints.ResumeError, match="not an rgemma training checkpoint.*--init"):
        checkpoints.read_checkpoint(str(tmp_path / "model.pt"))


def test_scripts_read_checkpoints_only_through_weights_only():
    """No torch.load outside read_checkpoint / the io loaders, none with weights_only=False."""
    root = os.path.dirname(SRC)
    for folder in (os.path.join(SRC, "rgemma", "training"), os.path.join(root, "scripts")):
        for name in os.listdir(folder):
            if name.endswith(".py"):
                text = open(os.path.join(folder, name)).read()
                assert "weights_only=False" not in text, name
                for line in text.splitlines():
                    if "torch.load(" in line and not line.strip().startswith(('"', "#")):
                        assert "weights_only=True" in line, (name, line)


# --------------------------------------------------------------------------
# 2. a truncated checkpoint: its name, and the previous one
# --------------------------------------------------------------------------


def test_resume_of_a_truncated_checkpoint_names_it_and_the_previous_one(corpus, run_copy, capsys):
    out = run_copy()
    latest = out / "checkpoints" / "step-00000002.pt"
    blob = latest.read_bytes()
    latest.write_bytes(blob[: len(blob) // 2])
    before = listing(out)
    err = refused(capsys, train_argv(corpus, out, "--resume"))
    assert "step-00000002.pt: not a readable checkpoint, it is truncated or corrupt" in err
    assert "--resume " + str(out / "checkpoints" / "step-00000001.pt") in err
    assert listing(out) == before
    # the suggested one resumes
    assert (
        main(train_argv(corpus, out, "--resume", str(out / "checkpoints" / "step-00000001.pt")))
        == 0
    )


def test_empty_checkpoint_file_without_a_previous_one(corpus, tmp_path, capsys):
    empty = tmp_path / "step-00000001.pt"
    empty.write_bytes(b"")
    err = refused(capsys, train_argv(corpus, tmp_path / "out", "--resume", str(empty)))
    assert "truncated or corrupt" in err and "drop --resume" in err


# --------------------------------------------------------------------------
# 3. an unknown preset lists every preset --help offers
# --------------------------------------------------------------------------


def test_unknown_preset_lists_every_preset(corpus, tmp_path, capsys):
    err = refused(capsys, train_argv(corpus, tmp_path / "out", "--preset", "nosuch"))
    names = list(defaults.TRAIN_PRESETS) + list(PRESETS)
    assert "--preset nosuch" in err
    for name in names + [n + "-it" for n in PRESETS if n.startswith("recurrentgemma")]:
        assert name in err, name
    help_text = _train_help()
    for name in names:
        assert name in help_text, name
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------
# 4. out-of-range numbers: exit 2 naming the flag, before any data is read
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--lr", "-1"),
        ("--lr", "0"),
        ("--lr", "nan"),
        ("--lr", "inf"),
        ("--warmup", "-1"),
        ("--steps", "0"),
        ("--batch-size", "0"),
        ("--seq-len", "1"),
        ("--eval-fraction", "1"),
        ("--eval-fraction", "-0.1"),
        ("--grad-accum", "0"),
        ("--clip", "-1"),
        ("--weight-decay", "-0.1"),
        ("--min-lr", "1.5"),
        ("--min-lr", "-0.5"),
        ("--lora-rank", "-1"),
        ("--seed", "-1"),
        ("--threads", "-2"),
        ("--log-every", "0"),
    ],
)
def test_out_of_range_numbers_name_the_flag_before_reading_data(tmp_path, capsys, flag, value):
    out = tmp_path / "out"
    argv = [
        "train",
        "--data",
        str(tmp_path / "no-such-data"),
        "--preset",
        "tiny",
        "--steps",
        "10",
        "--warmup",
        "0",
        "--out",
        str(out),
        flag,
        value,
    ]
    err = refused(capsys, argv)
    assert f"{flag} must be" in err and "no-such-data" not in err
    assert not out.exists()


# --------------------------------------------------------------------------
# 5. the default learning rate follows what is trained
# --------------------------------------------------------------------------


def _train_help() -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "verb").choices["train"]
    return " ".join(sub.format_help().split())


def test_lr_default_is_resolved_in_one_place(tmp_path):
    assert build_parser().parse_args(["train", "--data", "x"]).lr is None
    cfg = train.TrainConfig(data=[DATA], preset="tiny", warmup=0, out=str(tmp_path / "o"))
    resolved, note = train.resolve_config(cfg)
    assert resolved.lr == defaults.SCRATCH_LR == 3e-3 and cfg.lr is None
    assert note == "peak lr 0.003 (the default for training from scratch; --lr sets it)"
    assert defaults.default_lr("ckpt", 0) == (1e-4, "the default for full fine-tuning from --init")
    assert defaults.default_lr("ckpt", 8)[0] == defaults.LORA_LR == 1e-3
    ft = dataclasses.replace(cfg, preset=None, init="ckpt")
    assert train.peak_lr(ft) == 1e-4 and train.lr_at(0, ft) == 1e-4
    assert train.peak_lr(dataclasses.replace(ft, lr=5e-5)) == 5e-5
    help_text = _train_help()
    assert "0.0001 for full fine-tuning from --init" in help_text
    assert "0.001 with --lora-" in help_text


@pytest.fixture(scope="module")
def init_model(corpus, tmp_path_factory):
    """A tiny random checkpoint (Hugging Face layout) with the corpus's tokenizer."""
    _, tok = corpus
    from rgemma.io.tokenizer import Tokenizer

    vocab = Tokenizer.from_file(tok).vocab_size
    tok_dir = tmp_path_factory.mktemp("tokdir")
    (tok_dir / "tokenizer.model").write_bytes(open(tok, "rb").read())
    cfg = GriffinConfig(
        vocab_size=vocab,
        width=32,
        mlp_width=64,
        num_heads=2,
        block_types=griffin_pattern(3),
        attention_window=16,
    )
    path = tmp_path_factory.mktemp("init") / "model"
    checkpoint.save_hf(Griffin(cfg).init_weights(0), path, tokenizer_dir=tok_dir)
    return str(path)


@pytest.mark.parametrize(
    "extra,lr,why",
    [
        ((), 1e-4, "peak lr 0.0001 (the default for full fine-tuning from --init; --lr sets it)"),
        (("--lora-rank", "2"), 1e-3, "peak lr 0.001 (the default for LoRA adapters; --lr sets it)"),
        (("--lr", "2e-4"), 2e-4, "peak lr 0.0002 (--lr)"),
    ],
)
def test_fine_tuning_from_init_uses_the_fine_tuning_lr(
    corpus, init_model, tmp_path, capsys, extra, lr, why
):
    root, _ = corpus
    out = tmp_path / "ft"
    argv = [
        "train",
        "--data",
        root,
        "--init",
        init_model,
        "--seq-len",
        "16",
        "--batch-size",
        "2",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--eval-fraction",
        "0",
        "--threads",
        "1",
        "--no-progress",
        "--no-export",
        "--save-every",
        "1",
        "--out",
        str(out),
        *extra,
    ]
    assert main(argv) == 0
    assert why in capsys.readouterr().out
    records = checkpoints.read_metrics(out / "metrics.jsonl")
    assert records[0]["lr"] == pytest.approx(lr)
    saved = checkpoints.read_checkpoint(checkpoints.list_checkpoints(out)[-1])
    assert saved["train_config"]["lr"] == pytest.approx(lr)  # resumes compare it


# --------------------------------------------------------------------------
# 6. warmup longer than the run; held-out loss with nothing held out
# --------------------------------------------------------------------------


def test_warmup_larger_than_steps_names_both(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    err = refused(capsys, train_argv(corpus, out, "--steps", "10", "--warmup", "100"))
    assert "--warmup 100 is larger than --steps 10" in err
    assert not out.exists()


def test_eval_every_with_eval_fraction_zero(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    err = refused(capsys, train_argv(corpus, out, "--eval-fraction", "0", "--eval-every", "1"))
    assert "--eval-every 1" in err and "--eval-fraction 0" in err
    assert not out.exists()


def test_eval_every_with_a_split_that_holds_nothing_out(corpus, tmp_path, capsys):
    root, _ = corpus
    fraction = 1e-9
    assert not any(data.is_held_out(name, fraction) for name in os.listdir(root))
    out = tmp_path / "out"
    err = refused(
        capsys, train_argv(corpus, out, "--eval-fraction", str(fraction), "--eval-every", "1")
    )
    assert "holds out none of the 12 documents" in err
    assert not out.exists()


# --------------------------------------------------------------------------
# 7. --resume with nothing to resume
# --------------------------------------------------------------------------


@pytest.mark.parametrize("exists", [False, True])
def test_resume_into_an_out_without_checkpoints(corpus, tmp_path, capsys, exists):
    out = tmp_path / "out"
    if exists:
        (out / "checkpoints").mkdir(parents=True)
    err = refused(capsys, train_argv(corpus, out, "--resume"))
    assert f"no checkpoint to resume in {out} (" in err
    assert "step-*.pt); drop --resume to start a new run" in err
    assert listing(out) == {} if exists else not out.exists()


# --------------------------------------------------------------------------
# 8. Ctrl-C / SIGTERM: a checkpoint, and the command that continues
# --------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stopped_run_saves_and_prints_the_resume_command(corpus, tmp_path, capsys, sig):
    out = tmp_path / "run"
    argv = train_argv(corpus, out, "--log-every", "1")
    argv[argv.index("--steps") + 1] = "1000000"
    proc = subprocess.Popen(
        [sys.executable, "-m", "rgemma", *argv],
        env=subprocess_env(),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        # a shell's background job may have SIGINT ignored: not here
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 240
        for line in proc.stdout:
            if line.startswith("step 1/") or time.monotonic() > deadline:
                break
        proc.send_signal(sig)
        rest, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err, err[-2000:]
    step = int(last.split("stopped at step ")[1].split(";")[0])
    assert step >= 1
    command = last.split("; continue with: ")[1]
    assert command == shlex.join(["rgemma", *argv, "--resume"])
    saved = checkpoints.list_checkpoints(out)
    assert [os.path.basename(p) for p in saved] == [f"step-{step:08d}.pt"]
    assert checkpoints.read_checkpoint(saved[-1])["step"] == step
    # the printed command continues the run (with fewer steps, which --resume allows)
    again = shlex.split(command)[1:]
    again[again.index("--steps") + 1] = str(step + 1)
    assert main(again) == 0
    assert f"resumed from {saved[-1]} at step {step}" in capsys.readouterr().out
    assert checkpoints.read_metrics(out / "metrics.jsonl")[-1]["step"] == step + 1


def test_resume_command_replaces_a_resume_with_a_file():
    args = build_parser().parse_args(["train", "--data", "d", "--out", "o"])
    from rgemma.cli.train import resume_command

    argv = ["train", "--data", "d", "--resume", "o/checkpoints/step-1.pt", "--out", "o"]
    assert resume_command(args, argv) == "rgemma train --data d --out o --resume"
    assert resume_command(args, ["train", "--resume", "--data", "d"]) == (
        "rgemma train --data d --resume"
    )
    # called as a function: rebuilt from the flags
    assert resume_command(args, ["-m", "pytest"]) == ("rgemma train --data d --out o --resume")


# --------------------------------------------------------------------------
# 9. temporary files of a killed run are removed
# --------------------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temp_files_of_dead_processes_are_removed_when_a_run_starts(corpus, run_copy, capsys):
    out = run_copy()
    dead = _dead_pid()
    stale = [
        out / "checkpoints" / f"step-00000003.pt.tmp{dead}",
        out / "data" / f"train-0123456789abcdef.npz.tmp{dead}.npz",
        out / f"tokenizer.model.tmp{dead}",
    ]
    live = out / "checkpoints" / f"step-00000004.pt.tmp{os.getpid()}"
    for path in stale + [live]:
        path.write_bytes(b"partial")
    argv = train_argv(corpus, out, "--resume")
    argv[argv.index("--steps") + 1] = "3"
    assert main(argv) == 0
    assert "removed 3 temporary file(s) of a stopped run" in capsys.readouterr().out
    assert not any(p.exists() for p in stale)
    assert live.exists()  # its writer (this process) is alive


# --------------------------------------------------------------------------
# 10. rgemma eval offline: one line, at once
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eval_model(init_model):
    return init_model


@needs_lm_eval
def test_eval_offline_task_not_in_the_cache_fails_at_once(
    eval_model, monkeypatch, capsys, tmp_path
):
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    start = time.monotonic()
    TaskManager()  # lm-eval's index of its ~15k tasks alone
    index_s = time.monotonic() - start
    start = time.monotonic()
    code = main(
        ["eval", "--model", eval_model, "--tasks", "hellaswag", "--limit", "1", "--no-progress"]
    )
    elapsed = time.monotonic() - start
    assert code == 1
    err = one_line_error(capsys, "eval")
    assert "task hellaswag" in err and "Hugging Face cache" in err and "HF_HUB_OFFLINE" in err
    assert elapsed < index_s + 10, (elapsed, index_s)


@needs_lm_eval
def test_eval_with_the_hub_out_of_reach_goes_offline_without_retries(
    eval_model, monkeypatch, capsys, tmp_path
):
    """No HF_*_OFFLINE variable; HF_ENDPOINT on a closed local port: the probe fails at
    once and the task's dataset is looked up only in the (empty) cache."""
    import socket

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    for proxy in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "needs_hub.yaml").write_text(
        "task: rgemma_needs_hub\ndataset_path: rgemma-test/not-cached\noutput_type: "
        "multiple_choice\ntest_split: test\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{c}}'\n"
        "doc_to_target: 0\nmetric_list:\n  - metric: acc\n"
    )
    start = time.monotonic()
    code = main(
        [
            "eval",
            "--model",
            eval_model,
            "--tasks",
            "rgemma_needs_hub",
            "--include-path",
            str(tasks),
            "--no-default-tasks",
            "--no-progress",
        ]
    )
    elapsed = time.monotonic() - start
    assert code == 1
    err = one_line_error(capsys, "eval")
    assert "task rgemma_needs_hub" in err and f"cannot connect to 127.0.0.1:{port}" in err
    assert elapsed < 10, elapsed


@needs_lm_eval
def test_eval_other_lm_eval_errors_are_one_line(eval_model, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "broken.yaml").write_text(
        "task: rgemma_broken\ncustom_dataset: !function no_such_module.load\n"
        "output_type: multiple_choice\ntest_split: test\n"
    )
    code = main(
        [
            "eval",
            "--model",
            eval_model,
            "--tasks",
            "rgemma_broken",
            "--include-path",
            str(tasks),
            "--no-default-tasks",
            "--no-progress",
        ]
    )
    assert code != 0
    err = one_line_error(capsys, "eval")
    assert "rgemma_broken" in err


@needs_lm_eval
@pytest.mark.parametrize(
    "flag,value",
    [("--limit", "0"), ("--chunk-size", "0"), ("--batch-size", "-3"), ("--num-fewshot", "-1")],
)
def test_eval_out_of_range_flags(eval_model, capsys, flag, value):
    refused(capsys, ["eval", "--model", eval_model, "--tasks", "x", flag, value], "eval")


# --------------------------------------------------------------------------
# 11. siblings: special files, odd JSONL, long lines, mixed runs
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero"])
def test_data_that_is_a_fifo_or_a_device_is_refused_at_once(corpus, tmp_path, capsys, kind):
    path = tmp_path / "fifo.txt"
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path = "/dev/zero"
    argv = train_argv(corpus, tmp_path / "out")
    argv[argv.index("--data") + 1] = str(path)
    start = time.monotonic()
    err = refused(capsys, argv)
    assert "not a regular file or a folder" in err
    assert time.monotonic() - start < 10
    assert not (tmp_path / "out").exists()


def test_special_files_inside_a_data_folder_are_skipped(tmp_path):
    (tmp_path / "good.txt").write_text("some text\n")
    os.mkfifo(tmp_path / "pipe.txt")
    os.symlink("/dev/zero", tmp_path / "zero.txt")
    cfg = train.TrainConfig(data=[str(tmp_path)])
    docs, skipped = data.read_corpus(cfg)
    assert [d.name for d in docs] == ["good.txt"] and skipped == 2


def test_resume_of_a_fifo_is_refused(corpus, tmp_path, capsys):
    os.mkfifo(tmp_path / "step-00000001.pt")
    err = refused(
        capsys, train_argv(corpus, tmp_path / "out", "--resume", str(tmp_path / "step-00000001.pt"))
    )
    assert "not a regular file" in err


@pytest.mark.parametrize(
    "line,message",
    [
        ("[1, 2, 3]", "expected an object with a 'text' string or a 'messages' list"),
        ('{"messages": ["hi", "there"]}', "message 0: expected an object"),
        ('{"messages": [{"role": "user", "content": 5}]}', "message 0: expected an object"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', "unknown role 'robot'"),
        ('{"messages": [{"role": "user", "content": "x"}]}', "without assistant messages"),
        ('{"text": "a", ', "not valid JSON"),
    ],
)
def test_jsonl_lines_that_are_not_documents(corpus, tmp_path, capsys, line, message):
    _, tok = corpus
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n' + line + "\n")
    out = tmp_path / "out"
    argv = [
        "train",
        "--data",
        str(bad),
        "--tokenizer",
        tok,
        "--preset",
        "tiny",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--out",
        str(out),
        "--no-progress",
    ]
    err = refused(capsys, argv)
    assert "bad.jsonl:2" in err and message in err
    assert not out.exists()


def test_a_huge_single_line_still_trains_a_tokenizer(tmp_path):
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "kappa"]
    line = " ".join(words[(i * 7) % 8] + str(i % 50) for i in range(40000))  # ~300k chars
    path = data.train_tokenizer([line], str(tmp_path / "tok.model"), vocab_size=500)
    assert os.path.getsize(path) > 1000


def test_tokenizer_training_on_no_text_is_one_line(tmp_path):
    with pytest.raises(data.DataError, match="cannot train a tokenizer"):
        data.train_tokenizer([""], str(tmp_path / "tok.model"), vocab_size=500)
    assert not (tmp_path / "tok.model").exists()


def test_a_new_run_into_a_folder_with_checkpoints_is_refused(corpus, run_copy, capsys):
    out = run_copy()
    before = listing(out)
    err = refused(capsys, train_argv(corpus, out))
    assert "already holds a run's checkpoints" in err and "--resume" in err
    assert listing(out) == before


@pytest.mark.parametrize(
    "extra,message",
    [
        (("--width", "64"), "--init"),
        (("--preset", "tiny"), "--init"),
    ],
)
def test_init_with_a_shape_is_refused(corpus, init_model, tmp_path, capsys, extra, message):
    root, _ = corpus
    out = tmp_path / "out"
    err = refused(capsys, init_argv(root, init_model, out, *extra))
    assert "fine-tunes the checkpoint's own shape" in err
    assert not out.exists()


def test_out_that_is_a_file_and_missing_init(corpus, tmp_path, capsys):
    file = tmp_path / "file"
    file.write_text("x")
    assert "exists and is not a folder" in refused(capsys, train_argv(corpus, file))
    root, tok = corpus
    err = refused(capsys, init_argv(root, str(tmp_path / "nope"), tmp_path / "o"))
    assert "--init" in err and "no such file or folder" in err


def test_device_this_torch_lacks(corpus, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "out"
    err = refused(capsys, train_argv(corpus, out, "--device", "cuda"))
    assert "--device cuda" in err and not out.exists()


def test_shape_errors_come_before_reading_data(tmp_path, capsys):
    out = tmp_path / "out"
    err = refused(
        capsys,
        [
            "train",
            "--data",
            str(tmp_path / "none"),
            "--width",
            "64",
            "--heads",
            "5",
            "--warmup",
            "0",
            "--out",
            str(out),
        ],
    )
    assert "model shape" in err and not out.exists()


def test_resolved_config_is_json_clean(tmp_path):
    """resolve_config leaves a TrainConfig a checkpoint can hold (plain values only)."""
    cfg, _ = train.resolve_config(
        train.TrainConfig(data=[DATA], preset="tiny", warmup=0, out=str(tmp_path / "o"))
    )
    assert json.loads(json.dumps(dataclasses.asdict(cfg)))["lr"] == 3e-3
