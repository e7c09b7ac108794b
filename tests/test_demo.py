"""The bundled demo model: shipped with the package, loads offline, generates."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import zipfile

import pytest
import torch

from rgemma.inference.generate import generate
from rgemma.io import checkpoint, demo

ROOT = pathlib.Path(__file__).resolve().parent.parent
MAX_BYTES = 40 * 2**20

pytestmark = pytest.mark.usefixtures("one_thread_per_test")


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access during a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_demo_files_are_bundled_and_small():
    directory = pathlib.Path(demo.path())
    names = {p.name for p in directory.iterdir()}
    assert set(demo.FILES) | {demo.CARD} <= names
    total = sum(p.stat().st_size for p in directory.iterdir() if p.is_file())
    assert total <= MAX_BYTES, f"{total / 2**20:.1f} MiB"
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == "recurrent_gemma"
    card = (directory / demo.CARD).read_text()
    for needle in ("unigram", "scripts/train_demo.sh", "def fibonacci(n):", "wall time"):
        assert needle in card


def test_demo_loads_offline_and_generates(no_network):
    model, tokenizer = checkpoint.load(demo.path())
    assert tokenizer is not None
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.start_of_turn_id) == (2, 1, 106)
    model.eval()
    prompt = tokenizer.encode("def fibonacci(n):", add_bos=True)
    new = generate(model, tokenizer, [prompt], max_new_tokens=24)[0].token_ids
    assert len(new) > 0
    text = tokenizer.decode(new)
    assert text.strip()
    # the state path (prefill + one token at a time) matches a full forward pass
    ids = torch.tensor([prompt + new])
    with torch.no_grad():
        logits, _ = model(ids, torch.arange(ids.shape[1])[None])
    greedy_again = logits[0, len(prompt) - 1 : -1].argmax(-1).tolist()
    assert greedy_again == new


def test_demo_beats_the_unigram_baseline_on_held_out_code():
    card = (pathlib.Path(demo.path()) / demo.CARD).read_text()
    rows = [line for line in card.splitlines() if line.startswith("| ")]
    ours = float(next(r for r in rows if "this model" in r).split("|")[2])
    unigram = float(next(r for r in rows if "unigram" in r).split("|")[2])
    assert ours < unigram - 1.0


def test_demo_predicts_python_it_never_saw():
    """The demo's target: at most 1.4 bits per byte on Python sources outside the
    standard library. Scored here on three modules of jinja2 (a dependency of torch,
    so always installed), as ``rgemma perplexity`` scores files."""
    import jinja2

    from rgemma.evaluation.perplexity import score_texts

    root = pathlib.Path(jinja2.__file__).parent
    names = ("lexer.py", "utils.py", "nodes.py")
    texts = [(n, (root / n).read_text(encoding="utf-8")) for n in names]
    model, tokenizer = checkpoint.load(demo.path())
    total = score_texts(model, tokenizer, texts).total
    assert total.bytes > 50_000
    assert total.bits_per_byte <= 1.4, total.bits_per_byte


def test_missing_demo_gives_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(demo, "_demo_dir", lambda: tmp_path)
    with pytest.raises(demo.DemoMissingError, match="train_demo.sh") as e:
        demo.path()
    assert "model.safetensors" in str(e.value)


def test_wheel_ships_the_demo_and_it_loads_from_the_installed_package(tmp_path):
    """Builds the wheel, installs it into a bare folder, loads the demo from there."""
    setuptools = pytest.importorskip("setuptools")
    major, minor = (int(x) for x in setuptools.__version__.split(".")[:2])
    if (major, minor) < (70, 1):
        pytest.importorskip("wheel", reason="building a wheel offline needs the wheel package")
    import shutil

    wheel_dir, target, tree = tmp_path / "wheel", tmp_path / "site", tmp_path / "tree"
    # build from a copy, so that setuptools' build/ folder stays out of the checkout
    shutil.copytree(
        ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, tree / name)
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            str(wheel_dir),
            str(tree),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    wheel = next(wheel_dir.glob("rgemma-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        shipped = {n.split("/")[-1] for n in z.namelist() if n.startswith("rgemma/demo/")}
    assert set(demo.FILES) | {demo.CARD} <= shipped
    with zipfile.ZipFile(wheel) as z:
        z.extractall(target)
    import sysconfig

    purelib = sysconfig.get_paths()["purelib"]
    # -S: no site-packages processing, so the editable install of rgemma is invisible;
    # the extracted wheel comes first, then the dependencies (torch...) by path.
    code = (
        f"import sys; sys.path[:0] = [{str(target)!r}, {purelib!r}]\n"
        "import socket; socket.socket.connect = None\n"
        "from rgemma.io import demo\n"
        "from rgemma.inference.generate import generate\n"
        f"assert demo.path().startswith({str(target)!r}), demo.path()\n"
        "m, t = demo.load()\n"
        "print('import ' + generate(m, t, ['import '], max_new_tokens=8)[0].text)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    run = subprocess.run(
        [sys.executable, "-S", "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith("import ")
