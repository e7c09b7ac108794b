"""``--model ORG/NAME``: Hugging Face Hub ids, against a local HTTP server standing in for
the Hub (``HF_ENDPOINT``), its cache, offline use, and gated or unknown models.

The server answers the calls ``huggingface_hub.snapshot_download`` makes (repo info,
file tree, file metadata and contents) for one small model. The verbs run in
subprocesses, since ``huggingface_hub`` reads its endpoint when it is imported.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

import pytest

REPO, GATED, COMMIT = "org/tiny", "org/gated", "c0ffee" + "0" * 34


class FakeHub(BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    requests: list[str] = []

    def log_message(self, *args) -> None:
        pass

    def _answer(self, head: bool) -> None:
        path = unquote(urlparse(self.path).path)
        self.requests.append(f"{self.command} {path}")
        status, body, headers = 404, b"{}", {"X-Error-Code": "RepoNotFound"}
        if path.startswith((f"/api/models/{GATED}", f"/{GATED}/")):
            status, headers = 403, {"X-Error-Code": "GatedRepo"}
            body = b'{"error": "Access to model org/gated is restricted."}'
        elif path.startswith(f"/api/models/{REPO}/revision/"):
            status, headers = 200, {"Content-Type": "application/json"}
            body = json.dumps(
                {"id": REPO, "sha": COMMIT, "siblings": [{"rfilename": n} for n in self.files]}
            ).encode()
        elif path.startswith(f"/api/models/{REPO}/tree/"):
            status, headers = 200, {"Content-Type": "application/json"}
            body = json.dumps(
                [
                    {"type": "file", "path": n, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                    for n, b in self.files.items()
                ]
            ).encode()
        elif path.startswith(f"/{REPO}/resolve/"):
            name = path.split("/", 5)[-1]
            if name in self.files:
                body = self.files[name]
                status = 200
                headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha1(body).hexdigest()}"'}
            else:
                headers = {"X-Error-Code": "EntryNotFound"}
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def do_GET(self) -> None:
        self._answer(head=False)

    def do_HEAD(self) -> None:
        self._answer(head=True)


@pytest.fixture(scope="module")
def hub(model_dir):
    FakeHub.files = {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()}
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def rgemma(*args, endpoint: str, cache, **env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    environ.update(
        HF_ENDPOINT=endpoint,
        HF_HUB_CACHE=str(cache),
        OMP_NUM_THREADS="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        **env,
    )
    return subprocess.run(
        [sys.executable, "-m", "rgemma", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=environ,
    )


def one_line(proc: subprocess.CompletedProcess) -> str:
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("rgemma generate: error: ") and "Traceback" not in proc.stderr, err
    return err


def test_a_hub_id_downloads_then_opens_from_the_cache_offline(hub, model_dir, tmp_path):
    local = subprocess.run(
        [sys.executable, "-m", "rgemma", "generate", "hello", "-m", "6", "--model", str(model_dir)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert local.returncode == 0, local.stderr
    cache = tmp_path / "hf"
    FakeHub.requests.clear()
    first = rgemma("generate", "hello", "-m", "6", "--model", REPO, endpoint=hub, cache=cache)
    assert first.returncode == 0, first.stderr
    assert first.stdout == local.stdout  # the same model, the same text
    assert any(r.endswith("/model.safetensors") for r in FakeHub.requests)
    assert list(cache.glob("models--org--tiny/snapshots/*/config.json"))
    FakeHub.requests.clear()
    offline = rgemma(
        "generate",
        "hello",
        "-m",
        "6",
        "--model",
        REPO,
        endpoint=hub,
        cache=cache,
        HF_HUB_OFFLINE="1",
    )
    assert offline.returncode == 0 and offline.stdout == local.stdout, offline.stderr
    assert FakeHub.requests == []  # no network at all
    unreachable = rgemma(
        "generate", "hello", "-m", "6", "--model", REPO, endpoint=closed_port(), cache=cache
    )
    assert unreachable.returncode == 0 and unreachable.stdout == local.stdout


def test_uncached_offline_is_one_line_naming_the_id(tmp_path):
    proc = rgemma(
        "generate",
        "hi",
        "--model",
        "org/never-seen",
        endpoint=closed_port(),
        cache=tmp_path / "hf",
        HF_HUB_OFFLINE="1",
    )
    assert proc.returncode == 1
    err = one_line(proc)
    assert "org/never-seen" in err and "cache" in err and "offline" in err


def test_gated_and_unknown_models(hub, tmp_path):
    gated = rgemma("generate", "hi", "--model", GATED, endpoint=hub, cache=tmp_path / "hf")
    assert gated.returncode == 1
    err = one_line(gated)
    assert "gated" in err and "licence" in err and "HF_TOKEN" in err and GATED in err
    unknown = rgemma(
        "generate", "hi", "--model", "org/nothing", endpoint=hub, cache=tmp_path / "hf"
    )
    assert unknown.returncode == 1 and "no such model" in one_line(unknown)


def test_revision_needs_a_hub_id(model_dir, capsys):
    from rgemma.cli import main

    assert main(["generate", "hi", "--model", str(model_dir), "--revision", "v1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rgemma generate: error: ") and "Hub id" in err


def test_a_local_folder_named_like_an_id_wins(model_dir, tmp_path, monkeypatch):
    from rgemma.io import hub as hub_module

    (tmp_path / "org").mkdir()
    os.symlink(model_dir, tmp_path / "org" / "tiny")
    monkeypatch.chdir(tmp_path)
    assert not hub_module.is_hub_id("org/tiny")
    assert hub_module.is_hub_id("org/elsewhere") and not hub_module.is_hub_id("./x/y")
