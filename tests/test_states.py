"""State handles (/v1/states), their tokenization of chunked text, and the disk tier.

Oracles: the same completion with the whole text as the prompt (a state built
from chunks must continue exactly like it), the tokenizer on the whole text,
and the engine run on hand-assembled token ids.
"""

from __future__ import annotations

import glob
import json
import os
import random

import httpx
import pytest
import torch

from helpers import wait_until
from rgemma.inference.engine import Engine, EngineConfig, Request
from rgemma.inference.state_store import (
    HOLD_CHARS,
    StateNotFound,
    StateStore,
    split_stable_text,
)
from rgemma.io import checkpoint, demo
from rgemma.io.disk_tier import DiskTier
from rgemma.io.snapshot import SnapshotError
from rgemma.serving.app import ServerThread, create_app

pytestmark = pytest.mark.usefixtures("one_thread")


def _source_text(chars: int = 6000) -> str:
    """Python source the demo never trained on verbatim is not needed: any real code."""
    paths = sorted(glob.glob(os.path.join(os.path.dirname(httpx.__file__), "*.py")))
    text = "".join(open(p, encoding="utf-8").read() for p in paths[:6])
    return text[:chars]


@pytest.fixture(scope="module")
def demo_model():
    model, tok = checkpoint.load(demo.path(), progress=False)
    return model.eval(), tok


@pytest.fixture(scope="module")
def live(demo_model):
    model, tok = demo_model
    with Engine(model, tok, EngineConfig(max_batch=4)) as engine:
        with ServerThread(create_app(engine, tok)) as url:
            with httpx.Client(base_url=url, timeout=120) as client:
                yield client, engine


# Greedy without the demo's default repetition penalty: a penalty counts the tokens a
# request sees, and a state holds its text only as state, so from a handle it sees fewer.
NO_PENALTY = {"temperature": 0, "repetition_penalty": 1.0}


def _greedy(client, **body) -> dict:
    r = client.post("/v1/completions", json={"max_tokens": 24, "logprobs": 0, **NO_PENALTY, **body})
    assert r.status_code == 200, r.text
    return r.json()


def _tokens(response: dict) -> list[str]:
    return response["choices"][0]["logprobs"]["tokens"]


# ------------------------------------------------------------ tokenization
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chunked_text_tokenizes_like_the_whole(demo_model, seed):
    tok = demo_model[1]
    text = _source_text(5000)
    rng = random.Random(seed)
    ids, pending, i = [], "", 0
    while i < len(text):
        step = rng.randint(1, 700)
        new, pending = split_stable_text(tok, pending + text[i : i + step])
        ids += new
        i += step
        assert len(pending) < 4 * HOLD_CHARS + 700  # bounded, whatever the text's length
    assert len(ids) > len(tok.encode(text, add_bos=False)) // 2  # most was read on the way
    ids += split_stable_text(tok, pending, final=True)[0]
    assert ids == tok.encode(text, add_bos=False)


# ------------------------------------------------------------- the server
@pytest.mark.parametrize("as_ids", [False, True])
def test_state_from_chunks_continues_like_the_whole_prompt(live, demo_model, as_ids):
    client, _ = live
    tok = demo_model[1]
    doc = _source_text()
    handle = client.post("/v1/states", json={"metadata": {"name": "doc"}}).json()
    assert handle["tokens"] == 0 and handle["metadata"] == {"name": "doc"}
    if as_ids:
        ids = tok.encode(doc, add_bos=False)
        chunks = [ids[i : i + 97] for i in range(0, len(ids), 97)]
    else:
        chunks = [doc[i : i + 397] for i in range(0, len(doc), 397)]
    for chunk in chunks:
        r = client.post(f"/v1/states/{handle['id']}/append", json={"prompt": chunk})
        assert r.status_code == 200, r.text
    whole = _greedy(client, prompt=doc)
    from_state = _greedy(client, prompt="", state=handle["id"])
    assert _tokens(from_state) == _tokens(whole)
    # the prompt's tokens were not read again
    assert from_state["usage"]["prompt_tokens"] < 300 < whole["usage"]["prompt_tokens"]
    # a question after the document: the same as asking it after the whole text
    more = "\n\ndef main():\n"
    assert _tokens(_greedy(client, prompt=more, state=handle["id"])) == _tokens(
        _greedy(client, prompt=doc + more)
    )
    # the handle did not change by being completed from
    assert client.get(f"/v1/states/{handle['id']}").json()["tokens"] == r.json()["tokens"]


def test_create_and_fork_take_no_body(live):
    """As the README's curl examples send them; append still needs its prompt."""
    client, _ = live
    made = client.post("/v1/states")
    assert made.status_code == 200 and made.json()["tokens"] == 0
    forked = client.post(f"/v1/states/{made.json()['id']}/fork")
    assert forked.status_code == 200 and forked.json()["id"] != made.json()["id"]
    r = client.post(f"/v1/states/{made.json()['id']}/append")
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


def test_fork_is_independent(live):
    client, _ = live
    a = client.post("/v1/states", json={"prompt": "import os\nimport sys\n"}).json()
    b = client.post(f"/v1/states/{a['id']}/fork", json={"metadata": {"b": 1}}).json()
    assert b["id"] != a["id"] and b["tokens"] == a["tokens"] and b["metadata"] == {"b": 1}
    before = _tokens(_greedy(client, prompt="", state=a["id"]))
    client.post(f"/v1/states/{b['id']}/append", json={"prompt": "class Foo:\n    def"})
    assert client.get(f"/v1/states/{a['id']}").json()["tokens"] == a["tokens"]
    assert _tokens(_greedy(client, prompt="", state=a["id"])) == before
    assert _tokens(_greedy(client, prompt="", state=b["id"])) == _tokens(
        _greedy(client, prompt="import os\nimport sys\nclass Foo:\n    def")
    )


def _chat_body(message: str, **extra) -> dict:
    return {
        "messages": [{"role": "user", "content": message}],
        "max_tokens": 12,
        **NO_PENALTY,
        **extra,
    }


def test_chat_save_state_then_continue_equals_the_token_ids(live, demo_model):
    client, engine = live
    tok = demo_model[1]
    first = client.post(
        "/v1/chat/completions",
        json=_chat_body("Write a loop", save_state=True, metadata={"turn": 1}),
    ).json()
    saved = first["state"]
    assert saved["metadata"] == {"turn": 1}
    body = _chat_body("and print it", state=saved["id"])
    second = client.post("/v1/chat/completions", json=body).json()
    # the oracle: the engine on the ids of turn 1, its answer and the next turn
    rendered = tok.render_chat([{"role": "user", "content": "Write a loop"}], True)
    prompt1 = tok.encode(rendered, add_bos=False)  # as the server encodes a chat
    choices, _ = engine.submit(Request(prompt1, max_tokens=12)).result()
    answer = choices[0].token_ids
    assert tok.decode(answer).startswith(first["choices"][0]["message"]["content"])
    ids = prompt1 + answer[:-1] + tok.next_turn_ids(answer[-1:], "and print it")
    expected, _ = engine.submit(Request(ids, max_tokens=12)).result()
    assert second["choices"][0]["message"]["content"] == expected[0].text
    # streamed: the state object comes with the finish_reason
    body = {**body, "stream": True, "save_state": True}
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    finals = [c for c in chunks if "state" in c]
    assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"]
    assert finals[0]["state"]["tokens"] > saved["tokens"]


def test_file_round_trip_and_delete(live):
    client, _ = live
    a = client.post(
        "/v1/states", json={"prompt": "def add(a, b):\n", "metadata": {"messages": ["x"]}}
    ).json()
    data = client.get(f"/v1/states/{a['id']}/file").content
    b = client.post(
        "/v1/states/file", content=data, headers={"content-type": "application/octet-stream"}
    ).json()
    assert b["id"] != a["id"] and b["tokens"] == a["tokens"] and b["metadata"] == a["metadata"]
    assert _tokens(_greedy(client, prompt="", state=b["id"])) == _tokens(
        _greedy(client, prompt="", state=a["id"])
    )
    assert client.delete(f"/v1/states/{b['id']}").json()["deleted"] is True
    assert client.get(f"/v1/states/{b['id']}").status_code == 404
    ids = [s["id"] for s in client.get("/v1/states").json()["data"]]
    assert a["id"] in ids and b["id"] not in ids


@pytest.mark.parametrize(
    "path, body, status, param",
    [
        ("/v1/states/state-0123/append", {"prompt": "x"}, 404, "state"),
        ("/v1/states", {"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, 400, None),
        ("/v1/states", {"prompt": [10**9]}, 400, "prompt"),
        ("/v1/states", {"metadata": {"x": "y" * 70000}}, 400, "metadata"),
        ("/v1/completions", {"prompt": "x", "state": "state-0123"}, 404, "state"),
        ("/v1/completions", {"prompt": "x", "state": "../etc/passwd"}, 400, "state"),
        ("/v1/completions", {"prompt": "x", "n": 2, "save_state": True}, 400, "save_state"),
        ("/v1/completions", {"prompt": "x", "metadata": {}}, 400, "metadata"),
    ],
)
def test_bad_state_requests(live, path, body, status, param):
    client, _ = live
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"]
    if param:
        assert error["param"] == param or param in error["message"]


def test_uploads_that_are_not_state_files_get_400(live, tmp_path):
    client, _ = live
    for content in (b"not a state file", b"\x00" * 100):
        r = client.post("/v1/states/file", content=content)
        assert r.status_code == 400 and "state file" in r.json()["error"]["message"]
    assert client.post("/v1/states/file", content=b"").status_code == 400


def test_chat_after_an_answer_takes_only_the_next_user_message(live):
    client, _ = live
    saved = client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "save_state": True},
    ).json()["state"]
    r = client.post(
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
            "state": saved["id"],
        },
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


# --------------------------------------------------------- the disk tier
def test_disk_tier_evicts_least_recently_used_and_survives_a_restart(demo_model, tmp_path):
    model = demo_model[0]
    states = []
    for n in range(3):
        s = model.init_state(1)
        s.num_tokens += n + 1
        states.append(s)
    probe = DiskTier(tmp_path / "probe", 2**30, model.config)
    probe.put("x", states[0], {"k": "a"})
    size = probe.bytes
    tier = DiskTier(tmp_path / "t", int(2.5 * size), model.config)
    tier.put("a", states[0], {"k": "a"})
    tier.put("b", states[1])
    assert tier.get("a", model)[1]["k"] == "a"  # a is now the most recently used
    assert tier.put("c", states[2]) == ["b"]
    again = DiskTier(tmp_path / "t", int(2.5 * size), model.config)  # a restart
    assert again.names() == ["a", "c"]
    state, _ = again.get("c", model)
    assert int(state.num_tokens[0]) == 3
    # a damaged file is refused with a reason and dropped
    path = again.path("a")
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - 64)
        f.write(b"\xff" * 64)
    with pytest.raises(SnapshotError, match="state a"):
        again.get("a", model)
    assert "a" not in again and not os.path.exists(path)


def test_handles_and_prefix_cache_survive_a_restart(demo_model, tmp_path):
    model, tok = demo_model
    doc = _source_text(3000)

    def serve():
        disk = DiskTier(tmp_path, 2**30, model.config)
        one_entry = int(1.5 * model.init_state(1, device="meta").nbytes)
        config = EngineConfig(max_batch=2, prefix_cache_bytes=one_entry, prefix_min_tokens=4)
        engine = Engine(model, tok, config, disk=disk).start()
        return engine, StateStore(model, 2**30, disk)

    engine, store = serve()
    with (
        ServerThread(create_app(engine, tok, states=store)) as url,
        httpx.Client(base_url=url, timeout=120) as client,
    ):
        handle = client.post("/v1/states", json={"prompt": doc}).json()
        answer = _tokens(_greedy(client, prompt="", state=handle["id"]))
        prompts = [doc[:1500], doc[:1200]]  # two cache entries: the first spills to disk
        first = [_tokens(_greedy(client, prompt=p)) for p in prompts]
    engine.stop()
    assert wait_until(lambda: not engine.alive)

    engine, store = serve()  # a new server process would see the same directory
    with (
        ServerThread(create_app(engine, tok, states=store)) as url,
        httpx.Client(base_url=url, timeout=120) as client,
    ):
        assert client.get(f"/v1/states/{handle['id']}").json()["tokens"] == handle["tokens"]
        assert _tokens(_greedy(client, prompt="", state=handle["id"])) == answer
        again = [_greedy(client, prompt=p) for p in prompts]
        assert [_tokens(r) for r in again] == first
        cached = [
            r["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0) for r in again
        ]
        assert all(c > 0 for c in cached)  # read back from the disk tier, not prefilled
    engine.stop()


def test_store_without_disk_forgets_past_its_memory(demo_model):
    model = demo_model[0]
    store = StateStore(model, memory_bytes=2 * model.init_state(1, device="meta").nbytes)
    made = [store.create() for _ in range(3)]
    with pytest.raises(StateNotFound):
        store.get(made[0].id)
    assert store.get(made[2].id) is made[2]
    assert torch.equal(store.get(made[1].id).state.num_tokens, torch.zeros(1, dtype=torch.long))
