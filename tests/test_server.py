"""`rgemma serve`: the OpenAI client against a live server on 127.0.0.1, errors, load.

The server runs in a thread (uvicorn on a free 127.0.0.1 port) over a tiny
random model saved and loaded like a real checkpoint (conftest's ``tiny``).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import random
import re
import time

import httpx
import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from helpers import (
    MAX_BODY,
    MAX_PROMPT_TOKENS,
    PROMPTS,
    metrics,
    server_config,
    teacher_forced_logprobs,
    wait_until,
)
from rgemma.cli.serve import register
from rgemma.inference.engine import Engine, EngineConfig, EngineStats, Request
from rgemma.inference.generate import generate
from rgemma.inference.sampling import generation_defaults
from rgemma.serving.app import ServerThread, create_app
from rgemma.serving.metrics import ServerMetrics
from rgemma.serving.protocol import (
    MIN_TEMPERATURE,
    ChatCompletionRequest,
    CompletionRequest,
    RequestLimits,
    api_error_from_validation,
)

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def engine(tiny):
    model, tok, _ = tiny
    with Engine(
        model,
        tok,
        EngineConfig(max_batch=8, max_queue=100, prefill_chunk=64, prefix_cache_bytes=2**22),
    ) as e:
        yield e


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def idle(url: str) -> bool:
    m = metrics(url)
    return (
        m["rgemma_active_slots"] == 0
        and m["rgemma_queue_depth"] == 0
        and m["rgemma_prefilling_requests"] == 0
        and m["rgemma_reserved_slots"] == 0
    )


# ================================================================ the client
def test_models_and_health(client, url):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(url + "/health").json() == {"status": "ok"}


def test_completion_equals_engine(client, engine, tiny):
    _, tok, _ = tiny
    r = client.completions.create(
        model="tiny",
        prompt="the quick brown fox",
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    choices, _ = engine.submit(
        Request(prompt_ids=tok.encode("the quick brown fox"), max_tokens=12, stop_ids=[])
    ).result(timeout=60)
    assert r.choices[0].text == choices[0].text
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(tok.encode("the quick brown fox"))
    assert r.usage.completion_tokens == 12


def test_prompt_lists_and_token_ids(client, tiny):
    _, tok, _ = tiny
    ids = tok.encode("hello world")
    r = client.completions.create(
        model="tiny", prompt=["hello world", "a model"], max_tokens=5, temperature=0
    )
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=5, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert by_ids.choices[0].text == r.choices[0].text


def test_chat(client, tiny):
    _, tok, _ = tiny
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    r = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=10, temperature=0
    )
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(tok.encode_chat(messages))
    # Content given as text parts is the same message.
    parts = [
        messages[0],
        {
            "role": "user",
            "content": [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}],
        },
    ]
    same = client.chat.completions.create(
        model="tiny", messages=parts, max_tokens=10, temperature=0
    )
    assert same.choices[0].message.content == r.choices[0].message.content


def test_chat_stops_on_end_of_turn(tiny):
    """A model that always says <end_of_turn> ends its turn at once, with finish 'stop'."""
    model, tok, _ = tiny
    original = model.logits

    def always_end_of_turn(x):
        z = original(x)
        z[..., tok.end_of_turn_id] = 1e4
        return z

    model.logits = always_end_of_turn
    try:
        with (
            Engine(model, tok, EngineConfig(max_batch=2)) as engine,
            ServerThread(create_app(engine, tok, server_config())) as u,
        ):
            c = openai.OpenAI(base_url=u + "/v1", api_key="x", max_retries=0)
            r = c.chat.completions.create(
                model="tiny", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
            )
    finally:
        del model.logits
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == ""
    assert r.usage.completion_tokens == 1


def test_streaming_equals_non_streaming(client):
    kwargs = dict(model="tiny", prompt="once upon a time", max_tokens=20, temperature=0.9, seed=11)
    whole = client.completions.create(**kwargs)
    chunks = list(
        client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    chat = dict(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=12, temperature=0
    )
    whole = client.chat.completions.create(**chat)
    chunks = list(client.chat.completions.create(**chat, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks)
        == whole.choices[0].message.content
    )


def test_n_and_seeds(client):
    kwargs = dict(
        model="tiny", prompt="hello", max_tokens=16, temperature=3.0, extra_body={"top_k": 50}
    )
    a = client.completions.create(**kwargs, n=3, seed=5)
    b = client.completions.create(**kwargs, n=3, seed=5)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # reproducible
    assert len({c.text for c in a.choices}) > 1  # n distinct draws
    # Choice j of seed s is the single choice of seed s + j.
    one = client.completions.create(**kwargs, seed=6)
    assert one.choices[0].text == a.choices[1].text
    other = client.completions.create(**kwargs, n=3, seed=99)
    assert [c.text for c in other.choices] != [c.text for c in a.choices]


def test_stop_strings(client):
    base = client.completions.create(
        model="tiny",
        prompt="hello world",
        max_tokens=30,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    text = base.choices[0].text
    stop = text[10:13]
    r = client.completions.create(
        model="tiny",
        prompt="hello world",
        max_tokens=30,
        temperature=0,
        stop=[stop, "zzzz"],
        extra_body={"ignore_eos": True},
    )
    assert r.choices[0].text == text[: text.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model="tiny",
        prompt="hello world",
        max_tokens=30,
        temperature=0,
        stop=stop,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    assert "".join(c.choices[0].text for c in streamed) == text[: text.index(stop)]


# ============================================================== log-likelihood
def test_echo_logprobs_equal_teacher_forcing(client, tiny):
    model, tok, _ = tiny
    ids = tok.encode("the quick brown fox jumps over a lazy dog")
    want = teacher_forced_logprobs(model, ids)
    r = client.completions.create(
        model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=1, temperature=0
    )
    lp = r.choices[0].logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert max(abs(a - b) for a, b in zip(lp.token_logprobs[1:], want)) < 1e-4
    assert len(lp.tokens) == len(ids) and lp.text_offset[0] == 0
    assert r.choices[0].text == tok.decode(ids) and r.choices[0].finish_reason == "length"
    # What lm-eval's local-completions sends: max_tokens 1, then slices [ctxlen:-1].
    r = client.completions.create(
        model="tiny",
        prompt=[ids, ids[:5]],
        max_tokens=1,
        echo=True,
        logprobs=1,
        temperature=0,
        seed=1234,
    )
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) + 1
    assert max(abs(a - b) for a, b in zip(lp.token_logprobs[1 : len(ids)], want)) < 1e-4
    greedy = [max(top.values()) == t for t, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:])]
    assert greedy[-1]  # the generated token is the argmax
    assert len(r.choices[1].logprobs.tokens) == 6


def test_chat_logprobs(client):
    r = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob == c.logprob for c in content)
    assert "".join(c.token for c in content) == r.choices[0].message.content


# ================================================================= batching
def test_concurrent_requests_equal_alone_and_are_batched(client):
    def ask(i: int) -> str:
        return (
            client.completions.create(
                model="tiny",
                prompt=PROMPTS[i],
                max_tokens=48,
                temperature=0,
                extra_body={"ignore_eos": True},
            )
            .choices[0]
            .text
        )

    t0 = time.perf_counter()
    alone = [ask(i) for i in range(8)]
    t_alone = time.perf_counter() - t0
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        t0 = time.perf_counter()
        together = list(pool.map(ask, range(8)))
        t_together = time.perf_counter() - t0
    assert together == alone
    assert t_together < 0.5 * t_alone, (t_together, t_alone)  # << 8 x one request


def test_disconnect_frees_the_slot(client, url, engine):
    stream = client.completions.create(
        model="tiny",
        prompt="hello",
        max_tokens=500,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    for i, _ in enumerate(stream):
        if i == 2:  # 3 chunks, then leave
            break
    assert metrics(url)["rgemma_active_slots"] == 1
    cancelled = engine.stats().requests_cancelled
    stream.close()
    steps = engine.stats().steps
    t0 = time.perf_counter()
    assert wait_until(lambda: engine.stats().active_slots == 0, 5)
    freed_after, freed_steps = time.perf_counter() - t0, engine.stats().steps - steps
    m = metrics(url)
    assert m["rgemma_active_slots"] == 0 and m["rgemma_reserved_slots"] == 0
    assert m['rgemma_requests_total{outcome="cancelled"}'] == cancelled + 1
    assert freed_after < 1.0 and freed_steps <= 10, (freed_after, freed_steps)  # measured: <= 2


@contextlib.contextmanager
def one_busy_row(tiny, max_queue: int):
    """(engine, url, hold): an engine of one row, held by an endless request, and a server."""
    model, tok, _ = tiny
    with (
        Engine(model, tok, EngineConfig(max_batch=1, max_queue=max_queue)) as engine,
        ServerThread(create_app(engine, tok, server_config())) as u,
    ):
        hold = engine.submit(Request(prompt_ids=[2, 10], max_tokens=100_000, stop_ids=[]))
        assert wait_until(lambda: engine.stats().active_slots == 1)
        yield engine, u, hold


def test_queue_full_gives_503_with_retry_after(tiny):
    with one_busy_row(tiny, max_queue=1) as (engine, u, hold):
        waiting = engine.submit(Request(prompt_ids=[2, 10], max_tokens=2))
        r = httpx.post(u + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "queue_full"
        hold.cancel()
        waiting.result(timeout=30)
        r = httpx.post(u + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
        assert r.status_code == 200


def test_clients_leaving_while_queued_are_dropped(tiny):
    with one_busy_row(tiny, max_queue=4) as (engine, u, hold):
        c = openai.OpenAI(base_url=u + "/v1", api_key="x", max_retries=0)
        stream = c.completions.create(model="tiny", prompt="hi", max_tokens=5, stream=True)
        assert wait_until(lambda: engine.stats().waiting == 1)
        stream.close()  # leaves before its first token
        assert wait_until(lambda: engine.stats().waiting == 0, 5)
        with pytest.raises(httpx.TimeoutException):  # a non-streamed one gives up
            httpx.post(u + "/v1/completions", json={"prompt": "hi", "max_tokens": 5}, timeout=0.5)
        assert wait_until(lambda: engine.stats().waiting == 0, 5)
        assert engine.stats().requests_cancelled == 2
        hold.cancel()


def test_api_key(engine, tiny):
    with ServerThread(create_app(engine, tiny[1], server_config(api_key="s3cret"))) as u:
        r = httpx.get(u + "/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert (
            httpx.get(u + "/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
        )
        assert httpx.get(u + "/health").status_code == 200
        c = openai.OpenAI(base_url=u + "/v1", api_key="s3cret", max_retries=0)
        assert c.completions.create(model="tiny", prompt="hi", max_tokens=2).usage


# ================================================================== invalid
LONG = "hello world " * MAX_PROMPT_TOKENS
INVALID = [
    ("completions", {"prompt": "x", "max_tokens": -1}, "max_tokens", "must be >= 0"),
    ("completions", {"prompt": "x", "max_tokens": 10**9}, "max_tokens", "limit of 512"),
    ("completions", {"prompt": "x", "max_tokens": "5"}, "max_tokens", "integer"),
    ("completions", {"prompt": "x", "max_tokens": 0}, "max_tokens", "only with echo"),
    ("completions", {}, "prompt", "required"),
    ("completions", {"prompt": 5}, "prompt", "must be a string"),
    ("completions", {"prompt": []}, "prompt", "must be a string"),
    ("completions", {"prompt": [2, 10**7]}, "prompt", "token ids must be in"),
    ("completions", {"prompt": LONG}, "prompt", "over this server's limit"),
    ("completions", {"prompt": "x", "temperature": -1}, "temperature", "must be in"),
    ("completions", {"prompt": "x", "temperature": "hot"}, "temperature", "number"),
    ("completions", {"prompt": "x", "top_p": 0}, "top_p", "must be in"),
    ("completions", {"prompt": "x", "top_k": 1.5}, "top_k", "integer"),
    ("completions", {"prompt": "x", "min_p": 2}, "min_p", "must be in"),
    ("completions", {"prompt": "x", "repetition_penalty": 0}, "repetition_penalty", "must be in"),
    ("completions", {"prompt": "x", "n": 0}, "n", "must be in"),
    ("completions", {"prompt": "x", "n": 100}, "n", "must be in"),
    ("completions", {"prompt": "x", "stop": [1]}, "stop", "strings"),
    ("completions", {"prompt": "x", "stop": ""}, "stop", "1 to 128 characters"),
    ("completions", {"prompt": "x", "stop": ["y" * 129]}, "stop", "1 to 128 characters"),
    ("completions", {"prompt": "a\ud800b"}, "prompt", "invalid Unicode"),
    ("completions", {"prompt": "x", "stop": "\udfff"}, "stop", "invalid Unicode"),
    ("completions", {"prompt": "x", "seed": 1.5}, "seed", "integer"),
    ("completions", {"prompt": "x", "logprobs": 99}, "logprobs", "must be in"),
    ("completions", {"prompt": "x", "stream": "yes"}, "stream", "boolean"),
    ("completions", {"prompt": "x", "echo": 1}, "echo", "boolean"),
    (
        "completions",
        {"prompt": "x", "stream_options": {"include_usage": True}},
        "stream_options",
        "only allowed with stream",
    ),
    (
        "completions",
        {"prompt": "x", "frequency_penalty": 0.5},
        "frequency_penalty",
        "not supported",
    ),
    ("completions", {"prompt": "x", "logit_bias": {"5": 1}}, "logit_bias", "not supported"),
    ("chat/completions", {"messages": []}, "messages", "non-empty list"),
    ("chat/completions", {"messages": "hi"}, "messages", "non-empty list"),
    ("chat/completions", {}, "messages", "required"),
    (
        "chat/completions",
        {"messages": [{"role": "wizard", "content": "x"}]},
        "messages",
        "unknown role 'wizard'",
    ),
    (
        "chat/completions",
        {"messages": [{"role": "user", "content": 5}]},
        "messages",
        "content must be",
    ),
    (
        "chat/completions",
        {"messages": [{"role": "user", "content": "\ud800"}]},
        "messages",
        "invalid Unicode",
    ),
    (
        "chat/completions",
        {"messages": [{"role": "assistant", "content": "x"}]},
        "messages",
        "alternate",
    ),
    (
        "chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
        "top_logprobs",
        "needs 'logprobs'",
    ),
    (
        "chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
        "max_tokens",
        "must be >= 1",
    ),
    (
        "chat/completions",
        {"messages": [{"role": "user", "content": LONG}]},
        "messages",
        "over this server's limit",
    ),
]


@pytest.mark.parametrize(
    "path,body,param,message",
    INVALID,
    ids=[f"{p}-{param}-{i}" for i, (p, _, param, _) in enumerate(INVALID)],
)
def test_invalid_requests_get_400_naming_the_field(url, path, body, param, message):
    r = httpx.post(
        f"{url}/v1/{path}",
        content=json.dumps(body),  # \u escapes kept
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and message in error["message"], error
    assert error["type"] == "invalid_request_error" and error["code"]


@pytest.mark.parametrize(
    "content,status,code",
    [
        (b"{not json", 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_json"),
        (b"\xff\xfe", 400, "invalid_json"),
        (b'{"prompt": "' + b"x" * MAX_BODY + b'"}', 413, "body_too_large"),
    ],
)
def test_bad_bodies(url, content, status, code):
    r = httpx.post(
        url + "/v1/completions",
        content=content,
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert r.status_code == status and r.json()["error"]["code"] == code


def test_unknown_routes_are_json_errors(url):
    r = httpx.get(url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    assert httpx.get(url + "/v1/completions").status_code == 405


def test_request_models_alone():
    """The pydantic request models without a server: null = absent, the server's limits
    from the validation context, engine requests built from them."""
    limits = RequestLimits(max_tokens=64, max_n=4, vocab_size=100)
    r = CompletionRequest.model_validate(
        {"prompt": [5, 6], "temperature": None, "stop": "x", "n": 2, "seed": 3}, context=limits
    )
    assert r.prompt == [[5, 6]] and r.max_tokens == 16 and r.stop == ["x"]
    assert r.to_sampling_params().temperature == 1.0
    [req] = r.to_engine_requests([[2, 5, 6]])
    assert (req.n, req.seed, req.max_tokens, req.stop_strings) == (2, 3, 16, ["x"])
    greedy = CompletionRequest.model_validate({"prompt": "x", "temperature": MIN_TEMPERATURE / 2})
    assert greedy.to_sampling_params().greedy
    chat = ChatCompletionRequest.model_validate(
        {
            "messages": [{"role": "developer", "content": "be brief"}],
            "max_tokens": 9,
            "max_completion_tokens": 7,
            "logprobs": True,
        },
        context=limits,
    )
    assert chat.messages[0].role == "system" and chat.max_tokens == 7
    assert chat.num_logprobs == 0 and chat.num_prompt_logprobs is None
    with pytest.raises(ValidationError) as e:
        CompletionRequest.model_validate({"prompt": "x", "n": 5}, context=limits)
    assert api_error_from_validation(e.value).body()["error"] == {
        "message": "'n' must be in [1, 4], got 5",
        "type": "invalid_request_error",
        "param": "n",
        "code": "invalid_value",
    }


def test_metrics_are_prometheus_exposition(url, client, engine):
    client.completions.create(model="tiny", prompt="hello", max_tokens=2)
    r = httpx.get(url + "/metrics")
    assert r.headers["content-type"] == prometheus_client.CONTENT_TYPE_LATEST
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    assert families["rgemma_requests"].type == "counter"
    assert families["rgemma_active_slots"].type == "gauge"
    assert {s.labels["outcome"] for s in families["rgemma_requests"].samples} == {
        "submitted",
        "finished",
        "cancelled",
        "failed",
        "rejected",
    }
    assert {
        s.labels["code"]
        for s in families["rgemma_http_responses"].samples
        if s.name.endswith("_total")
    } >= {"200"}
    [tokens] = families["rgemma_prompt_tokens"].samples
    assert tokens.value == engine.stats().prompt_tokens


def test_metrics_keep_every_digit():
    """Large counts are exact (a "{:g}" text gave 1.67122e+06 for 1671223)."""

    class Stats:
        def stats(self):
            return EngineStats(prompt_tokens=1_671_223, generated_tokens=2**40 + 1)

    text = ServerMetrics(Stats()).render().decode()
    values = {f.name: f.samples[0].value for f in text_string_to_metric_families(text) if f.samples}
    assert values["rgemma_prompt_tokens"] == 1_671_223
    assert values["rgemma_generation_tokens"] == 2**40 + 1


def test_internal_errors_are_json_and_counted(engine, tiny):
    """An unexpected exception is a 500 in OpenAI's shape, counted in /metrics."""

    class BrokenTokenizer:
        def __getattr__(self, name):
            return getattr(tiny[1], name)

        def encode(self, *args, **kwargs):
            raise RuntimeError("boom")

    with ServerThread(create_app(engine, BrokenTokenizer(), server_config())) as u:
        r = httpx.post(u + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert "boom" in r.json()["error"]["message"]
        assert metrics(u)['rgemma_http_responses_total{code="500"}'] == 1


# ===================================================================== load
def _invalid_bodies() -> list[tuple[str, bytes]]:
    out = [(f"/v1/{p}", json.dumps(body).encode()) for p, body, *_ in INVALID if body != {}]
    out += [("/v1/completions", b"{broken"), ("/v1/completions", b"x" * (MAX_BODY + 1))]
    return out


async def _one_client(http: httpx.AsyncClient, rng: random.Random, bodies, outcomes: list):
    """A streaming request that may leave early, or an invalid request."""
    if rng.random() < 0.15:
        path, content = rng.choice(bodies)
        r = await http.post(path, content=content, headers={"content-type": "application/json"})
        outcomes.append(("invalid", r.status_code, None))
        return
    body = {
        "prompt": rng.choice(PROMPTS),
        "max_tokens": rng.randint(2, 16),
        "stream": True,
        "temperature": rng.choice([0, 0.8]),
        "seed": rng.randint(0, 99),
    }
    if rng.random() < 0.5:
        body = {"messages": [{"role": "user", "content": body.pop("prompt")}], **body}
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    leave_after = rng.randint(1, 3) if rng.random() < 0.3 else None
    async with http.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            await r.aread()
            outcomes.append(("stream", r.status_code, None))
            return
        chunks = 0
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                chunks += 1
                if line == "data: [DONE]":
                    outcomes.append(("stream", 200, "done"))
                    return
                if leave_after is not None and chunks >= leave_after:
                    outcomes.append(("stream", 200, "left"))
                    return  # closing the stream = disconnecting
        outcomes.append(("stream", 200, "cut"))


async def _load(url: str, n: int, seed: int) -> list:
    rng = random.Random(seed)
    bodies = _invalid_bodies()
    outcomes: list = []
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as http:
        await asyncio.wait_for(
            asyncio.gather(
                *[
                    _one_client(http, random.Random(rng.random()), bodies, outcomes)
                    for _ in range(n)
                ]
            ),
            timeout=100,
        )
    return outcomes


def test_load_200_concurrent_streams_with_disconnects_and_junk(url):
    outcomes = asyncio.run(_load(url, 200, seed=0))
    statuses = [s for _, s, _ in outcomes]
    assert len(outcomes) == 200
    assert not [s for s in statuses if s >= 500 and s != 503], statuses
    assert all(400 <= s < 500 for kind, s, _ in outcomes if kind == "invalid")
    streams = [how for kind, s, how in outcomes if kind == "stream" and s == 200]
    assert streams.count("done") > 50 and "cut" not in streams
    assert wait_until(lambda: idle(url), 20), metrics(url)
    assert httpx.get(url + "/health").status_code == 200
    m = metrics(url)
    assert m['rgemma_requests_total{outcome="failed"}'] == 0


# ====================================================================== CLI
def test_cli_registers_serve_and_reports_load_errors(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="rgemma")
    register(parser.add_subparsers(dest="verb"))
    args = parser.parse_args(["serve", "--model", str(tmp_path / "missing"), "--port", "0"])
    assert args.host == "127.0.0.1" and args.max_batch == 8
    assert args.func(args) == 1
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(r"rgemma serve: error: model .* not found: .*", err) and "\n" not in err
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "config.json").write_text("{nope")
    args = parser.parse_args(["serve", "--model", str(tmp_path / "junk")])
    assert args.func(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("rgemma serve: error: cannot load model") and "\n" not in err
    args = parser.parse_args(["serve", "--model", str(tmp_path), "--max-batch", "0"])
    assert args.func(args) == 2


# ============================================================ lm-eval client
def test_tokenizer_endpoints(url, tiny):
    _, tok, _ = tiny
    info = httpx.get(url + "/tokenizer_info").json()
    assert info["bos_token"] == "<bos>" and info["eos_token"] == "<eos>"
    ids = httpx.post(url + "/tokenize", json={"prompt": "hello world"}).json()["tokens"]
    assert ids == tok.encode("hello world")
    plain = httpx.post(
        url + "/tokenize", json={"prompt": "hello world", "add_special_tokens": False}
    ).json()
    assert plain["tokens"] == ids[1:] and plain["count"] == len(ids) - 1
    assert httpx.post(url + "/detokenize", json={"tokens": ids}).json()["prompt"] == "hello world"
    r = httpx.post(url + "/detokenize", json={"tokens": [-1]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"


def test_lm_eval_local_completions_matches_direct_scoring(url, tiny):
    """lm-eval's own API client (remote tokenizer found via /tokenizer_info) against the
    server gives the log-likelihoods of rgemma.evaluate's in-process scorer."""
    pytest.importorskip("tenacity")  # lm-eval[api]
    completions = pytest.importorskip("lm_eval.models.openai_completions")
    from lm_eval.api.instance import Instance

    from rgemma.evaluation.harness import RgemmaLM

    model, tok, _ = tiny
    pairs = [
        ("<bos>the quick brown", " fox jumps"),
        ("<bos>hello", " world"),
        ("<bos>once upon a time", " there was a lazy dog"),
    ]
    requests = [
        Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i)
        for i, p in enumerate(pairs)
    ]
    lm = completions.LocalCompletionsAPI(
        base_url=url + "/v1/completions", model="tiny", max_retries=1
    )
    assert lm.tokenizer_backend == "remote"
    served = lm.loglikelihood(requests, disable_tqdm=True)
    direct = RgemmaLM(model=model, tokenizer=tok, progress=False).loglikelihood(
        requests, disable_tqdm=True
    )
    for (a, greedy_a), (b, greedy_b) in zip(served, direct):
        assert a == pytest.approx(b, abs=1e-3) and greedy_a == greedy_b


# ================================================================ demo model
def test_bundled_demo_model_is_the_default():
    demo = pytest.importorskip("rgemma.io.demo")
    try:
        path = demo.path()
    except FileNotFoundError:
        pytest.skip("this installation has no bundled demo model")
    from rgemma.cli.serve import _load

    parser = argparse.ArgumentParser(prog="rgemma")
    register(parser.add_subparsers(dest="verb"))
    model, tok, found = _load(parser.parse_args(["serve", "--threads", "0"]))
    assert found == path
    prompt = "def fibonacci(n):"
    with (
        Engine(model, tok, EngineConfig(max_batch=2)) as engine,
        ServerThread(create_app(engine, tok, server_config(model_name="demo"))) as u,
    ):
        c = openai.OpenAI(base_url=u + "/v1", api_key="x", max_retries=0)
        r = c.completions.create(model="demo", prompt=prompt, max_tokens=32, temperature=0)
    # the server's defaults are the model's generation_config.json; temperature 0 wins
    defaults = generation_defaults(tok.generation_config)
    [direct] = generate(model, tok, [prompt], max_new_tokens=32, **{**defaults, "temperature": 0})
    assert r.choices[0].text == direct.text


def test_fields_a_request_does_not_send_take_the_models_defaults():
    """The model's generation_config.json defaults (as ``generation_defaults`` reads them)
    fill the sampling fields a request leaves out; the fields it sends win."""
    from rgemma.inference.sampling import generation_defaults

    defaults = generation_defaults({"do_sample": False, "repetition_penalty": 1.3})
    plain = CompletionRequest.model_validate({"prompt": "x", "temperature": None})
    params = plain.to_sampling_params(defaults)
    assert params.greedy and params.repetition_penalty == 1.3
    assert plain.to_sampling_params().temperature == 1.0  # no model defaults: OpenAI's
    sent = CompletionRequest.model_validate({"prompt": "x", "temperature": 0.5, "top_p": 0.9})
    params = sent.to_sampling_params(defaults)
    assert (params.temperature, params.top_p, params.repetition_penalty) == (0.5, 0.9, 1.3)
    [req] = sent.to_engine_requests([[2, 5]], defaults)
    assert req.params == params
