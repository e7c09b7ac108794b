"""lm-evaluation-harness for rgemma: the ``rgemma`` LM (``rgemma eval`` runs it).

    rgemma eval --model PATH --tasks hellaswag,piqa --batch-size 16 --output results.json

or, from Python::

    import rgemma.evaluation.harness          # registers the lm-eval model name "rgemma"
    import lm_eval
    lm_eval.simple_evaluate(model="rgemma", model_args="pretrained=PATH,dtype=bfloat16",
                            tasks=["hellaswag"])

Registration. Importing this module runs ``lm_eval.api.registry.register_model
("rgemma")`` on :class:`RgemmaLM`. lm-eval (0.4.13) has no plugin discovery
for models (no entry-point group): its ``lm_eval`` command only knows the
names registered in the process. So the command-line routes are
``rgemma eval`` (which wraps ``lm_eval.simple_evaluate``) and lm-eval's own
command line with this module imported first (both in ``rgemma.cli.evaluate``)::

    python -m rgemma.cli.evaluate --model rgemma --model_args pretrained=PATH,dtype=bfloat16 \
        --tasks hellaswag                       # exactly lm_eval's arguments

(also installed as the ``rgemma-lm-eval`` script). Both need the optional
extra ``pip install 'rgemma[eval]'``.

How the three request types run on a recurrent model:

* ``loglikelihood``: requests that share a context (the choices of a
  multiple-choice question) form a group. Each context is prefilled ONCE
  (chunked, left-padded, logits only at its last token, which predict every
  continuation's first token); the state is then forked per continuation
  (``State.select``) and the continuations, right-padded with position -1,
  run as one batch from the forked states. Groups are batched too (longest
  contexts first). A continuation is tokenized as the tail of the tokens of
  ``context + continuation`` after their longest common prefix with the
  tokens of ``context``, so the scored tokens always cover the continuation
  text even when a token straddles the boundary.
* ``loglikelihood_rolling``: the document (``<bos>`` first) is streamed
  through the state in fixed-size chunks (``rgemma.evaluation.perplexity``):
  every token is conditioned on the whole document before it, with no
  windows and no re-encoding.
* ``generate_until``: ``rgemma.inference.generate``'s batched sampler, greedy
  unless the task asks for ``do_sample``, stopping at the task's ``until``
  strings, the tokenizer's stop tokens or ``max_gen_toks``.

There is no maximum length: the state has a fixed size, so no context is
ever truncated.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from rgemma.dtypes import as_dtype
from rgemma.evaluation.perplexity import (
    DEFAULT_CHUNK_SIZE,
    LOGITS_BUDGET,
    document_ids,
    sum_logprobs,
)
from rgemma.inference.batching import pad_batch, target_logprobs
from rgemma.io.tokenizer import common_prefix_length

try:  # the optional extra rgemma[eval]; without it the scorers below still work
    from lm_eval.api.model import LM as _LMBase
    from lm_eval.api.registry import register_model

    LM_EVAL_IMPORT_ERROR = None
except ImportError as e:
    _LMBase, register_model, LM_EVAL_IMPORT_ERROR = object, None, e

MODEL_NAME = "rgemma"
DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_GEN_TOKS = 256
INSTALL_HINT = "pip install 'rgemma[eval]' (or: pip install lm-eval)"

log = logging.getLogger(__name__)


# ============================================================ tokenization
def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of a prompt, with ``<bos>`` first (once, even if the text starts with it)."""
    return tokenizer.encode(text, add_bos=not text.startswith(tokenizer.bos_token))


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) whose concatenation is the encoding of the joined text.

    The whole text is encoded once; the context keeps the longest prefix it
    shares with the encoding of the context alone, and the continuation gets
    the rest (at least one token when the continuation is not empty). An
    empty context is just ``<bos>``.
    """
    if not continuation:
        return encode_text(tokenizer, context), []
    whole = encode_text(tokenizer, context + continuation)
    split = common_prefix_length(whole, encode_text(tokenizer, context))
    split = max(1, min(split, len(whole) - 1))
    return whole[:split], whole[split:]


# ========================================================= loglikelihood
@dataclasses.dataclass
class ContextGroup:
    """One context and the continuations to score after it.

    members: (request index, continuation ids) pairs.
    """

    context: list[int]
    members: list[tuple[int, list[int]]]


def group_by_context(
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]], share_context: bool = True
) -> list[ContextGroup]:
    """Requests with the same context ids in one group (or one group each)."""
    if not share_context:
        return [ContextGroup(list(ctx), [(i, list(cont))]) for i, (ctx, cont) in enumerate(pairs)]
    groups: dict[tuple[int, ...], ContextGroup] = {}
    for i, (ctx, cont) in enumerate(pairs):
        key = tuple(ctx)
        groups.setdefault(key, ContextGroup(list(ctx), [])).members.append((i, list(cont)))
    return list(groups.values())


@torch.no_grad()
def prefill_contexts(
    model, contexts: Sequence[Sequence[int]], chunk_size: int = DEFAULT_CHUNK_SIZE
):
    """Runs contexts (left-padded) in chunks; returns (next-token log-probs [B, V], state).

    Logits are computed only in the last chunk and only at each row's last
    token, which is the last column for every row thanks to the left padding.
    """
    tokens, positions = pad_batch(contexts, [0] * len(contexts), side="left", device=model.device)
    width = tokens.shape[1]
    state = model.init_state(len(contexts))
    for start in range(0, width, chunk_size):
        end = min(width, start + chunk_size)
        logits, state = model(
            tokens[:, start:end],
            positions[:, start:end],
            state,
            logits="last" if end == width else "none",
        )
    return torch.log_softmax(logits.float(), dim=-1), state


@torch.no_grad()
def score_forked(
    model,
    state,
    next_logprobs: torch.Tensor,
    rows: Sequence[int],
    starts: Sequence[int],
    continuations: Sequence[Sequence[int]],
) -> list[tuple[float, bool]]:
    """(sum log p, is greedy) of continuations, each after the context of state row ``rows[i]``.

    ``next_logprobs[r]`` scores the first token after context row r;
    the other tokens come from one batched call over the continuations
    (minus their last token, right-padded) on a fork of the state rows.
    ``starts[i]`` is the length of that context (the first segment position).
    """
    first = torch.tensor([c[0] for c in continuations], device=next_logprobs.device)
    first_lp = next_logprobs[list(rows)]
    totals = first_lp.gather(1, first[:, None])[:, 0].double()
    greedy = first_lp.argmax(dim=-1) == first
    if max(len(c) for c in continuations) > 1:
        inputs, positions = pad_batch(
            [c[:-1] for c in continuations], starts, side="right", device=model.device
        )
        targets, _ = pad_batch(
            [c[1:] for c in continuations], [0] * len(rows), side="right", device=model.device
        )
        logits, _ = model(inputs, positions, state.select(list(rows)), logits="all")
        pad = positions < 0
        totals += target_logprobs(logits, targets).masked_fill(pad, 0.0).double().sum(dim=1)
        greedy &= ((logits.argmax(dim=-1) == targets) | pad).all(dim=1)
    return [(float(t), bool(g)) for t, g in zip(totals.tolist(), greedy.tolist())]


def _batches(items: Sequence, size: int) -> Iterable[Sequence]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _continuation_batches(rows: Sequence, batch_size: int, vocab_size: int) -> Iterable[Sequence]:
    """Rows (longest continuation first) in batches of at most ``batch_size`` whose
    logits (rows x longest continuation x vocab) stay within LOGITS_BUDGET."""
    first = 0
    while first < len(rows):
        width = max(1, len(rows[first][2]) - 1)
        size = max(1, min(batch_size, LOGITS_BUDGET // (width * vocab_size)))
        yield rows[first : first + size]
        first += size


def loglikelihoods(
    model,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    share_context: bool = True,
    on_done: Callable[[int], None] | None = None,
) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), is greedy) per (context ids, continuation ids).

    Each context must start with ``<bos>`` (at least one token). With
    ``share_context`` a context is prefilled once for all its continuations;
    without it, once per request (the plain way; same numbers). At most
    ``batch_size`` rows run per model call. ``on_done(n)`` reports requests
    finished.
    """
    if any(len(ctx) == 0 for ctx, _ in pairs):
        raise ValueError("every context needs at least one token (<bos>)")
    results: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
    groups = group_by_context(pairs, share_context)
    groups.sort(key=lambda g: -len(g.context))
    for batch in _batches(groups, batch_size):
        next_lp, state = prefill_contexts(model, [g.context for g in batch], chunk_size)
        rows = [(r, i, cont) for r, g in enumerate(batch) for i, cont in g.members if cont]
        rows.sort(key=lambda row: -len(row[2]))
        for part in _continuation_batches(rows, batch_size, model.config.vocab_size):
            scores = score_forked(
                model,
                state,
                next_lp,
                [r for r, _, _ in part],
                [len(batch[r].context) for r, _, _ in part],
                [cont for _, _, cont in part],
            )
            for (_, i, _), score in zip(part, scores):
                results[i] = score
        if on_done is not None:
            on_done(sum(len(g.members) for g in batch))
    return results


# ============================================================ generation
def generation_settings(gen_kwargs: dict[str, Any], default_max_tokens: int) -> dict[str, Any]:
    """``rgemma.inference.generate.generate`` keyword arguments for an lm-eval ``gen_kwargs`` dict.

    Greedy unless ``do_sample`` is true (then ``temperature`` defaults to 1);
    ``until`` (a string or a list) are stop strings; ``max_gen_toks`` caps the
    new tokens. Other keys (e.g. ``top_p``, ``top_k``) apply when sampling.
    """
    kwargs = dict(gen_kwargs or {})
    until = kwargs.pop("until", None) or []
    if isinstance(until, str):
        until = [until]
    settings: dict[str, Any] = {
        "stop_strings": [s for s in until if s],
        "max_new_tokens": int(kwargs.pop("max_gen_toks", default_max_tokens)),
        "temperature": 0.0,
    }
    do_sample = bool(kwargs.pop("do_sample", False))
    temperature = float(kwargs.pop("temperature", 1.0 if do_sample else 0.0) or 0.0)
    if do_sample and temperature > 0:
        settings["temperature"] = temperature
        for key in ("top_p", "top_k", "min_p", "repetition_penalty"):
            if key in kwargs:
                settings[key] = kwargs.pop(key)
    for key in ("top_p", "top_k", "min_p", "repetition_penalty"):
        kwargs.pop(key, None)
    if kwargs:
        log.warning("rgemma: ignoring unsupported generation arguments %s", sorted(kwargs))
    return settings


def generate_texts(
    model,
    tokenizer,
    prompts: Sequence[list[int]],
    settings: dict[str, Any],
    *,
    batch_size: int,
    seed: int | None,
) -> list[str]:
    """Generated text per prompt (token ids), ``batch_size`` prompts per batch."""
    from rgemma.inference.generate import generate

    out: list[str] = []
    for first in range(0, len(prompts), batch_size):
        batch = list(prompts[first : first + batch_size])
        row_seed = None if seed is None else seed + first
        completions = generate(model, tokenizer, batch, seed=row_seed, **settings)
        out.extend(c.text for c in completions)
    return out


# ===================================================== lm-eval LM adapter
def _parse_batch_size(batch_size: Any, max_batch_size: Any) -> int:
    """lm-eval's batch size (an int, "8", "auto" or "auto:N") as an int.

    "auto" has no probing here: it means the default, capped by max_batch_size.
    """
    text = str(batch_size if batch_size is not None else DEFAULT_BATCH_SIZE)
    size = DEFAULT_BATCH_SIZE if text.startswith("auto") else int(text)
    if max_batch_size:
        size = min(size, int(max_batch_size))
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    return size


def _pick_device(device: str | None) -> str:
    """``device``, or cuda if available else cpu. lm-eval's command line always passes
    its default "cuda", so a cuda device on a machine without CUDA falls back to cpu."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        log.warning("rgemma: device %r requested but CUDA is not available; using cpu", device)
        return "cpu"
    return str(device)


class RgemmaLM(_LMBase):
    """An lm-eval ``LM`` for rgemma checkpoints (registered as ``rgemma``).

    Args (``--model_args`` in lm-eval):
      pretrained: checkpoint path (Hugging Face directory, official ``.pt``,
        Orbax directory); default: the bundled demo model.
      dtype: "float32", "bfloat16", "float16" or "auto" (the checkpoint's).
      device: "cpu", "cuda", "cuda:1"...; default cuda if available.
      batch_size: rows per model call ("auto" = 16, no probing).
      chunk_size: tokens per model call when prefilling / streaming.
      share_context: prefill a context once for all its continuations.
      max_gen_toks: default cap on generated tokens.
      seed: base seed for sampled generation (greedy needs none).
      model, tokenizer: an already loaded model / tokenizer (Python use).
    """

    def __init__(
        self,
        pretrained: str | None = None,
        dtype: Any = None,
        device: str | None = None,
        batch_size: Any = DEFAULT_BATCH_SIZE,
        max_batch_size: Any = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        share_context: bool = True,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        seed: int | None = 1234,
        *,
        model=None,
        tokenizer=None,
        progress: bool = True,
        **unused,
    ):
        super().__init__()
        if unused:
            log.warning("rgemma: ignoring unknown model_args %s", sorted(unused))
        if model is None:
            model, tokenizer = self._load(pretrained, dtype, device, tokenizer)
        if tokenizer is None:
            raise ValueError("rgemma needs a tokenizer: the checkpoint has none and none was given")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.pretrained = pretrained or "in-memory"
        self.batch_size = _parse_batch_size(batch_size, max_batch_size)
        self.chunk_size = int(chunk_size)
        self.share_context = bool(share_context)
        self.max_gen_toks = int(max_gen_toks)
        self.seed = seed
        self.progress = progress
        self._device = self.model.device

    @staticmethod
    def _load(pretrained: str | None, dtype: Any, device: str | None, tokenizer):
        """(model, tokenizer) of a checkpoint path, or of the bundled demo model."""
        from rgemma.io import checkpoint

        if pretrained is None:
            from rgemma.io import demo

            pretrained = demo.path()
        else:
            from rgemma.io import hub

            if hub.is_hub_id(pretrained):  # pretrained=ORG/NAME: the Hub's cached snapshot
                pretrained = hub.snapshot(pretrained)
        model, found = checkpoint.load(
            pretrained, dtype=as_dtype(dtype), device=_pick_device(device)
        )
        return model, tokenizer or found

    # ------------------------------------------------------------ requests
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log p(continuation | context), is greedy) per ``(context, continuation)``."""
        texts = [req.args for req in requests]
        pairs = [encode_pair(self.tokenizer, ctx, cont) for ctx, cont in texts]
        with self._bar(len(pairs), "loglikelihood", disable_tqdm) as bar:
            results = loglikelihoods(
                self.model,
                pairs,
                batch_size=self.batch_size,
                chunk_size=self.chunk_size,
                share_context=self.share_context,
                on_done=bar.update,
            )
        for args, result in zip(texts, results):
            self._cache("loglikelihood", args, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log p(text) per ``(text,)``: every token after ``<bos>``, on the whole past."""
        texts = [req.args[0] for req in requests]
        docs = [document_ids(self.tokenizer, text) for text in texts]
        with self._bar(
            sum(len(d) - 1 for d in docs), "loglikelihood_rolling", disable_tqdm, unit="tok"
        ) as bar:
            sums = sum_logprobs(
                self.model,
                docs,
                chunk_size=self.chunk_size,
                batch_size=self.batch_size,
                on_chunk=lambda counts: bar.update(sum(counts.values())),
            )
        for text, total in zip(texts, sums):
            self._cache("loglikelihood_rolling", (text,), total)
        return sums

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Generated text per ``(context, gen_kwargs)``, cut at the first ``until`` string."""
        args = [req.args for req in requests]
        results: list[str | None] = [None] * len(args)
        with self._bar(len(args), "generate_until", disable_tqdm) as bar:
            for settings, indices in self._by_settings(args):
                indices.sort(key=lambda i: -len(args[i][0]))
                prompts = [encode_text(self.tokenizer, args[i][0]) for i in indices]
                texts = generate_texts(
                    self.model,
                    self.tokenizer,
                    prompts,
                    settings,
                    batch_size=self.batch_size,
                    seed=self.seed,
                )
                for i, text in zip(indices, texts):
                    results[i] = text
                    self._cache("generate_until", args[i], text)
                bar.update(len(indices))
        return results

    def _by_settings(self, args) -> list[tuple[dict[str, Any], list[int]]]:
        """Requests grouped by identical generation settings (one sampler setup each)."""
        groups: dict[str, tuple[dict[str, Any], list[int]]] = {}
        for i, (_, gen_kwargs) in enumerate(args):
            settings = generation_settings(gen_kwargs, self.max_gen_toks)
            key = json.dumps(settings, sort_keys=True, default=str)
            groups.setdefault(key, (settings, []))[1].append(i)
        return list(groups.values())

    def _cache(self, kind: str, args, result) -> None:
        """Hands a result to lm-eval's response cache (``--use_cache``), if any."""
        hook = getattr(self, "cache_hook", None)
        if hook is not None:
            hook.add_partial(kind, args, result)

    def _bar(self, total: int, desc: str, disable: bool, unit: str = "req"):
        from tqdm.auto import tqdm

        return tqdm(
            total=total, desc=f"rgemma {desc}", unit=unit, disable=disable or not self.progress
        )

    # ---------------------------------------------------------------- chat
    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """The prompt text of a chat (``<bos><start_of_turn>user...``).

        With ``add_generation_prompt=False`` the last (assistant) message is
        left open, so the model continues it (lm-eval's ``gen_prefix``).
        """
        history = list(chat_history)
        if add_generation_prompt or not history or history[-1].get("role") != "assistant":
            return self.tokenizer.render_chat(history, add_generation_prompt=add_generation_prompt)
        return (
            self.tokenizer.render_chat(history[:-1], add_generation_prompt=True)
            + history[-1]["content"]
        )

    @property
    def tokenizer_name(self) -> str:
        """Identifies the tokenizer / chat template in lm-eval's request cache keys."""
        return "rgemma-" + str(self.pretrained).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The checkpoint's Jinja chat template, or a description of the built-in Gemma one."""
        if not chat_template:
            return None
        return self.tokenizer.chat_template or (
            "gemma (rgemma built-in): <bos><start_of_turn>user\\n{text}<end_of_turn>\\n"
            "<start_of_turn>model\\n{text}<end_of_turn>\\n"
        )

    # -------------------------------------------------------------- facts
    def get_model_info(self) -> dict[str, Any]:
        """Recorded in lm-eval's results["config"]."""
        return {
            "model_num_parameters": self.model.num_parameters(),
            "model_dtype": str(self.model.dtype),
            "model_path": str(self.pretrained),
            "rgemma_batch_size": self.batch_size,
            "rgemma_chunk_size": self.chunk_size,
            "rgemma_share_context": self.share_context,
        }


# lm-eval knows only the model names registered in its process: importing this module
# makes "rgemma" one of them.
if register_model is not None:
    register_model(MODEL_NAME)(RgemmaLM)
