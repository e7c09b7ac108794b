"""`rgemma generate` and `rgemma chat` end to end, on a tiny random checkpoint.

A few runs go through a real subprocess (``python -m rgemma``); the many
bad-input cases call ``rgemma.cli.main`` in-process (same code path, without
paying the interpreter start-up each time on a 2-core machine).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
import torch

from helpers import small_config, small_model
from rgemma.cli import main
from rgemma.cli.chat import Repl
from rgemma.inference.chat import ChatSession
from rgemma.inference.generate import generate
from rgemma.io import checkpoint
from rgemma.io.snapshot import save_state

pytestmark = pytest.mark.usefixtures("one_thread")


def rgemma(*args, stdin: str | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONIOENCODING="utf-8")
    return subprocess.run(
        [sys.executable, "-m", "rgemma", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


# ==================================================================== generate
def test_generate_streams_the_api_output(model_dir, loaded, tmp_path, capsys):
    model, tok = loaded
    want = generate(model, tok, ["the quick brown fox"], max_new_tokens=12)[0]
    state_file = tmp_path / "s.safetensors"
    out = rgemma(
        "generate",
        "-",
        "--model",
        str(model_dir),
        "--max-tokens",
        "12",
        "--verbose",
        "--save-state",
        str(state_file),
        stdin="the quick brown fox",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == want.text + "\n"
    assert "tokens-per-sec" in out.stderr and "State:" in out.stderr and "MB" in out.stderr
    assert state_file.is_file()
    # In-process: the positional prompt, and --chat-template.
    assert (
        main(["generate", "the quick brown fox", "--model", str(model_dir), "--max-tokens", "12"])
        == 0
    )
    assert capsys.readouterr().out == want.text + "\n"
    chat = generate(
        model, tok, [tok.encode_chat([{"role": "user", "content": "hello"}])], max_new_tokens=12
    )[0]
    assert (
        main(
            [
                "generate",
                "hello",
                "--chat-template",
                "--model",
                str(model_dir),
                "--max-tokens",
                "12",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out == chat.text + "\n"


def test_generate_quantized_at_load(model_dir, capsys):
    """--quantize 8: the output of the model quantized by checkpoint.load."""
    model, tok = checkpoint.load(model_dir, quantize=8)
    want = generate(model, tok, ["the quick brown fox"], max_new_tokens=12)[0]
    assert (
        main(
            [
                "generate",
                "the quick brown fox",
                "--model",
                str(model_dir),
                "--max-tokens",
                "12",
                "--quantize",
                "8",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out == want.text + "\n"
    with pytest.raises(SystemExit):  # argparse: invalid choice
        main(["generate", "hi", "--model", str(model_dir), "--quantize", "5"])
    assert "invalid choice" in capsys.readouterr().err


def test_generate_save_then_load_continues_exactly(model_dir, loaded, tmp_path, capsys):
    model, tok = loaded
    prompt, kw = "once upon a time", ["--temp", "1.0", "--top-p", "0.9"]
    full = generate(
        model,
        tok,
        [prompt],
        max_new_tokens=30,
        temperature=1.0,
        top_p=0.9,
        seed=4,
        stop_token_ids=[],
    )[0]
    state_file = str(tmp_path / "s.safetensors")
    args = ["generate", prompt, "--model", str(model_dir), "--seed", "4", *kw]
    # The stop ids of the tokenizer may end the run early; compare token ids via the state.
    assert main(args + ["--max-tokens", "10", "--save-state", state_file]) == 0
    first = capsys.readouterr().out
    assert (
        main(
            [
                "generate",
                "--model",
                str(model_dir),
                "--load-state",
                state_file,
                "--max-tokens",
                "20",
                *kw,
                "--save-state",
                state_file,
            ]
        )
        == 0
    )
    second = capsys.readouterr().out
    from rgemma.io.snapshot import load_state

    _, meta = load_state(state_file, model)
    history = meta["token_ids"]
    stops = tok.stop_ids
    expect = full.prompt_ids + full.token_ids
    n = next((i for i, t in enumerate(full.token_ids) if t in stops), None)
    if n is None:  # no stop token: the whole 30
        assert history == expect
        assert first.rstrip("\n") + second.rstrip("\n") == full.text
    else:
        assert history == expect[: len(history)]


def test_generate_stop_string(model_dir, loaded, capsys):
    model, tok = loaded
    full = generate(model, tok, ["hello"], max_new_tokens=20)[0]
    stop = full.text[3:6]
    assert (
        main(["generate", "hello", "--model", str(model_dir), "--max-tokens", "20", "--stop", stop])
        == 0
    )
    assert capsys.readouterr().out == full.text[: full.text.index(stop)] + "\n"


# ============================================================= bad input
def _corrupt(path):
    path.write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a": 1}')
    return path


BAD = {
    "empty prompt": ([""], "empty"),
    "whitespace prompt": (["  \n\t"], "whitespace"),
    "max tokens 0": (["hi", "--max-tokens", "0"], "--max-tokens"),
    "max tokens negative": (["hi", "--max-tokens", "-3"], "--max-tokens"),
    "negative temperature": (["hi", "--temp", "-0.5"], "--temp"),
    "top-p 0": (["hi", "--top-p", "0"], "--top-p"),
    "top-p above 1": (["hi", "--top-p", "1.5"], "--top-p"),
    "unknown model": (["hi", "--model", "/nonexistent/model"], "not found"),
    "missing state": (["hi", "--load-state", "/nonexistent/state"], "not found"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_in_process(case, model_dir, tmp_path, capsys):
    argv, needle = BAD[case]
    argv = list(argv)
    if "--model" not in argv:
        argv += ["--model", str(model_dir)]
    out_file = tmp_path / "out.safetensors"
    code = main(["generate", *argv, "--save-state", str(out_file)])
    cap = capsys.readouterr()
    assert code != 0
    assert cap.out == ""
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rgemma generate: error: "), cap.err
    assert needle in lines[0]
    assert not out_file.exists() and os.listdir(tmp_path) == []


@pytest.mark.parametrize("kind", ["corrupt", "other model"])
def test_bad_state_file(kind, model_dir, loaded, tmp_path, capsys):
    model, tok = loaded
    state_file = tmp_path / "bad.safetensors"
    if kind == "corrupt":
        _corrupt(state_file)
    else:
        other = small_model(small_config(tok.vocab_size, window=8))
        save_state(state_file, other.init_state(1), model_config=other.config)
    out_file = tmp_path / "out.safetensors"
    code = main(
        [
            "generate",
            "hi",
            "--model",
            str(model_dir),
            "--load-state",
            str(state_file),
            "--save-state",
            str(out_file),
        ]
    )
    cap = capsys.readouterr()
    assert code != 0 and cap.out == "" and not out_file.exists()
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rgemma generate: error: ")
    assert ("another model" if kind == "other model" else "corrupt") in lines[0]


def test_bad_input_through_subprocess(model_dir, tmp_path):
    bad_state = _corrupt(tmp_path / "bad.safetensors")
    for argv in (["hi", "--top-p", "2"], ["hi", "--load-state", str(bad_state)]):
        if "--model" not in argv:
            argv = argv + ["--model", str(model_dir)]
        out = rgemma("generate", *argv, "--save-state", str(tmp_path / "o.safetensors"))
        assert out.returncode != 0 and out.stdout == ""
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("rgemma generate: error: "), out.stderr
        assert not (tmp_path / "o.safetensors").exists()


def test_unknown_compute_dtype_is_a_usage_error(model_dir):
    """argparse's own error, as for --dtype: the usage, then one line naming the flag and
    its choices; nothing generated."""
    out = rgemma("generate", "hi", "--model", str(model_dir), "--compute-dtype", "int8")
    assert out.returncode == 2 and out.stdout == ""
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("rgemma generate: error: argument --compute-dtype")
    assert "float32" in last


# ======================================================================== chat
TURNS = ["hello", "the quick brown fox", "once upon a time"]


def _api_answers(model, tok, turns, max_tokens=15):
    session = ChatSession(model, tok, sampling={"max_new_tokens": max_tokens})
    answers = []
    for t in turns:
        list(session.ask(t))
        answers.append(session.last.text)
    return session, answers


def test_chat_through_a_pipe_with_save_and_load(model_dir, loaded, tmp_path):
    model, tok = loaded
    _, answers = _api_answers(model, tok, TURNS)
    saved = tmp_path / "chat.safetensors"
    script = f"{TURNS[0]}\n{TURNS[1]}\n/save {saved}\n/reset\n/load {saved}\n{TURNS[2]}\n/quit\n"
    out = rgemma("chat", "--model", str(model_dir), "--max-tokens", "15", stdin=script)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "".join(a + "\n" for a in answers)
    assert saved.is_file()
    assert "saved" in out.stderr and "loaded" in out.stderr and ">>>" not in out.stdout


def test_chat_feeds_only_the_new_turn(loaded):
    model, tok = loaded
    session, _ = _api_answers(model, tok, TURNS[:2])
    c2 = session.last
    # The 2nd turn fed only: close the 1st answer, then the new user turn.
    rendered = tok.encode(
        f"\n<start_of_turn>user\n{TURNS[1]}<end_of_turn>\n<start_of_turn>model\n", add_bos=False
    )
    assert c2.prompt_ids[-len(rendered) :] == rendered
    assert len(c2.prompt_ids) <= len(rendered) + 2
    # The live state equals a fresh prefill of the whole history.
    ids = session.history_ids
    assert int(session.state.num_tokens[0]) == len(ids)
    assert ids[:2] == [tok.bos_id, tok.start_of_turn_id]
    fresh = model.init_state(1)
    with torch.no_grad():
        model(torch.tensor([ids]), torch.arange(len(ids))[None], fresh)
    for name, t in fresh.tensors().items():
        torch.testing.assert_close(session.state.tensors()[name], t, rtol=1e-4, atol=1e-4)


def test_chat_commands_and_errors_in_process(model_dir, loaded, tmp_path):
    model, tok = loaded
    session = ChatSession(model, tok, sampling={"max_new_tokens": 5})
    stdin = io.StringIO(
        f"/help\n/save {tmp_path}/x\nhello\n/load {tmp_path}/missing\n/bogus\n\nhello again\n"
    )
    stdout, stderr = io.StringIO(), io.StringIO()
    code = Repl(session, stdin=stdin, stdout=stdout, stderr=stderr).loop()
    assert code == 1  # errors in a pipe give a non-zero exit at the end
    assert len(stdout.getvalue().splitlines()) >= 2
    err = stderr.getvalue()
    assert "/save FILE" in err and "nothing to save" in err and "no such state file" in err
    assert "unknown command /bogus" in err
    assert len(session.messages) == 4


def test_chat_interrupt_keeps_a_consistent_state(loaded):
    model, tok = loaded
    session = ChatSession(model, tok, sampling={"max_new_tokens": 50})
    steps = []
    list(session.ask(TURNS[0], should_stop=lambda: len(steps) > 2 or steps.append(1)))
    assert session.last.finish_reason == "interrupted" and len(session.last.token_ids) == 4
    list(session.ask(TURNS[1]))
    ids = session.history_ids
    assert int(session.state.num_tokens[0]) == len(ids)
    # The interrupted answer was closed with <end_of_turn>.
    first_answer_end = len(session.messages[0]["content"])
    assert tok.end_of_turn_id in ids and first_answer_end >= 0


def test_generate_chat_template_continues_a_saved_chat(model_dir, loaded, tmp_path, capsys):
    model, tok = loaded
    session, answers = _api_answers(model, tok, TURNS[:2])
    first = ChatSession(model, tok, sampling={"max_new_tokens": 15})
    list(first.ask(TURNS[0]))
    saved = str(tmp_path / "chat.safetensors")
    first.save(saved)
    assert (
        main(
            [
                "generate",
                TURNS[1],
                "--chat-template",
                "--load-state",
                saved,
                "--model",
                str(model_dir),
                "--max-tokens",
                "15",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out == answers[1] + "\n"


def test_sampling_defaults_come_from_generation_config(model_dir, tmp_path, capsys):
    """A checkpoint's generation_config.json sets the defaults; a flag still wins."""
    import json
    import shutil

    from rgemma.io import checkpoint

    ckpt = tmp_path / "sampled"
    shutil.copytree(model_dir, ckpt)
    config = json.loads((ckpt / "generation_config.json").read_text())
    config.update(do_sample=True, temperature=0.9, top_k=5, repetition_penalty=1.3)
    (ckpt / "generation_config.json").write_text(json.dumps(config))
    model, tok = checkpoint.load(ckpt)
    want = generate(
        model,
        tok,
        ["the quick"],
        max_new_tokens=10,
        temperature=0.9,
        top_k=5,
        repetition_penalty=1.3,
        seed=4,
    )[0]
    greedy = generate(model, tok, ["the quick"], max_new_tokens=10, repetition_penalty=1.3)[0]
    assert want.text != greedy.text
    assert main(["generate", "the quick", "--model", str(ckpt), "-m", "10", "--seed", "4"]) == 0
    assert capsys.readouterr().out == want.text + "\n"
    assert main(["generate", "the quick", "--model", str(ckpt), "-m", "10", "--temp", "0"]) == 0
    assert capsys.readouterr().out == greedy.text + "\n"


@pytest.mark.parametrize(
    "dtype,compute,held,computes",
    [
        ("bfloat16", None, torch.bfloat16, torch.float32),  # the CPU default
        ("bfloat16", "bfloat16", torch.bfloat16, torch.bfloat16),
        ("float32", None, torch.float32, torch.float32),
    ],
)
def test_cpu_default_computes_half_width_weights_in_float32(
    model_dir, dtype, compute, held, computes
):
    """On the CPU, bf16 weights stay held in bf16 and the activations are float32 (the
    path of rgemma's CPU kernels) unless --compute-dtype says otherwise."""
    import argparse

    from rgemma.cli.common import load_model

    args = argparse.Namespace(
        model=str(model_dir), revision=None, dtype=dtype, device="cpu", quantize=None,
        threads=1, tokenizer=None, compute_dtype=compute,
    )  # fmt: skip
    model, _ = load_model(args)
    assert model.dtype == held and model.activation_dtype == computes
