"""Tests for rgemma.tokenizer on small SentencePiece models trained on the fly.

The models copy Gemma's layout: <pad> 0, <eos> 1, <bos> 2, <unk> 3, placeholder
user-defined symbols, <start_of_turn> 106, <end_of_turn> 107, byte fallback,
no dummy prefix.  ``transformers`` is the oracle for the chat template and the
source of a ``tokenizer.json`` converted from the SentencePiece model.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import sys

import pytest

from helpers import sentencepiece_model
from rgemma.io.tokenizer import (
    ChatTemplateError,
    IncrementalDecoder,
    Tokenizer,
    TokenizerError,
    render_chat,
)

# The well-known chat template of Gemma (1) instruction-tuned checkpoints.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

GEMMA_PLACEHOLDERS = [f"<unused{i}>" for i in range(102)]  # ids 4..105
TURN_MARKERS = ["<start_of_turn>", "<end_of_turn>"]  # ids 106, 107

ASCII = "The quick brown fox jumps over the lazy dog 12345."
CJK = "你好世界，模型语言。日本語のテキスト"
EMOJI = "fire 🔥 rocket 🚀 party 🎉"
UNSEEN = "Привет ऄ € 𝔘 ∮ ĳ"  # characters absent from the training text: byte fallback
WHITESPACE = "  two  spaces\tand\nnew lines \n"
TEXTS = [ASCII, CJK, EMOJI, UNSEEN, WHITESPACE, "", "a" + UNSEEN + CJK + EMOJI + "z"]


# ---------------------------------------------------------------------------
# Helpers and fixtures
# ---------------------------------------------------------------------------


def training_lines(n: int = 400) -> list[str]:
    """Deterministic English-ish sentences with some CJK, emoji and digits."""
    rng = random.Random(0)
    words = (
        "the quick brown fox jumps over lazy dog model user hello world token stream "
        "decode encode recurrent gemma griffin spaces and new lines fire rocket party"
    ).split()
    cjk, emoji = "你好世界中文字符测试模型语言日本語のテキスト", "😀🚀🎉👍🔥"
    lines = []
    for i in range(n):
        line = [rng.choice(words) for _ in range(rng.randint(3, 12))]
        if i % 4 == 0:
            line.append("".join(rng.sample(cjk, 4)))
        if i % 7 == 0:
            line.append(rng.choice(emoji))
        if i % 5 == 0:
            line.append(str(rng.randint(0, 99999)))
        lines.append(" ".join(line))
    return lines


def train_model(
    path, user_symbols, *, pad=0, eos=1, bos=2, unk=3, vocab_size=1000, dummy_prefix=False
):
    """Train a Gemma-style BPE SentencePiece model and write it to ``path``."""
    return sentencepiece_model(
        path,
        training_lines(),
        vocab_size=vocab_size,
        user_symbols=user_symbols,
        pad=pad,
        eos=eos,
        bos=bos,
        unk=unk,
        dummy_prefix=dummy_prefix,
        allow_whitespace_only_pieces=True,
        split_digits=True,
    )


def stream(tokenizer: Tokenizer, ids, skip_special: bool = True) -> list[str]:
    """Chunks of an IncrementalDecoder fed ``ids`` one by one, then flushed."""
    decoder = tokenizer.stream_decoder(skip_special=skip_special)
    return [decoder.feed(i) for i in ids] + [decoder.flush()]


def byte_piece_id(tokenizer: Tokenizer, value: int) -> int:
    return tokenizer.piece_to_id(f"<0x{value:02X}>")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A directory holding only a Gemma-layout tokenizer.model."""
    directory = tmp_path_factory.mktemp("gemma_sp")
    train_model(directory / "tokenizer.model", GEMMA_PLACEHOLDERS + TURN_MARKERS)
    return directory


@pytest.fixture(scope="module")
def tok(model_dir):
    return Tokenizer.from_dir(model_dir)


@pytest.fixture(scope="module")
def hf_tokenizer(model_dir):
    """transformers' Gemma tokenizer converted from the same SentencePiece model."""
    transformers = pytest.importorskip("transformers")
    return transformers.GemmaTokenizer.from_pretrained(str(model_dir))


@pytest.fixture(scope="module")
def json_dir(hf_tokenizer, tmp_path_factory):
    """A directory holding only tokenizer.json (converted by transformers)."""
    directory = tmp_path_factory.mktemp("gemma_json")
    hf_tokenizer.backend_tokenizer.save(str(directory / "tokenizer.json"))
    return directory


def copy_model(model_dir, tmp_path):
    """A fresh directory with the trained tokenizer.model, for adding config files."""
    shutil.copy(model_dir / "tokenizer.model", tmp_path / "tokenizer.model")
    return tmp_path


# ---------------------------------------------------------------------------
# Vocabulary and special ids
# ---------------------------------------------------------------------------


def test_trained_model_has_gemma_layout(tok):
    pieces = {i: tok.id_to_piece(i) for i in (0, 1, 2, 3, 4, 105, 106, 107)}
    assert pieces == {
        0: "<pad>",
        1: "<eos>",
        2: "<bos>",
        3: "<unk>",
        4: "<unused0>",
        105: "<unused101>",
        106: "<start_of_turn>",
        107: "<end_of_turn>",
    }
    assert tok.vocab_size == 1000
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 1, 2, 3)
    assert (tok.start_of_turn_id, tok.end_of_turn_id) == (106, 107)
    assert tok.stop_ids == {1, 107}


def test_special_ids_are_read_from_the_model(tmp_path):
    markers = ["<end_of_turn>", "<start_of_turn>"]
    train_model(tmp_path / "tokenizer.model", markers, pad=0, bos=1, eos=2, vocab_size=600)
    tok = Tokenizer.from_dir(tmp_path)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert (tok.end_of_turn_id, tok.start_of_turn_id) == (4, 5)
    assert tok.stop_ids == {2, 4}
    ids = tok.encode("<start_of_turn>hi<end_of_turn>", add_bos=False)
    assert (ids[0], ids[-1]) == (5, 4)
    assert tok.encode("hi")[0] == 1


def test_missing_turn_markers_fall_back_and_do_not_stop(tmp_path):
    train_model(tmp_path / "tokenizer.model", [], vocab_size=600)
    tok = Tokenizer.from_file(tmp_path / "tokenizer.model")
    assert (tok.start_of_turn_id, tok.end_of_turn_id) == (106, 107)
    assert tok.stop_ids == {tok.eos_id}


def test_config_files_override_special_tokens(model_dir, tmp_path):
    directory = copy_model(model_dir, tmp_path)
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": {"content": "<end_of_turn>"}})
    )
    (directory / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [1, 7], "bos_token_id": 2})
    )
    tok = Tokenizer.from_dir(directory)
    assert tok.eos_id == 107
    assert tok.bos_id == 2
    assert tok.stop_ids == {1, 7, 107}


# ---------------------------------------------------------------------------
# Encode / decode
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text, add_bos=False)) == text


def test_unseen_characters_use_byte_fallback(tok):
    ids = tok.encode("ऄ𝔘", add_bos=False)
    assert len(ids) == 3 + 4
    assert all(re.fullmatch(r"<0x[0-9A-F]{2}>", tok.id_to_piece(i)) for i in ids)
    assert tok.decode(ids) == "ऄ𝔘"


def test_literal_control_tokens_encode_to_single_ids(tok):
    ids = tok.encode("<bos><start_of_turn>user\nhi<end_of_turn>\n<eos>", add_bos=False)
    assert ids[:2] == [tok.bos_id, tok.start_of_turn_id]
    assert ids[-3:] == [tok.end_of_turn_id, tok.encode("\n", add_bos=False)[0], tok.eos_id]


def test_decode_skips_or_writes_special_tokens(tok):
    ids = [
        tok.bos_id,
        *tok.encode("hi 你好", add_bos=False),
        tok.end_of_turn_id,
        tok.eos_id,
        tok.pad_id,
    ]
    assert tok.decode(ids) == "hi 你好"
    assert tok.decode(ids, skip_special=False) == "<bos>hi 你好<end_of_turn><eos><pad>"


def test_invalid_byte_sequences_do_not_crash(tok):
    lone_continuation = [byte_piece_id(tok, 0x80)]
    truncated = [byte_piece_id(tok, 0xE2), byte_piece_id(tok, 0x82)]
    assert "\ufffd" in tok.decode(lone_continuation)
    assert "\ufffd" in tok.decode(truncated)
    ids = lone_continuation + tok.encode("ok", add_bos=False) + truncated
    text = tok.decode(ids)
    assert "ok" in text
    assert "".join(stream(tok, ids)) == text


def test_decode_rejects_out_of_range_ids(tok):
    with pytest.raises(TokenizerError, match="out of range"):
        tok.decode([5, tok.vocab_size])
    with pytest.raises(TokenizerError, match="out of range"):
        tok.decode([-1])


# ---------------------------------------------------------------------------
# Incremental decoding
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_decode_matches_full_decode(tok, text):
    ids = tok.encode(text)
    chunks = stream(tok, ids)
    assert "".join(chunks) == tok.decode(ids) == text
    for chunk in chunks:
        assert "\ufffd" not in chunk
        chunk.encode("utf-8")  # whole characters only: no lone surrogates


@pytest.mark.parametrize("skip_special", [True, False])
def test_incremental_decode_with_special_tokens(tok, skip_special):
    messages = [{"role": "user", "content": CJK}, {"role": "assistant", "content": UNSEEN + EMOJI}]
    ids = tok.encode_chat(messages) + [tok.eos_id]
    assert "".join(stream(tok, ids, skip_special)) == tok.decode(ids, skip_special)


def test_incremental_decoder_buffers_partial_characters(tok):
    decoder = IncrementalDecoder(tok)
    euro = [byte_piece_id(tok, b) for b in "€".encode()]
    assert [decoder.feed(i) for i in euro] == ["", "", "€"]
    assert decoder.feed(tok.encode("!", add_bos=False)[0]) == "!"
    assert decoder.feed(euro[0]) == ""
    assert decoder.flush() == "\ufffd"  # an unfinished character at the end
    assert decoder.flush() == ""


def test_incremental_decoder_emits_leading_spaces(tok):
    ids = tok.encode("hello world  again", add_bos=False)
    chunks = stream(tok, ids)
    assert "".join(chunks) == "hello world  again"
    assert any(chunk.startswith(" ") for chunk in chunks)


def test_incremental_decoder_with_dummy_prefix_model(tmp_path):
    """Models that strip the leading "▁" of a decode still stream the inner spaces."""
    train_model(tmp_path / "tokenizer.model", TURN_MARKERS, vocab_size=600, dummy_prefix=True)
    tok = Tokenizer.from_dir(tmp_path)
    text = "hello world  again 你好 €"
    ids = tok.encode(text)
    assert tok.id_to_piece(ids[1]).startswith("\u2581")
    assert tok.decode(ids) == text
    assert "".join(stream(tok, ids)) == text


def test_incremental_decoder_passes_literal_replacement_characters(tok):
    text = "bad \ufffd byte \ufffd"
    ids = tok.encode(text)
    assert "".join(stream(tok, ids)) == tok.decode(ids) == text


# ---------------------------------------------------------------------------
# Errors on files
# ---------------------------------------------------------------------------


def test_missing_files(tmp_path):
    with pytest.raises(TokenizerError, match="not a directory"):
        Tokenizer.from_dir(tmp_path / "nope")
    with pytest.raises(TokenizerError, match="tokenizer.model or tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(TokenizerError, match="no such file"):
        Tokenizer.from_file(tmp_path / "tokenizer.model")


@pytest.mark.parametrize("content", [b"", b"definitely not a protobuf \x00\xff" * 8])
def test_corrupt_sentencepiece_model(tmp_path, content):
    (tmp_path / "tokenizer.model").write_bytes(content)
    with pytest.raises(TokenizerError, match="tokenizer.model"):
        Tokenizer.from_dir(tmp_path)


def test_corrupt_json_files(model_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_file(tmp_path / "tokenizer.json")
    directory = copy_model(model_dir, tmp_path)
    (directory / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(TokenizerError, match="tokenizer_config.json: invalid JSON"):
        Tokenizer.from_dir(directory)


def test_missing_tokenizers_package_is_explained(json_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` fail
    with pytest.raises(TokenizerError, match="pip install tokenizers"):
        Tokenizer.from_dir(json_dir)


# ---------------------------------------------------------------------------
# tokenizer.json backend
# ---------------------------------------------------------------------------


def test_tokenizer_json_matches_sentencepiece(tok, json_dir):
    json_tok = Tokenizer.from_dir(json_dir)
    assert (json_tok.bos_id, json_tok.eos_id, json_tok.pad_id) == (2, 1, 0)
    assert (json_tok.start_of_turn_id, json_tok.end_of_turn_id) == (106, 107)
    assert json_tok.stop_ids == tok.stop_ids
    for text in [ASCII, "hello world, the model decodes a token stream.", "  two  spaces"]:
        assert json_tok.encode(text) == tok.encode(text)
        assert json_tok.decode(json_tok.encode(text)) == text
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    assert json_tok.encode_chat(messages) == tok.encode_chat(messages)


def test_tokenizer_json_streams_unicode(json_dir):
    json_tok = Tokenizer.from_dir(json_dir)
    for text in [CJK, EMOJI, UNSEEN]:
        ids = json_tok.encode(text)
        assert json_tok.decode(ids) == text
        assert "".join(stream(json_tok, ids)) == text


# ---------------------------------------------------------------------------
# Chat template
# ---------------------------------------------------------------------------

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [
        {"role": "user", "content": " Hi there \n"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Say 你好 😀\nin two lines."},
    ],
    [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2\n\n"},
    ],
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_matches_transformers(tok, hf_tokenizer, messages, add_generation_prompt):
    expected = hf_tokenizer.apply_chat_template(
        messages,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        chat_template=GEMMA_CHAT_TEMPLATE,
    )
    assert tok.render_chat(messages, add_generation_prompt) == expected
    assert render_chat(messages, add_generation_prompt) == expected
    assert (
        render_chat(messages, add_generation_prompt, chat_template=GEMMA_CHAT_TEMPLATE) == expected
    )
    expected_ids = hf_tokenizer.encode(expected, add_special_tokens=False)
    assert tok.encode_chat(messages, add_generation_prompt) == expected_ids


def test_chat_exact_format(tok):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert tok.render_chat(messages) == (
        "<bos><start_of_turn>user\nhi<end_of_turn>\n"
        "<start_of_turn>model\nyo<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    ids = tok.encode_chat(messages)
    assert ids[:2] == [tok.bos_id, tok.start_of_turn_id]
    assert ids.count(tok.bos_id) == 1


def test_system_message_is_folded_into_first_user_turn(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": " Hi "},
        {"role": "assistant", "content": "Hello"},
    ]
    assert tok.render_chat(messages, add_generation_prompt=False) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello<end_of_turn>\n"
    )


def chat(*turns):
    """Messages from (role, content) pairs."""
    return [{"role": role, "content": content} for role, content in turns]


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        (chat(("user", "a"), ("user", "b")), r"message 1: role 'user'"),
        (chat(("assistant", "a")), r"message 0: role 'assistant'"),
        (chat(("system", "s"), ("assistant", "a")), r"message 1: role 'assistant'"),
        (chat(("user", "a"), ("tool", "b")), r"message 1: unknown role 'tool'"),
        (
            chat(("user", "a"), ("assistant", "b"), ("system", "c")),
            r"message 2: role 'system' is only allowed as the first",
        ),
        ([{"role": "system", "content": "s"}], r"message 0: a system message must be followed"),
        (
            [{"role": "user", "content": ["not", "text"]}],
            r"message 0 \(user\): content must be a string",
        ),
        ([{"content": "no role"}], r"message 0: expected a dict"),
        ("just a string", r"messages must be a list"),
    ],
)
def test_chat_errors(tok, messages, match):
    with pytest.raises(ChatTemplateError, match=match):
        tok.render_chat(messages)


def test_jinja_template_errors_become_chat_template_errors():
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        render_chat([{"role": "assistant", "content": "x"}], chat_template=GEMMA_CHAT_TEMPLATE)
    with pytest.raises(ChatTemplateError, match="chat template"):
        render_chat([], chat_template="{% for %}")


CUSTOM_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}\n"
    "  [{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


@pytest.mark.parametrize("as_list", [False, True])
def test_config_chat_template_is_preferred(model_dir, tmp_path, as_list):
    directory = copy_model(model_dir, tmp_path)
    template = [
        {"name": "tool_use", "template": "unused"},
        {"name": "default", "template": CUSTOM_TEMPLATE},
    ]
    config = {"chat_template": template if as_list else CUSTOM_TEMPLATE}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_dir(directory)
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    # trim_blocks / lstrip_blocks: no newline after block tags, no indentation before them
    assert (
        tok.render_chat(messages)
        == "<bos>  [system] s<eos>\n  [user] u<eos>\n<start_of_turn>model\n"
    )
    ids = tok.encode_chat(messages, add_generation_prompt=False)
    assert ids[0] == tok.bos_id and ids[-2:] == [tok.eos_id, tok.encode("\n", add_bos=False)[0]]


def test_chat_template_jinja_file_is_used(model_dir, tmp_path):
    directory = copy_model(model_dir, tmp_path)
    (directory / "chat_template.jinja").write_text(CUSTOM_TEMPLATE)
    tok = Tokenizer.from_dir(directory)
    messages = [{"role": "user", "content": "u"}]
    assert tok.render_chat(messages, add_generation_prompt=False) == "<bos>  [user] u<eos>\n"


def test_bad_chat_template_config(model_dir, tmp_path):
    directory = copy_model(model_dir, tmp_path)
    config = {"chat_template": [{"name": "tool_use", "template": "x"}]}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(
        TokenizerError, match="tokenizer_config.json: chat_template list has no entry"
    ):
        Tokenizer.from_dir(directory)


@pytest.mark.parametrize("template", [None, GEMMA_CHAT_TEMPLATE])
@pytest.mark.parametrize("pending", ["end_of_turn", "eos", "content"])
def test_next_turn_on_a_live_state_equals_the_whole_conversation(tok, template, pending):
    """What a live conversation feeds (first turn, the answer's tokens, then next_turn_ids)
    is the template's rendering of the whole conversation, whichever token ended the
    answer: <end_of_turn>, <eos> (never fed), or a content token cut by the length limit."""
    import copy

    live = copy.copy(tok)
    live.chat_template = template
    answer = live.encode("A1 answer", add_bos=False)
    ends = {"end_of_turn": [tok.end_of_turn_id], "eos": [tok.eos_id], "content": []}[pending]
    generated = answer + ends  # the state holds all but the last token
    fed = (
        live.encode_chat([{"role": "user", "content": "Q1"}])
        + generated[:-1]
        + live.next_turn_ids(generated[-1:], " Q2 ")
    )
    whole = live.render_chat(
        [
            {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "A1 answer"},
            {"role": "user", "content": "Q2"},
        ]
    )
    assert live.decode(fed, skip_special=False) == whole
    assert fed == live.encode(whole, add_bos=False)
