"""The OpenAI request bodies the server accepts, as pydantic models.

Each endpoint's body is validated by one model:

    request = CompletionRequest.model_validate(body, context=limits)

Field types and fixed bounds are declared on the models; what depends on the
running server (its ``max_tokens`` limit, the engine's batch size, the
vocabulary) is read from the validation context, a :class:`RequestLimits`.
Validation is strict (no "5" for 5, no ``true`` for 1) and a JSON ``null``
means the field is absent.

A request that fails validation is answered with OpenAI's error object, status
400 and ``param`` naming the field: :func:`api_error_from_validation` words
the first error pydantic found (see ``errors.py``).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from rgemma.inference.engine import Request, RequestError, SamplingParams, sampling_params
from rgemma.inference.structured import (
    GrammarSpec,
    StructuredOutputError,
    compile_grammar,
    parse_response_format,
)
from rgemma.io.tokenizer import ChatTemplateError
from rgemma.serving.errors import (
    APIError,
    client_error,
    from_error_details,
    invalid_request,
    range_message,
)

MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 128  # stop strings are scanned at every token: keep them short
MIN_TEMPERATURE = 1e-5  # below this, sampling is greedy (as in vLLM)
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
# A prompt of more than max_prompt_tokens * PROMPT_BYTES_PER_TOKEN UTF-8 bytes is refused
# before it is tokenized: no real text averages more than 32 bytes per token (Gemma's
# longest pieces are runs of ~31 spaces), so such a prompt is over the token limit anyway.
PROMPT_BYTES_PER_TOKEN = 32
SAMPLING_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty")
CHAT_ROLES = ("system", "user", "assistant")
CHAT_ROLE_ALIASES = {"developer": "system"}


# ------------------------------------------------------------- field shapes
def valid_unicode(text: str, param: str) -> str:
    """``text`` if it is valid Unicode (JSON can carry lone surrogates, which are not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise client_error(f"'{param}' holds invalid Unicode (a lone surrogate)") from None
    return text


def _is_token_ids(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    )


def _prompt_list(value: Any) -> Any:
    """``prompt`` in any of OpenAI's shapes -> a list of strings or of token-id lists."""
    if isinstance(value, str) or _is_token_ids(value):
        return [valid_unicode(value, "prompt") if isinstance(value, str) else value]
    if (
        isinstance(value, list)
        and value
        and (all(isinstance(x, str) for x in value) or all(_is_token_ids(x) for x in value))
    ):
        return [valid_unicode(x, "prompt") if isinstance(x, str) else x for x in value]
    raise client_error(
        "'prompt' must be a string, a list of strings, a non-empty list of token "
        "ids or a list of such lists",
        "invalid_type",
    )


def _stop_list(value: Any) -> list[str]:
    """``stop``: a string or a list of short non-empty strings."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise client_error("'stop' must be a string or a list of strings", "invalid_type")
    if len(items) > MAX_STOP_STRINGS:
        raise client_error(f"'stop' may hold at most {MAX_STOP_STRINGS} strings")
    if any(not s or len(s) > MAX_STOP_CHARS for s in items):
        raise client_error(f"'stop' strings must have 1 to {MAX_STOP_CHARS} characters")
    return [valid_unicode(s, "stop") for s in items]


def _message_list(value: Any) -> list[dict]:
    """``messages`` -> [{"role", "content": str}]: role aliases applied, text parts joined."""
    if not isinstance(value, list) or not value:
        raise client_error("'messages' must be a non-empty list", "invalid_type")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise client_error(f"messages[{i}] must be an object", "invalid_type")
        role = m.get("role")
        role = CHAT_ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
        if role not in CHAT_ROLES:
            raise client_error(
                f"messages[{i}]: unknown role {m.get('role')!r} (expected system, "
                "user or assistant)",
                "invalid_role",
            )
        out.append({"role": role, "content": valid_unicode(_text(m.get("content"), i), "messages")})
    return out


def _text(content: Any, i: int) -> str:
    """A message's content: a string, or a list of text parts (joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    ):
        return "".join(p["text"] for p in content)
    raise client_error(
        f"messages[{i}].content must be a string or a list of text parts", "invalid_type"
    )


STATE_ID_PATTERN = r"^state-[0-9a-f]{1,64}$"
MAX_METADATA_BYTES = 64 * 1024


def small_metadata(value: Any) -> dict:
    """A client's JSON object kept with a state: at most MAX_METADATA_BYTES as JSON."""
    if not isinstance(value, dict):
        raise client_error("'metadata' must be a JSON object", "invalid_type")
    if len(json.dumps(value)) > MAX_METADATA_BYTES:
        raise client_error(f"'metadata' is over {MAX_METADATA_BYTES} bytes of JSON")
    return value


class ChatMessage(BaseModel):
    """One turn of a conversation, normalized by ``_message_list``."""

    role: Literal["system", "user", "assistant"]
    content: str


Messages = Annotated[list[ChatMessage], BeforeValidator(_message_list)]


# ------------------------------------------------------------------ limits
@dataclasses.dataclass(frozen=True)
class RequestLimits:
    """What a running server allows; the validation context of every request model.

    max_tokens: largest ``max_tokens`` (the server's ``--max-tokens-limit``).
    max_prompt_tokens: longest prompt, in tokens.
    max_n: largest ``n`` (the engine's batch rows).
    max_prompts: most prompts in one completion request (the engine's queue).
    vocab_size: token ids are in [0, vocab_size).
    max_request_tokens: most tokens one request may cost: its prompts' tokens plus
      n * max_tokens per prompt.
    max_logprob_entries: most log-probabilities one request may return: every scored
      token (echoed prompt tokens and generated tokens, for each of the n choices)
      counts 1 + logprobs (the token and its top alternatives).
    """

    max_tokens: int = 2048
    max_prompt_tokens: int = 8192
    max_n: int = 8
    max_prompts: int = 64
    vocab_size: int = 256_000
    max_request_tokens: int = 2**20
    max_logprob_entries: int = 2_000_000

    @property
    def max_prompt_bytes(self) -> int:
        """Longest prompt text (UTF-8 bytes) that is tokenized at all."""
        return self.max_prompt_tokens * PROMPT_BYTES_PER_TOKEN


def _limits(info: ValidationInfo) -> RequestLimits:
    return info.context if isinstance(info.context, RequestLimits) else RequestLimits()


def _in_range(name: str, value: int, lo: int, hi: int) -> int:
    """``value``, or an error worded like the declared bounds' (for bounds known only at run
    time)."""
    if not lo <= value <= hi:
        raise client_error(range_message(name, value, lo, hi))
    return value


def _within_max_tokens(value: int, info: ValidationInfo) -> int:
    limit = _limits(info).max_tokens
    if value > limit:
        raise client_error(
            f"'{info.field_name}' is {value}, over this server's limit of {limit}",
            "max_tokens_too_large",
        )
    return value


def _too_many_tokens(count: int, limits: RequestLimits) -> str:
    return f"the prompt has {count} tokens, over this server's limit of {limits.max_prompt_tokens}"


def _check_lengths(prompts: list[tuple[list[int], str]], limits: RequestLimits, param: str) -> None:
    for ids, _ in prompts:
        if len(ids) > limits.max_prompt_tokens:
            raise invalid_request(
                param, _too_many_tokens(len(ids), limits), "context_length_exceeded"
            )


def _check_bytes(text: str, limits: RequestLimits, param: str) -> None:
    """Refuses a prompt text too long to be within the token limit, before tokenizing it
    (tokenizing megabytes takes seconds)."""
    size = len(text.encode("utf-8"))
    if size > limits.max_prompt_bytes:
        raise invalid_request(
            param,
            f"the prompt has {size} bytes, over this server's limit of "
            f"{limits.max_prompt_bytes} ({limits.max_prompt_tokens} tokens x "
            f"{PROMPT_BYTES_PER_TOKEN} bytes)",
            "context_length_exceeded",
        )


# ------------------------------------------------------------------ models
class RequestModel(BaseModel):
    """A JSON request body: strict types, unknown fields ignored, ``null`` = absent."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class StreamOptions(RequestModel):
    include_usage: bool = False


def _response_format(value: Any) -> GrammarSpec | None:
    """``response_format`` (``text``, ``json_object`` or ``json_schema``) -> the checked
    GrammarSpec to enforce, None for text. The schema is checked here, without a tokenizer;
    ``prepare_grammar`` compiles it."""
    try:
        return parse_response_format(value)
    except StructuredOutputError as e:
        raise client_error(f"'response_format': {e}") from None


_UNSUPPORTED = {
    "presence_penalty": "'presence_penalty' is not supported (use repetition_penalty)",
    "frequency_penalty": "'frequency_penalty' is not supported (use repetition_penalty)",
    "logit_bias": "'logit_bias' is not supported",
    "suffix": "'suffix' is not supported",
    "tools": "'tools' are not supported",
}


class _GenerationRequest(RequestModel):
    """The fields both completion endpoints share: sampling, stopping, streaming."""

    model: str | None = None  # any name is served by the one model
    n: int = 1
    best_of: int | None = None
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = 0  # -1 or 0: off
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=100.0)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: Annotated[list[str], BeforeValidator(_stop_list)] = []
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    max_tokens: int | None = None  # bounds and default per endpoint; an int once validated
    # state handles (rgemma's extension, see states.py): continue from one, save the result
    state: str | None = Field(None, pattern=STATE_ID_PATTERN)
    save_state: bool = False
    metadata: Annotated[dict, BeforeValidator(small_metadata)] | None = None
    # structured output: a GrammarSpec once validated (None: plain text)
    response_format: Annotated[Any, BeforeValidator(_response_format)] = None
    _grammar: Any = PrivateAttr(None)  # response_format compiled by prepare_grammar
    # Accepted at their no-op value only.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None
    tools: list | None = None

    @field_validator(*_UNSUPPORTED)
    @classmethod
    def _unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        if value:
            raise client_error(_UNSUPPORTED[info.field_name], "unsupported")
        return value

    @field_validator("n", "best_of")
    @classmethod
    def _fits_the_batch(cls, value: int, info: ValidationInfo) -> int:
        return _in_range(info.field_name, value, 1, _limits(info).max_n)

    @field_validator("top_k")
    @classmethod
    def _within_vocab(cls, value: int, info: ValidationInfo) -> int:
        return _in_range("top_k", value, -1, _limits(info).vocab_size)

    @model_validator(mode="after")
    def _check_combinations(self) -> _GenerationRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise client_error("'best_of' other than n is not supported", "unsupported", "best_of")
        if self.save_state and self.n != 1:
            raise client_error("'save_state' needs n = 1", param="save_state")
        if self.metadata is not None and not self.save_state:
            raise client_error(
                "'metadata' is kept with a saved state: send save_state", param="metadata"
            )
        if self.stream_options is not None and not self.stream:
            raise client_error(
                "'stream_options' is only allowed with stream: true", param="stream_options"
            )
        for name in SAMPLING_FIELDS:  # each alone, to name the field that fails
            try:
                sampling_params(**{name: self._sampling_value(name)})
            except RequestError as e:
                raise client_error(f"'{name}': {e}", param=name) from None
        return self

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def num_logprobs(self) -> int | None:
        """Top alternatives reported per generated token (None: no logprobs)."""
        return None

    @property
    def num_prompt_logprobs(self) -> int | None:
        """Top alternatives reported per prompt token (None: not scored)."""
        return None

    def check_budgets(self, prompts: list[tuple[list[int], str]], limits: RequestLimits) -> None:
        """Refuses (400) a request whose work or whose logprobs are over the server's
        per-request budgets (``RequestLimits``), before anything runs."""
        prompt_tokens = sum(len(ids) for ids, _ in prompts)
        tokens = prompt_tokens + len(prompts) * self.n * self.max_tokens
        if tokens > limits.max_request_tokens:
            raise invalid_request(
                "max_tokens",
                f"this request would cost {tokens} tokens ({prompt_tokens} prompt tokens + "
                f"{len(prompts)} prompts x n={self.n} x max_tokens={self.max_tokens}), over "
                f"this server's budget of {limits.max_request_tokens} tokens per request",
                "request_too_large",
            )
        top = self.num_logprobs
        if top is None:
            return
        scored = (self.num_prompt_logprobs is not None) * prompt_tokens
        scored = (scored + len(prompts) * self.max_tokens) * self.n
        entries = scored * (1 + top)
        if entries > limits.max_logprob_entries:
            param = "top_logprobs" if "top_logprobs" in self.model_fields_set else "logprobs"
            raise invalid_request(
                param,
                f"this request asks for {entries} log-probabilities ({scored} scored tokens "
                f"x (1 + {top} alternatives)), over this server's budget of "
                f"{limits.max_logprob_entries} per request: send fewer prompts, a smaller "
                f"max_tokens or fewer logprobs",
                "too_many_logprobs",
            )

    def _sampling_value(self, name: str) -> float:
        """A sampling field as the sampler gets it (tiny temperatures mean greedy)."""
        value = getattr(self, name)
        if name == "temperature" and value < MIN_TEMPERATURE:
            return 0.0
        return value

    def to_sampling_params(self, defaults: dict | None = None) -> SamplingParams:
        """The request's sampling fields; those it does not send take ``defaults`` (the
        model's generation_config.json) where given, else OpenAI's defaults."""
        sent = {name: self._sampling_value(name) for name in SAMPLING_FIELDS}
        sent["top_k"] = max(self.top_k, 0)
        unsent = {k: v for k, v in (defaults or {}).items() if k not in self.model_fields_set}
        return sampling_params(**{**sent, **unsent})

    def prepare_grammar(self, tokenizer, vocab_size: int) -> None:
        """Compiles ``response_format`` for the tokenizer and the model's ``vocab_size``
        (cached per schema; the first time a schema is seen it takes up to ~0.1 s at a
        256000 vocabulary: run it off the event loop). A 400 naming ``response_format`` if
        it cannot be enforced."""
        if self.response_format is None:
            return
        try:
            self._grammar = compile_grammar(self.response_format, tokenizer, vocab_size)
        except StructuredOutputError as e:
            raise invalid_request("response_format", f"'response_format': {e}") from None

    def to_engine_requests(
        self, prompt_ids: list[list[int]], defaults: dict | None = None
    ) -> list[Request]:
        """One engine Request per prompt (``defaults``: see ``to_sampling_params``); with a
        ``response_format``, after ``prepare_grammar``."""
        if self.response_format is not None and self._grammar is None:
            raise RuntimeError("response_format: call prepare_grammar() first")
        params = self.to_sampling_params(defaults)
        return [
            Request(
                prompt_ids=ids,
                max_tokens=self.max_tokens,
                params=params,
                seed=self.seed,
                n=self.n,
                stop_ids=[] if self.ignore_eos else None,
                stop_strings=self.stop,
                logprobs=self.num_logprobs,
                prompt_logprobs=self.num_prompt_logprobs,
                grammar=self._grammar,
            )
            for ids in prompt_ids
        ]


class CompletionRequest(_GenerationRequest):
    """``POST /v1/completions``. ``prompt`` is kept as a list (one string or one token-id
    list is a list of one); ``echo`` with ``logprobs`` scores the prompt (``max_tokens``
    0 is allowed then: scoring only)."""

    prompt: Annotated[list[str] | list[list[int]], BeforeValidator(_prompt_list)]
    max_tokens: int | None = Field(None, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens_limit(cls, value: int, info: ValidationInfo) -> int:
        return _within_max_tokens(value, info)

    @field_validator("prompt")
    @classmethod
    def _fits_the_server(cls, prompts: list, info: ValidationInfo) -> list:
        limits = _limits(info)
        if len(prompts) > limits.max_prompts:
            raise client_error(f"at most {limits.max_prompts} prompts per request")
        for p in prompts:
            if isinstance(p, str):
                continue
            if len(p) > limits.max_prompt_tokens:  # before anything looks at each id
                raise client_error(_too_many_tokens(len(p), limits), "context_length_exceeded")
            if any(not 0 <= t < limits.vocab_size for t in p):
                raise client_error(f"prompt token ids must be in [0, {limits.vocab_size})")
        return prompts

    @model_validator(mode="after")
    def _default_max_tokens(self, info: ValidationInfo) -> CompletionRequest:
        if self.max_tokens is None:
            self.max_tokens = min(DEFAULT_COMPLETION_TOKENS, _limits(info).max_tokens)
        if self.max_tokens == 0 and not self.echo:
            raise client_error("'max_tokens' must be >= 1 (0 only with echo)", param="max_tokens")
        return self

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def num_prompt_logprobs(self) -> int | None:
        return self.logprobs if self.echo else None

    def encode_prompts(self, tokenizer, limits: RequestLimits) -> list[tuple[list[int], str]]:
        """(token ids, text) of each prompt; strings get a BOS. Slow for long prompts: run
        it off the event loop."""
        for p in self.prompt:
            if isinstance(p, str):
                _check_bytes(p, limits, "prompt")
        prompts = [
            (tokenizer.encode(p, add_bos=True), p)
            if isinstance(p, str)
            else (list(p), tokenizer.decode(p))
            for p in self.prompt
        ]
        _check_lengths(prompts, limits, "prompt")
        return prompts


class ChatCompletionRequest(_GenerationRequest):
    """``POST /v1/chat/completions``: ``messages`` rendered with the tokenizer's chat format.
    ``max_completion_tokens`` (or the older ``max_tokens``) defaults to the server's limit."""

    messages: Messages
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False

    @field_validator("max_tokens", "max_completion_tokens")
    @classmethod
    def _max_tokens_limit(cls, value: int, info: ValidationInfo) -> int:
        return _within_max_tokens(value, info)

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool) -> bool:
        if value:
            raise client_error("'echo' is not supported for chat completions", "unsupported")
        return value

    @model_validator(mode="after")
    def _resolve(self, info: ValidationInfo) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise client_error("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        elif self.max_tokens is None:
            self.max_tokens = _limits(info).max_tokens
        return self

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def encode_prompts(self, tokenizer, limits: RequestLimits) -> list[tuple[list[int], str]]:
        """The rendered conversation as the one prompt: [(token ids, text)]. Slow for long
        conversations: run it off the event loop."""
        _check_bytes("".join(m.content for m in self.messages), limits, "messages")
        text = render_messages(tokenizer, self.messages, True)
        _check_bytes(text, limits, "messages")
        prompts = [(tokenizer.encode(text, add_bos=False), text)]
        _check_lengths(prompts, limits, "messages")
        return prompts


def render_messages(tokenizer, messages: list[ChatMessage], add_generation_prompt: bool) -> str:
    """The conversation in the tokenizer's chat format (400 naming messages if it fails)."""
    try:
        return tokenizer.render_chat([m.model_dump() for m in messages], add_generation_prompt)
    except ChatTemplateError as e:
        raise invalid_request("messages", str(e)) from None


class TokenizeRequest(RequestModel):
    """``POST /tokenize`` (vLLM's shape): ``prompt`` text or chat ``messages``."""

    prompt: str | None = None
    messages: Messages | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @field_validator("prompt")
    @classmethod
    def _unicode(cls, value: str) -> str:
        return valid_unicode(value, "prompt")

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> TokenizeRequest:
        if self.prompt is None and self.messages is None:
            raise client_error("'prompt' must be a string", "invalid_type", "prompt")
        return self

    def encode(self, tokenizer) -> list[int]:
        if self.messages is not None:
            text = render_messages(tokenizer, self.messages, self.add_generation_prompt)
            return tokenizer.encode(text, add_bos=False)
        return tokenizer.encode(self.prompt, add_bos=self.add_special_tokens)


class DetokenizeRequest(RequestModel):
    """``POST /detokenize`` (vLLM's shape)."""

    tokens: list[int]

    @field_validator("tokens")
    @classmethod
    def _within_vocab(cls, ids: list[int], info: ValidationInfo) -> list[int]:
        vocab = _limits(info).vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise client_error(f"'tokens' must be a list of token ids in [0, {vocab})")
        return ids


_MODELS = {
    m.__name__: m
    for m in (
        CompletionRequest,
        ChatCompletionRequest,
        TokenizeRequest,
        DetokenizeRequest,
        StreamOptions,
    )
}


def api_error_from_validation(e: ValidationError) -> APIError:
    """The first error of a request model's validation as a 400 naming its field."""
    err = e.errors(include_url=False)[0]
    model = _MODELS.get(e.title)
    field = model.model_fields.get(str(err["loc"][0])) if model and err["loc"] else None
    return from_error_details(err, field.metadata if field else [])
