"""Hostile and mistaken input to ``rgemma serve``: each is refused quickly with a 4xx in
OpenAI's error shape (or cancelled at once), costs the engine nothing, and leaks nothing.

The server runs in a thread over the tiny random model of conftest's ``tiny``.
"""

from __future__ import annotations

import concurrent.futures
import gc
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

from helpers import MAX_PROMPT_TOKENS, metrics, server_config, wait_until
from rgemma.cli import main as cli_main
from rgemma.cli.common import CLIError
from rgemma.cli.serve import _listen
from rgemma.inference.engine import Engine, EngineConfig
from rgemma.inference.sampling import SamplingError, SamplingParams
from rgemma.serving.app import ServerThread, create_app
from rgemma.serving.protocol import PROMPT_BYTES_PER_TOKEN

pytestmark = pytest.mark.usefixtures("one_thread")

MAX_PROMPT_BYTES = MAX_PROMPT_TOKENS * PROMPT_BYTES_PER_TOKEN


@pytest.fixture(scope="module")
def engine(tiny):
    model, tok, _ = tiny
    with Engine(model, tok, EngineConfig(max_batch=8, max_queue=64, prefill_chunk=64)) as e:
        yield e


class WatchedTokenizer:
    """The tiny tokenizer, recording each encode (start, end, bytes) and refusing texts over
    ``refuse_over`` bytes (a server that tokenizes those has a bug)."""

    def __init__(self, tok, refuse_over: int | None = None):
        self._tok, self.refuse_over, self.calls = tok, refuse_over, []

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def encode(self, text, add_bos=True):
        size = len(text.encode())
        if self.refuse_over is not None and size > self.refuse_over:
            raise AssertionError(f"tokenized a prompt of {size} bytes")
        t0 = time.monotonic()
        ids = self._tok.encode(text, add_bos)
        self.calls.append((t0, time.monotonic(), size))
        return ids

    def decode(self, ids, *args, **kwargs):
        ids = list(ids)
        if self.refuse_over is not None and len(ids) > self.refuse_over:
            raise AssertionError(f"decoded {len(ids)} token ids")
        return self._tok.decode(ids, *args, **kwargs)


def responses(url: str, code: int) -> float:
    return metrics(url).get(f'rgemma_http_responses_total{{code="{code}"}}', 0.0)


def post(url: str, path: str, body, timeout: float = 30) -> tuple[httpx.Response, float]:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    t0 = time.perf_counter()
    r = httpx.post(
        url + path, content=content, headers={"content-type": "application/json"}, timeout=timeout
    )
    return r, time.perf_counter() - t0


def assert_error(r: httpx.Response, status: int, param, code, message: str = "") -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["type"] == "invalid_request_error", error
    assert error["param"] == param and error["code"] == code, error
    assert message in error["message"], error
    return error


def assert_idle(engine: Engine) -> None:
    assert wait_until(
        lambda: (
            (s := engine.stats()).active_slots == 0
            and s.waiting == 0
            and s.prefilling == 0
            and s.reserved_slots == 0
        ),
        10,
    ), engine.stats()


# ======================================================== 1. abandoned clients
def _send_raw(url: str, path: str, body: dict) -> socket.socket:
    """A raw HTTP request whose socket the caller closes (= the client leaves)."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    return sock


def test_abandoned_non_streamed_request_is_cancelled_within_a_second(engine, tiny):
    """Tokens flow all along (events never pause), and yet the client's leaving is seen:
    every engine request of it is cancelled and its rows are free within ~1 s."""
    config = server_config(max_tokens_limit=100_000)
    with ServerThread(create_app(engine, tiny[1], config)) as u:
        before = engine.stats()
        sock = _send_raw(
            u,
            "/v1/completions",
            {"prompt": ["hello", "a model"], "n": 2, "max_tokens": 100_000, "ignore_eos": True},
        )
        assert wait_until(lambda: engine.stats().active_slots == 4, 30), engine.stats()
        generated = engine.stats().generated_tokens
        assert wait_until(lambda: engine.stats().generated_tokens > generated + 40, 30)
        sock.close()  # the client gives up
        t0 = time.perf_counter()
        assert wait_until(lambda: engine.stats().active_slots == 0, 5), engine.stats()
        freed_after = time.perf_counter() - t0
        after = engine.stats()
        assert after.requests_cancelled == before.requests_cancelled + 2
        assert freed_after < 1.0, freed_after  # measured ~0.2 s (the poll period)
        assert_idle(engine)
        # A new request is served at once, not after the abandoned one's 200k tokens.
        r, took = post(u, "/v1/completions", {"prompt": "hi", "max_tokens": 4})
        assert r.status_code == 200 and took < 5, (r.text, took)


def test_abandoned_requests_waiting_in_the_queue_are_dropped(tiny):
    model, tok, _ = tiny
    with (
        Engine(model, tok, EngineConfig(max_batch=1, max_queue=8)) as engine,
        ServerThread(create_app(engine, tok, server_config(max_tokens_limit=100_000))) as u,
    ):
        hold = _send_raw(
            u, "/v1/completions", {"prompt": "hi", "max_tokens": 100_000, "ignore_eos": True}
        )
        assert wait_until(lambda: engine.stats().active_slots == 1, 30)
        waiting = [
            _send_raw(u, "/v1/completions", {"prompt": "hi", "max_tokens": 100_000})
            for _ in range(3)
        ]
        assert wait_until(lambda: engine.stats().waiting == 3, 30), engine.stats()
        for s in waiting + [hold]:
            s.close()
        assert wait_until(lambda: engine.stats().requests_cancelled == 4, 2), engine.stats()
        assert_idle(engine)


# ================================================= 2. big prompts off the loop
@pytest.mark.parametrize("path", ["/v1/completions", "/tokenize"])
def test_health_answers_while_a_huge_prompt_is_tokenized(engine, tiny, path):
    """A 4 MB prompt (under the body and byte limits) is parsed, tokenized and answered in
    worker threads: /health and the event loop stay responsive all along."""
    tok = WatchedTokenizer(tiny[1])
    config = server_config(max_prompt_tokens=1_000_000, max_body_bytes=8 * 2**20)
    prompt = "hello world the quick brown fox " * (4 * 2**20 // 32)
    with ServerThread(create_app(engine, tok, config)) as u:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            big = pool.submit(post, u, path, {"prompt": prompt, "max_tokens": 1})
            answers = []  # (sent, latency)
            with httpx.Client(timeout=10) as http:
                while not big.done():
                    t0 = time.monotonic()
                    assert http.get(u + "/health").status_code == 200
                    answers.append((t0, time.monotonic() - t0))
                    time.sleep(0.01)
            r, _ = big.result()
    [(start, end, size)] = tok.calls
    assert size == len(prompt.encode()) and end - start > 0.05
    if path == "/tokenize":
        assert r.status_code == 200 and r.json()["count"] > 1_000_000
    else:
        assert_error(r, 400, "prompt", "context_length_exceeded", "over this server's limit")
    assert [sent for sent, _ in answers if start <= sent <= end], (start, end, answers)
    latencies = [latency for _, latency in answers]
    assert max(latencies) < 0.3, latencies  # measured: <= 0.05 s (before: 1.1 s)


def test_full_collections_skip_what_existed_when_the_server_started(engine, tiny):
    """A full garbage collection holds the GIL while it walks the heap: with a large heap
    in the process, a running server (nested or not) makes it walk only newer objects,
    and the process's collector is as before once the last server stopped."""
    heap = [[i] for i in range(1_000_000)]  # tracked objects, as a large process has

    def full_collection_s() -> float:
        t0 = time.perf_counter()
        gc.collect()
        return time.perf_counter() - t0

    frozen_before = gc.get_freeze_count()
    alone = min(full_collection_s() for _ in range(2))
    app = create_app(engine, tiny[1], server_config())
    with ServerThread(app) as u:
        with ServerThread(create_app(engine, tiny[1], server_config())):
            assert gc.get_freeze_count() >= len(heap)
        assert gc.get_freeze_count() >= len(heap)  # the inner server's end kept the freeze
        serving = min(full_collection_s() for _ in range(2))
        assert httpx.get(u + "/health").status_code == 200
    assert gc.get_freeze_count() == frozen_before
    assert serving < alone / 5, (serving, alone)
    del heap


def test_over_long_prompts_are_refused_by_bytes_without_tokenizing(engine, tiny):
    tok = WatchedTokenizer(tiny[1], refuse_over=MAX_PROMPT_BYTES)
    long = "x" * (MAX_PROMPT_BYTES + 1)
    submitted = engine.stats().requests_submitted
    with ServerThread(create_app(engine, tok, server_config())) as u:
        for path, body, param in [
            ("/v1/completions", {"prompt": long}, "prompt"),
            ("/v1/completions", {"prompt": ["hi", long]}, "prompt"),
            ("/v1/completions", {"prompt": "é" * (MAX_PROMPT_BYTES // 2 + 1)}, "prompt"),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": long}]}, "messages"),
            (
                "/v1/chat/completions",
                {
                    "messages": [
                        {"role": "user", "content": long[:5000]},
                        {"role": "assistant", "content": "ok"},
                        {"role": "user", "content": long[:5000]},
                    ]
                },
                "messages",
            ),
        ]:
            r, took = post(u, path, body)
            assert_error(r, 400, param, "context_length_exceeded", f"limit of {MAX_PROMPT_BYTES}")
            assert took < 2, took
        # Token ids over the limit are refused before anything decodes them.
        r, _ = post(u, "/v1/completions", {"prompt": [5] * (MAX_PROMPT_TOKENS + 1)})
        assert_error(r, 400, "prompt", "context_length_exceeded", "over this server's limit")
        # Under the byte bound, the token count decides, as before.
        r, _ = post(u, "/v1/completions", {"prompt": "hello world " * MAX_PROMPT_TOKENS})
        assert_error(r, 400, "prompt", "context_length_exceeded", "tokens, over")
        assert responses(u, 500) == 0
    assert engine.stats().requests_submitted == submitted
    assert all(size <= MAX_PROMPT_BYTES for *_, size in tok.calls)


# ================================================================ 3. bodies
@pytest.mark.parametrize(
    "content",
    [
        b"[" * 60_000,
        b'{"a":' * 12_000,
        b'{"prompt": "x", "stop": ' + b"[" * 60_000,
        b'{"prompt": "x", "tools": ' + b"[" * 900 + b"]" * 900 + b"}",  # parses: pydantic's
    ],
    ids=["arrays", "objects", "in-a-field", "900-deep-valid"],
)
def test_deeply_nested_json_is_a_400(url, content):
    before = responses(url, 500)
    r, took = post(url, "/v1/completions", content)
    assert r.status_code == 400 and took < 2, (r.text, took)
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"], error
    if content.count(b"[") > 1000 or content.count(b"{") > 1000:
        assert error == {
            "message": "invalid JSON: nested too deeply",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_json",
        }
    assert responses(url, 500) == before == 0
    assert responses(url, 400) >= 1


@pytest.mark.parametrize("content", [b'"a string"', b"null", b"123", b"true", b"[]"])
def test_json_that_is_not_an_object_is_a_400(url, content):
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
        r, _ = post(url, path, content)
        assert_error(r, 400, None, "invalid_json", "must be an object")


def test_server_errors_are_counted(engine, tiny):
    """5xx answers are in the responses counter: an engine that is not running (503)."""
    model, tok, _ = tiny
    stopped = Engine(model, tok, EngineConfig(max_batch=1)).start()
    with ServerThread(create_app(stopped, tok, server_config())) as u:
        stopped.stop()
        r, _ = post(u, "/v1/completions", {"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"
        assert responses(u, 503) == 1


# ============================================================== 4. budgets
def test_logprobs_over_the_budget_are_refused_before_any_work(engine, tiny):
    submitted = engine.stats().requests_submitted
    with ServerThread(create_app(engine, tiny[1], server_config(max_logprob_entries=1000))) as u:
        prompts = ["the quick brown fox jumps over the lazy dog"] * 4
        body = {"prompt": prompts, "echo": True, "logprobs": 20, "max_tokens": 0}
        r, took = post(u, "/v1/completions", body)
        error = assert_error(r, 400, "logprobs", "too_many_logprobs", "budget of 1000")
        assert "x (1 + 20 alternatives)" in error["message"] and took < 2
        r, _ = post(
            u,
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "hi"}],
                "logprobs": True,
                "top_logprobs": 20,
                "max_tokens": 100,
                "n": 2,
            },
        )
        assert_error(r, 400, "top_logprobs", "too_many_logprobs", "budget of 1000")
        assert engine.stats().requests_submitted == submitted
        # Within the budget: served.
        r, _ = post(u, "/v1/completions", {**body, "prompt": prompts[:1], "logprobs": 2})
        assert r.status_code == 200, r.text
        assert len(r.json()["choices"][0]["logprobs"]["tokens"]) > 5
    assert_idle(engine)


def test_work_over_the_request_token_budget_is_refused(engine, tiny):
    submitted = engine.stats().requests_submitted
    with ServerThread(create_app(engine, tiny[1], server_config(max_request_tokens=2000))) as u:
        r, _ = post(u, "/v1/completions", {"prompt": ["a", "b", "c"], "n": 8, "max_tokens": 100})
        assert_error(r, 400, "max_tokens", "request_too_large", "budget of 2000 tokens")
        r, _ = post(
            u, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 8}
        )  # max_tokens: 512
        assert_error(r, 400, "max_tokens", "request_too_large", "n=8 x max_tokens=512")
        assert engine.stats().requests_submitted == submitted
        r, _ = post(u, "/v1/completions", {"prompt": ["a", "b"], "n": 2, "max_tokens": 3})
        assert r.status_code == 200, r.text
    assert_idle(engine)


# ================================================== 5. float32 representability
@pytest.mark.parametrize(
    "field,value",
    [
        ("repetition_penalty", 1e-300),
        ("repetition_penalty", 1e-40),
        ("top_p", 1e-300),
        ("min_p", 1e-300),
        ("min_p", 1e-45),
    ],
)
def test_unrepresentable_sampling_values_get_a_400(url, field, value):
    r, _ = post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 2, field: value})
    error = assert_error(r, 400, field, "invalid_value", "float32")
    assert error["message"].startswith(f"'{field}'")


def test_tiny_temperatures_are_greedy_on_the_server(url):
    greedy, _ = post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 4, "temperature": 0})
    tiny_t, _ = post(
        url, "/v1/completions", {"prompt": "hi", "max_tokens": 4, "temperature": 1e-300}
    )
    assert tiny_t.status_code == 200
    assert tiny_t.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=1e-300),
        dict(temperature=1e-40),
        dict(temperature=1e39),
        dict(repetition_penalty=1e-300),
        dict(repetition_penalty=1e-39),
        dict(repetition_penalty=1e300),
        dict(top_p=1e-300),
        dict(min_p=1e-300),
    ],
)
def test_sampling_params_refuse_values_float32_cannot_hold(kwargs):
    with pytest.raises(SamplingError, match=f"{next(iter(kwargs))} must be .*float32"):
        SamplingParams(**kwargs)


def test_sampling_params_accept_the_float32_range():
    tiny, big = float(torch.finfo(torch.float32).tiny), float(torch.finfo(torch.float32).max)
    for kwargs in (
        dict(temperature=0, min_p=0),
        dict(temperature=tiny),
        dict(temperature=big),
        dict(repetition_penalty=tiny),
        dict(repetition_penalty=big),
        dict(top_p=tiny, min_p=tiny),
        dict(top_p=1, min_p=1),
    ):
        SamplingParams(**kwargs)


# =================================================================== 6. port
@pytest.mark.parametrize("port", ["99999", "65536", "-1"])
def test_serve_refuses_a_port_out_of_range(port, capsys):
    t0 = time.perf_counter()
    assert cli_main(["serve", "--port", port]) == 2
    assert time.perf_counter() - t0 < 2  # before loading any model
    err = capsys.readouterr().err
    assert err == (
        f"rgemma serve: error: --port must be in [0, 65535] (0 = any free port), got {port}\n"
    )


def test_listen_binds_the_port_it_reports():
    sock = _listen("127.0.0.1", 0)
    try:
        port = sock.getsockname()[1]
        assert 0 < port <= 65535
        sock.listen()
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        with pytest.raises(CLIError, match=f"cannot listen on 127.0.0.1 port {port}: "):
            _listen("127.0.0.1", port).close()  # taken
    finally:
        sock.close()


def test_serve_on_port_0_prints_the_port_it_listens_on(tiny):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rgemma.cli.serve",
            "--model",
            str(tiny[2]),
            "--port",
            "0",
            "--threads",
            "1",
            "--log-level",
            "warning",
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
        reader.start()
        assert wait_until(lambda: any(" on http://" in line for line in lines), 120), lines
        [line] = [line for line in lines if " on http://" in line]
        port = int(re.search(r"http://127\.0\.0\.1:(\d+) ", line).group(1))
        assert port != 0
        assert wait_until(lambda: _health(port), 60), lines
    finally:
        proc.terminate()
        proc.wait(30)


def _health(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


# ================================================================ 7. siblings
def test_stop_and_logit_bias_are_bounded(url):
    r, _ = post(url, "/v1/completions", {"prompt": "x", "stop": ["a"] * 10_000})
    assert_error(r, 400, "stop", "invalid_value", "at most 16")
    r, _ = post(
        url, "/v1/completions", {"prompt": "x", "logit_bias": {str(i): 1 for i in range(5000)}}
    )
    assert_error(r, 400, "logit_bias", "unsupported", "not supported")


def test_huge_numbers_are_a_400(url):
    for body, param in [
        (b'{"prompt": "x", "max_tokens": 1' + b"0" * 5000 + b"}", None),
        (b'{"prompt": "x", "temperature": 1e999}', "temperature"),
        (b'{"prompt": "x", "seed": ' + b"9" * 100 + b"}", "seed"),
    ]:
        r, _ = post(url, "/v1/completions", body)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param, r.text
