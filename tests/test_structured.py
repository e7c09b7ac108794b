"""Structured output (JSON mode, JSON Schema) on the bundled demo model.

The demo model writes Python-ish junk, but under a grammar its text must still be JSON:
every output is checked by ``json.loads`` and by ``validate`` below, a small JSON Schema
validator written here for the keywords these schemas use (independent of the grammar
engine). Rows without a grammar are checked against runs that have no grammar at all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest
import torch

from helpers import server_config
from rgemma.cli import main
from rgemma.inference import structured
from rgemma.inference.engine import Engine, EngineConfig, Request, RequestError
from rgemma.inference.generate import generate
from rgemma.inference.sampling import Sampler, SamplingParams, TokenMask
from rgemma.inference.structured import (
    JSON_OBJECT,
    JSON_SCHEMA,
    StructuredOutputError,
    compile_grammar,
    json_object_spec,
    json_schema_spec,
    parse_response_format,
)
from rgemma.io import demo
from rgemma.serving.app import ServerThread, create_app

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Bounded strings, integers and arrays: the demo model, left to itself, can write a
# string or a number forever; these end within ~70 tokens.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "count": {"type": "integer", "minimum": 0, "maximum": 999},
        "kind": {"enum": ["file", "dir", "link"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        "owner": {
            "type": "object",
            "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 99}},
            "required": ["id"],
            "additionalProperties": False,
        },
        "ok": {"type": "boolean"},
    },
    "required": ["name", "count", "kind", "tags", "owner", "ok"],
    "additionalProperties": False,
}
PROMPTS = [
    "config = ",
    "def f(x):",
    "import json\n",
    "data = {",
    "# settings\n",
    "return ",
    "options = dict(",
    "x = ",
]
# Prompts after which a JSON object is plausible code
OBJECT_PROMPTS = ["config = ", "import json\n", "data = {", "options = dict("]
RESPONSE_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "item", "schema": SCHEMA, "strict": True},
}


# ============================================================ the oracle
def validate(value, schema: dict, path: str = "$") -> list[str]:
    """What is wrong with ``value`` under ``schema`` (type, enum, properties, required,
    additionalProperties, items, min/max, min/maxLength, min/maxItems): [] if valid."""
    kinds = {
        "object": dict,
        "array": list,
        "string": str,
        "boolean": bool,
        "null": type(None),
    }
    errors = []
    kind = schema.get("type")
    if kind == "integer":
        if not isinstance(value, int) or isinstance(value, bool):
            return [f"{path}: not an integer"]
    elif kind is not None and not isinstance(value, kinds[kind]):
        return [f"{path}: not {kind}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} not in the enum")
    if "minimum" in schema and value < schema["minimum"]:
        errors.append(f"{path}: below the minimum")
    if "maximum" in schema and value > schema["maximum"]:
        errors.append(f"{path}: above the maximum")
    if isinstance(value, str):
        if not schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", 1e9):
            errors.append(f"{path}: length {len(value)} out of bounds")
    if isinstance(value, list):
        if not schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", 1e9):
            errors.append(f"{path}: {len(value)} items out of bounds")
        for i, item in enumerate(value):
            errors += validate(item, schema.get("items", {}), f"{path}[{i}]")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        errors += [f"{path}: {k} missing" for k in schema.get("required", []) if k not in value]
        for k, v in value.items():
            if k in props:
                errors += validate(v, props[k], f"{path}.{k}")
            elif schema.get("additionalProperties") is False:
                errors.append(f"{path}: unexpected {k}")
    return errors


def check_json(text: str, schema: dict | None = None):
    """``text`` parsed; it must be an object, valid under ``schema`` when given."""
    value = json.loads(text)
    assert isinstance(value, dict), text
    if schema is not None:
        assert validate(value, schema) == [], (text, validate(value, schema))
    return value


def test_the_oracle_catches_violations():
    good = {"name": "a", "count": 1, "kind": "dir", "tags": [], "owner": {"id": 2}, "ok": True}
    assert validate(good, SCHEMA) == []
    for bad in (
        {**good, "count": -1},
        {**good, "count": True},
        {**good, "kind": "x"},
        {**good, "tags": ["123456789"]},
        {**good, "owner": {"id": 2, "x": 1}},
        {**good, "extra": 1},
        {k: v for k, v in good.items() if k != "ok"},
    ):
        assert validate(bad, SCHEMA), bad


# ============================================================ fixtures
@pytest.fixture(scope="module")
def demo_model():
    return demo.load()


@pytest.fixture(scope="module")
def grammar(demo_model):
    model, tok = demo_model
    return compile_grammar(json_schema_spec(SCHEMA), tok, model.config.vocab_size)


@pytest.fixture(scope="module")
def engine(demo_model):
    model, tok = demo_model
    with Engine(model, tok, EngineConfig(max_batch=8, max_queue=64, prefill_chunk=512)) as e:
        yield e


@pytest.fixture(scope="module")
def server(engine, demo_model):
    with ServerThread(create_app(engine, demo_model[1], server_config(model_name="demo"))) as u:
        yield u


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)


# ====================================================== response_format
def test_response_format_shapes():
    assert parse_response_format({"type": "text"}) is None
    assert parse_response_format({"type": "json_object"}).kind == JSON_OBJECT
    spec = parse_response_format(RESPONSE_FORMAT)
    assert (spec.kind, spec.name, spec.strict) == (JSON_SCHEMA, "item", True)
    assert json.loads(spec.schema) == SCHEMA
    # key order is kept: it is the order the properties are generated in
    assert list(json.loads(spec.schema)["properties"]) == list(SCHEMA["properties"])
    assert json_schema_spec(json.dumps(SCHEMA)) == json_schema_spec(SCHEMA)


def _schema_format(schema, **extra) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, **extra}}


@pytest.mark.parametrize(
    "value,message",
    [
        ("json", "must be an object, got a string"),
        ({}, "'type' is required"),
        ({"type": "xml"}, "unknown type 'xml'"),
        ({"type": "json_schema"}, "'json_schema' must be an object"),
        ({"type": "json_schema", "json_schema": {"schema": {}}}, "'json_schema.name'"),
        ({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}, "name"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "'json_schema.schema' is required"),
        (_schema_format({}, strict="yes"), "'json_schema.strict' must be a boolean"),
        (_schema_format([1]), "must be a JSON object, got an array"),
        (_schema_format({"type": "integr"}), "Invalid type: integr"),
        (_schema_format({"type": "integer", "minimum": 5, "maximum": 1}), "is greater than"),
        (_schema_format({"type": "string", "pattern": "(["}), "regex parse error"),
        (_schema_format({"$ref": "#/$defs/missing"}), "missing"),
        (_schema_format({"enum": []}), "Unsatisfiable schema"),
        (_schema_format({"anyOf": []}), "Unsatisfiable schema"),
        (_schema_format({"type": "integer", "minimum": 1.5, "maximum": 1.7}), "no integer"),
        # keywords the engine cannot enforce are refused, not ignored
        (_schema_format({"type": "array", "uniqueItems": True}), "Unimplemented keys"),
        (_schema_format({"x": "y" * structured.MAX_SCHEMA_CHARS}), "over the limit"),
    ],
)
def test_bad_response_formats_say_what_is_wrong(value, message):
    with pytest.raises(StructuredOutputError) as e:
        parse_response_format(value)
    assert message in str(e.value) and "\n" not in str(e.value)


class _LettersOnly:
    """A tokenizer that cannot spell "{" (ids 3-7 are the letters a-e)."""

    vocab_size, unk_id, bos_id = 8, 0, 1
    stop_ids = frozenset({2})
    special_ids = frozenset({0, 1, 2})

    def id_to_piece(self, i: int) -> str:
        return ["<unk>", "<bos>", "<eos>", "a", "b", "c", "d", "e"][i]

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        return [3 + "abcde".index(c) for c in text if c in "abcde"]


def test_unsatisfiable_grammar_is_refused_at_compile():
    """A grammar that leaves only the stop tokens (here: a vocabulary without "{"; the
    schemas the engine sees as unsatisfiable never get this far) is an error, not a
    generation that can only end at once with no JSON."""
    with pytest.raises(StructuredOutputError, match="admits no JSON text"):
        compile_grammar(json_object_spec(), _LettersOnly(), 8)


# ========================================================== vocabulary and matchers
def test_masks_follow_the_text_and_never_allow_special_tokens(demo_model, grammar):
    model, tok = demo_model
    V = model.config.vocab_size
    m = compile_grammar(json_object_spec(), tok, V).matcher()
    allowed = m.allowed()
    assert allowed.shape == (V,) and allowed.dtype == torch.bool
    ids = allowed.nonzero()[:, 0].tolist()
    forbidden = set(tok.special_ids) | {tok.unk_id} | set(range(tok.vocab_size, V))
    assert ids and not forbidden & set(ids)
    assert all(tok.decode([i]).startswith("{") for i in ids)  # compact JSON starts with {
    assert tok.piece_to_id("{") in ids
    # byte-fallback pieces are the bytes they stand for
    pieces = structured.token_bytes(tok, V)
    for byte in range(0x20, 0x7F):
        i = tok.piece_to_id(f"<0x{byte:02X}>")
        assert pieces[i] == bytes([byte]) == tok.decode([i]).encode()
    # a complete text: only the stop tokens may follow; one ends the grammar
    for t in tok.encode('{"a": [1, "b"]}', add_bos=False):
        assert not m.is_completed()
        m.accept(t)
    assert m.is_completed() and not m.is_terminated()
    assert set(m.allowed().nonzero()[:, 0].tolist()) == set(tok.stop_ids)
    m.accept(tok.eos_id)
    assert m.is_terminated()


def test_matcher_rejects_fork_and_apply(demo_model, grammar):
    model, tok = demo_model
    m = grammar.matcher()
    with pytest.raises(StructuredOutputError, match="does not fit"):
        m.accept(tok.piece_to_id("x"))  # JSON cannot start with x
    fresh = grammar.matcher()
    start = fresh.allowed()
    fork = fresh.fork()
    for t in tok.encode('{"name": "ab', add_bos=False):
        fresh.accept(t)
    assert torch.equal(fork.allowed(), start)  # the fork did not move
    assert not torch.equal(fresh.allowed(), start)
    logits = torch.randn(model.config.vocab_size)
    masked = fresh.apply(logits)
    keep = fresh.allowed()
    assert torch.equal(masked[keep], logits[keep]) and bool(torch.isinf(masked[~keep]).all())


def test_compiled_grammars_are_cached_and_bounded(demo_model, monkeypatch):
    model, tok = demo_model
    V = model.config.vocab_size
    vocab = structured.vocabulary(tok, V)
    assert structured.vocabulary(tok, V) is vocab  # built once per tokenizer
    a = compile_grammar(json_schema_spec(SCHEMA, name="a"), tok, V)
    assert compile_grammar(json_schema_spec(SCHEMA, name="b", strict=False), tok, V) is a
    monkeypatch.setattr(structured, "MAX_CACHED_GRAMMARS", 2)
    for n in range(3):
        compile_grammar(json_schema_spec({"type": "integer", "maximum": n}), tok, V)
    assert len(vocab) == 2


# ====================================================================== sampling
def test_mask_comes_before_top_k_and_keeps_raw_logprobs():
    """top_k=1 after the mask picks the best ALLOWED token (top-k first would keep only a
    forbidden one); the row without a mask is untouched; logprobs are the raw model's."""
    logits = torch.tensor([[5.0, 1.0, 0.0, 2.0, 4.0, 3.0], [5.0, 1.0, 0.0, 2.0, 4.0, 3.0]])
    allowed = torch.tensor([[False, True, False, True, False, False]])
    params = [SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=1.0, top_k=1)]
    sampler = Sampler(params, 6, seeds=[0, 1])
    tokens, lps = sampler.sample(logits, logprobs=True, mask=TokenMask([0], allowed))
    assert tokens.tolist() == [3, 0]
    raw = torch.log_softmax(logits, -1)
    assert torch.allclose(lps, torch.stack([raw[0, 3], raw[1, 0]]))
    greedy = Sampler([SamplingParams()], 6)
    assert greedy.sample(logits[1:], mask=TokenMask([0], allowed))[0].tolist() == [3]
    # top_p: the nucleus is taken over the allowed tokens (1 then 3: 3 alone has > 0.5)
    nucleus = Sampler([SamplingParams(temperature=1.0, top_p=0.5)], 6, seeds=[0])
    for seed in range(5):
        nucleus.generators[0].manual_seed(seed)
        assert nucleus.sample(logits[:1], mask=TokenMask([0], allowed))[0].tolist() == [3]


# ==================================================================== generate()
def test_generate_greedy_and_sampled_follow_the_schema(demo_model):
    model, tok = demo_model
    spec = json_schema_spec(SCHEMA)
    for kwargs in ({}, {"temperature": 0.9, "seed": 0}, {"temperature": 1.2, "top_p": 0.95}):
        out = generate(model, tok, PROMPTS, max_new_tokens=160, grammar=spec, **kwargs)
        for c in out:
            assert c.finish_reason == "stop" and c.stop in tok.stop_ids, c.text
            check_json(c.text, SCHEMA)
        assert len({c.text for c in out}) > 1 or not kwargs  # sampled rows differ


def test_generate_json_object(demo_model):
    model, tok = demo_model
    greedy = generate(model, tok, OBJECT_PROMPTS, max_new_tokens=200, grammar=json_object_spec())
    sampled = generate(
        model, tok, PROMPTS, max_new_tokens=200, grammar=json_object_spec(), temperature=0.8, seed=0
    )
    # JSON mode bounds no object or string: the demo may add keys until max_tokens (greedy
    # decoding loops); what ends is JSON
    for completions, prompts in ((greedy, OBJECT_PROMPTS), (sampled, PROMPTS)):
        stopped = [c for c in completions if c.finish_reason == "stop"]
        assert len(stopped) >= len(prompts) // 2
        for c in stopped:
            check_json(c.text)


def test_generate_rows_without_grammar_are_unaffected(demo_model, grammar):
    model, tok = demo_model
    kwargs = dict(max_new_tokens=160, temperature=0.8, seed=3)
    mixed = generate(model, tok, PROMPTS[:4], grammar=[grammar, None, grammar, None], **kwargs)
    plain = generate(model, tok, PROMPTS[:4], **kwargs)
    for b in (1, 3):  # seeds are per row (seed + b): same tokens with or without the others
        assert mixed[b].token_ids == plain[b].token_ids and mixed[b].text == plain[b].text
    for b in (0, 2):
        check_json(mixed[b].text, SCHEMA)


def test_generate_refuses_a_grammar_of_another_vocabulary(demo_model):
    from rgemma.inference.generate import GenerationError

    model, tok = demo_model
    other = compile_grammar(json_object_spec(), tok, model.config.vocab_size + 32)
    vocab = model.config.vocab_size
    with pytest.raises(GenerationError, match=f"compiled for the model's {vocab} token ids"):
        generate(model, tok, ["x"], max_new_tokens=2, grammar=other)


# ====================================================================== engine
def _submit_together(engine, requests):
    """Submits while holding the engine's lock, so one step admits them all (one batch)."""
    with engine._cond:
        return [engine.submit(r) for r in requests]


def test_engine_mixed_batch(engine, demo_model, grammar):
    """Rows with and without grammars in one batch: the plain rows give exactly the tokens
    of a run without any grammar row; the constrained ones give valid JSON, the same as
    when run alone."""
    _, tok = demo_model

    def requests(with_grammar: bool) -> list[Request]:
        out = []
        for i, prompt in enumerate(PROMPTS):
            constrained = i % 2 == 0
            if constrained and not with_grammar:
                continue
            out.append(
                Request(
                    prompt_ids=tok.encode(prompt),
                    max_tokens=160 if constrained else 32,
                    params=SamplingParams(temperature=0.0 if i % 4 < 2 else 0.9),
                    seed=i,
                    grammar=grammar if constrained else None,
                )
            )
        return out

    mixed = [h.result(timeout=120)[0][0] for h in _submit_together(engine, requests(True))]
    plain = [h.result(timeout=120)[0][0] for h in _submit_together(engine, requests(False))]
    assert [c.token_ids for c in mixed[1::2]] == [c.token_ids for c in plain]
    assert [c.text for c in mixed[1::2]] == [c.text for c in plain]
    for c in mixed[::2]:
        assert c.finish_reason == "stop"
        check_json(c.text, SCHEMA)
    alone = engine.submit(requests(True)[2]).result(timeout=120)[0][0]
    assert alone.token_ids == mixed[2].token_ids


def test_engine_n_choices_and_ignore_eos(engine, demo_model, grammar):
    """Each choice has its own matcher; a grammar ends its choice even with stop ids off."""
    _, tok = demo_model
    r = Request(
        prompt_ids=tok.encode("x = "),
        max_tokens=160,
        params=SamplingParams(temperature=1.0),
        seed=5,
        n=3,
        stop_ids=[],
        grammar=grammar,
    )
    choices, _ = engine.submit(r).result(timeout=120)
    assert len({c.text for c in choices}) > 1
    for c in choices:
        assert c.finish_reason == "stop" and c.stop in tok.stop_ids
        check_json(c.text, SCHEMA)


def test_engine_a_failing_grammar_fails_only_its_request(engine, demo_model, grammar):
    _, tok = demo_model

    class Failing(structured.Grammar):
        def matcher(self):
            m = super().matcher()
            accept, seen = m.accept, []

            def flaky(token):
                seen.append(token)
                if len(seen) == 4:
                    raise StructuredOutputError("injected")
                accept(token)

            m.accept = flaky
            return m

    failing = Failing(grammar.spec, grammar.vocab, grammar._compiled)
    ok = Request(prompt_ids=tok.encode("data = {"), max_tokens=24, stop_ids=[])
    bad = Request(prompt_ids=tok.encode("x = "), max_tokens=50, grammar=failing)
    h_ok, h_bad = _submit_together(engine, [ok, bad])
    with pytest.raises(Exception, match="structured output failed: injected"):
        h_bad.result(timeout=60)
    (c,), _ = h_ok.result(timeout=60)
    (want,), _ = engine.submit(ok).result(timeout=60)
    assert c.token_ids == want.token_ids and len(c.token_ids) == 24


def test_engine_checks_the_grammar(engine, demo_model):
    model, tok = demo_model
    other = compile_grammar(json_object_spec(), tok, model.config.vocab_size + 32)
    for g in (other, json_object_spec()):
        with pytest.raises(RequestError, match="compiled for this engine's vocabulary"):
            engine.submit(Request(prompt_ids=[2, 5], grammar=g))


# ====================================================================== server
def test_chat_json_schema(client):
    messages = [{"role": "user", "content": "an item, please"}]
    r = client.chat.completions.create(
        model="demo",
        messages=messages,
        response_format=RESPONSE_FORMAT,
        temperature=0,
        max_tokens=200,
    )
    content = r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    check_json(content, SCHEMA)
    stream = client.chat.completions.create(
        model="demo",
        messages=messages,
        response_format=RESPONSE_FORMAT,
        temperature=0,
        max_tokens=200,
        stream=True,
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == content
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_completions_json_schema_n_and_stream(client):
    body = {"response_format": RESPONSE_FORMAT}
    r = client.completions.create(
        model="demo",
        prompt=["config = ", "x = "],
        n=2,
        max_tokens=200,
        temperature=0.9,
        seed=11,
        extra_body=body,
    )
    assert len(r.choices) == 4
    for c in r.choices:
        assert c.finish_reason == "stop"
        check_json(c.text, SCHEMA)
    texts: dict[int, str] = {}
    for chunk in client.completions.create(
        model="demo",
        prompt="return ",
        max_tokens=200,
        temperature=0.9,
        seed=2,
        n=2,
        stream=True,
        extra_body=body,
    ):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert sorted(texts) == [0, 1]
    for text in texts.values():
        check_json(text, SCHEMA)


def test_completions_json_object_and_text(client):
    stopped = 0
    for prompt in OBJECT_PROMPTS:
        r = client.completions.create(
            model="demo",
            prompt=prompt,
            max_tokens=200,
            temperature=0,
            extra_body={"response_format": {"type": "json_object"}},
        )
        if r.choices[0].finish_reason == "stop":  # else: an object the demo kept adding to
            stopped += 1
            check_json(r.choices[0].text)
    assert stopped >= len(OBJECT_PROMPTS) // 2
    plain = client.completions.create(model="demo", prompt="x = ", max_tokens=12, temperature=0)
    text = client.completions.create(
        model="demo",
        prompt="x = ",
        max_tokens=12,
        temperature=0,
        extra_body={"response_format": {"type": "text"}},
    )
    assert text.choices[0].text == plain.choices[0].text


@pytest.mark.parametrize("path", ["completions", "chat/completions"])
@pytest.mark.parametrize(
    "response_format,message",
    [
        (_schema_format({"type": "objec"}), "Invalid type: objec"),
        ({"type": "yaml"}, "unknown type 'yaml'"),
        ([RESPONSE_FORMAT], "must be an object"),
        ({"type": "json_schema", "json_schema": {"schema": SCHEMA}}, "'json_schema.name'"),
    ],
)
def test_bad_response_format_is_a_400(server, path, response_format, message):
    body = {"max_tokens": 5, "response_format": response_format}
    body.update(
        {"prompt": "x"}
        if path == "completions"
        else {"messages": [{"role": "user", "content": "x"}]}
    )
    r = httpx.post(f"{server}/v1/{path}", json=body, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "response_format" and message in error["message"], error


# ========================================================================= CLI
def test_cli_json_schema(tmp_path, capsys):
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(SCHEMA))
    argv = ["generate", "config = ", "--json-schema", str(path), "--max-tokens", "200"]
    assert main([*argv, "--threads", "1"]) == 0
    check_json(capsys.readouterr().out, SCHEMA)
    # free-form JSON may run on inside a string past any token budget: sampling is
    # seeded so the run is the same each time (the schema above bounds every string)
    argv = ["generate", "data = {", "--json", "--seed", "0", "--max-tokens", "200"]
    assert main([*argv, "--threads", "1"]) == 0
    check_json(capsys.readouterr().out)


@pytest.mark.parametrize(
    "content,message",
    [
        (None, "no such file"),
        ("{not json", "the schema is not valid JSON"),
        ("[1, 2]", "the schema must be a JSON object, got an array"),
        ('{"type": "strin"}', "invalid JSON schema: Invalid type: strin"),
        (b"\xff\xfe{}", "not UTF-8 text"),
        ("dir", "cannot read it"),
    ],
)
def test_cli_bad_schema_file(tmp_path, capsys, content, message):
    path = tmp_path / "schema.json"
    if content == "dir":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    assert main(["generate", "x", "--json-schema", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith(f"rgemma generate: error: --json-schema {path}: ") and message in err


def test_cli_json_flags_exclude_each_other(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "x", "--json", "--json-schema", str(tmp_path / "s.json")])
    assert e.value.code == 2 and "not allowed with" in capsys.readouterr().err


# ======================================================================= bench
def test_bench_smoke(tmp_path):
    out = tmp_path / "structured"
    argv = [sys.executable, os.path.join(ROOT, "bench", "structured.py"), "--smoke"]
    proc = subprocess.run(
        [*argv, "--threads", "1", "--out", str(out)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "schema/plain" in proc.stdout
    data = json.loads((tmp_path / "structured.json").read_text())
    assert {r["system"] for r in data["results"]} == {"schema", "plain"}
    assert all(r["median"] > 0 for r in data["results"])


def test_cli_json_cut_by_max_tokens_says_so(capsys):
    """--json output that reaches --max-tokens before the object closes is not valid
    JSON: the CLI prints what it has and says why on stderr (as the server's
    finish_reason "length" does); a complete object gets no warning."""
    argv = ["generate", "data = {", "--json", "--seed", "0", "--threads", "1"]
    assert main([*argv, "--max-tokens", "3"]) == 0
    out, err = capsys.readouterr()
    with pytest.raises(json.JSONDecodeError):
        json.loads(out)
    assert "warning: the output reached --max-tokens 3 before the JSON was complete" in err
    assert main([*argv, "--max-tokens", "200"]) == 0
    out, err = capsys.readouterr()
    check_json(out)
    assert "warning" not in err
