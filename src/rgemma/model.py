"""Griffin: the RecurrentGemma model, with its state as an explicit object.

    logits, state = model(tokens, positions, state=None, *, logits="all")

x = embed(tokens) * sqrt(D)  (the constant rounded to bfloat16)
for each residual block:
    x = x + temporal_block(RMSNorm(x))     # RG-LRU recurrent block or local MQA
    x = x + MLP(RMSNorm(x))
logits = soft_cap(RMSNorm(x) @ embed.T)   # soft_cap(z) = tanh(z / c) * c

Parameter names are Hugging Face's (without the leading ``model.``), so a
state dict of this module is a Hugging Face checkpoint.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from rgemma import kernels, step_plan, weights
from rgemma.attention import LocalAttentionBlock
from rgemma.config import RECURRENT, GriffinConfig
from rgemma.layers import Chunk, Embedding, MLPBlock, RecurrentBlock, RMSNorm
from rgemma.state import State, clone_layer

LogitsMode = Literal["all", "last", "none"]
PREFILL_PIECE = 512  # CPU inference: prompt rows (B x T) per pass (Griffin._piece_length)


class InputError(ValueError):
    """Inputs to the model that it cannot process (wrong shapes, ids, state)."""


class ResidualBlock(nn.Module):
    """x + temporal(norm(x)), then + MLP(norm(.)).

    The projections that end each branch start smaller (init scale 2 / layers),
    so the residual stream's variance does not grow with depth.
    """

    def __init__(self, config: GriffinConfig, kind: str, **factory):
        super().__init__()
        self.kind = kind
        final = 2.0 / config.num_layers
        self.temporal_pre_norm = RMSNorm(config.width, config.rms_norm_eps, **factory)
        self.temporal_block = (
            RecurrentBlock(config.width, config.lru_width, config.num_heads,
                           config.conv1d_width, final_init_scale=final, **factory)
            if kind == RECURRENT
            else LocalAttentionBlock(config.width, config.num_heads, config.attention_window,
                                     config.rope_base, final_init_scale=final, **factory)
        )  # fmt: skip
        self.channel_pre_norm = RMSNorm(config.width, config.rms_norm_eps, **factory)
        self.mlp_block = MLPBlock(config.width, config.mlp_width, final_init_scale=final, **factory)

    def forward(
        self,
        x: torch.Tensor,
        layer_state,
        chunk: Chunk,
        ring_index: torch.Tensor | None,
        step: bool = False,
    ) -> torch.Tensor:
        """x: [B, T, D] -> [B, T, D]; updates ``layer_state`` in place.

        step: T == 1 decode, through the temporal block's ``step`` (same math).
        """
        normed = self.temporal_pre_norm(x)
        mix = self.temporal_block.step if step else self.temporal_block
        if self.kind == RECURRENT:
            mixed = mix(normed, layer_state, chunk)
        else:
            mixed = mix(normed, layer_state, chunk, ring_index)
        residual = mixed + x
        return self.mlp_block(self.channel_pre_norm(residual)) + residual


class Griffin(nn.Module):
    """RecurrentGemma / Griffin / Hawk language model."""

    def __init__(
        self,
        config: GriffinConfig,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.config = config
        factory = {"dtype": dtype, "device": device}
        self.embed_tokens = Embedding(config.vocab_size, config.width, **factory)
        self.layers = nn.ModuleList(
            ResidualBlock(config, kind, **factory) for kind in config.block_types
        )
        self.final_norm = RMSNorm(config.width, config.rms_norm_eps, **factory)
        self.gradient_checkpointing = False
        # dtype of the activations; None = the weights' dtype (the official numerics).
        # float32 with bfloat16 weights: half the memory, fp32 speed on CPUs without bf16.
        self.compute_dtype: torch.dtype | None = None
        self._compiled_step = None
        self._graphed_step = None

    # ---------------------------------------------------------------- facts
    @property
    def dtype(self) -> torch.dtype:
        """The dtype the (float) weights are held in."""
        return self.final_norm.weight.dtype

    @property
    def activation_dtype(self) -> torch.dtype:
        return self.compute_dtype or self.dtype

    def set_compute_dtype(self, dtype: torch.dtype | None) -> Griffin:
        """Multiply in ``dtype`` whatever dtype the weights are held in (None = theirs)."""
        self.compute_dtype = dtype
        return self

    @property
    def device(self) -> torch.device:
        return self.final_norm.weight.device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def init_state(
        self,
        batch_size: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> State:
        """An empty state for ``batch_size`` rows (K/V and conv in the activation dtype)."""
        return State.empty(
            self.config,
            batch_size,
            dtype=dtype or self.activation_dtype,
            device=device or self.device,
        )

    # -------------------------------------------------------------- forward
    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        state: State | None = None,
        *,
        logits: LogitsMode = "all",
    ) -> tuple[torch.Tensor | None, State]:
        """Runs T tokens of B rows on top of ``state`` (updated in place and returned).

        Args:
          tokens: [B, T] token ids.
          positions: [B, T] segment positions: 0 starts a document (resets the
            recurrence, the conv and attention), -1 marks padding, which
            influences nothing and leaves the state untouched.
          state: from ``init_state`` or a previous call; None = empty.
          logits: "all" -> [B, T, V]; "last" -> [B, V] at each row's last real
            token; "none" -> None (prefill only).
        Returns:
          (logits, state).
        """
        tokens, positions = self._check_inputs(tokens, positions, logits)
        if state is None:
            state = self.init_state(tokens.shape[0])
        elif state.batch_size != tokens.shape[0]:
            raise InputError(
                f"state has {state.batch_size} rows but tokens have "
                f"{tokens.shape[0]}; use state.select(...) or init_state(B)"
            )
        elif len(state.layers) != self.config.num_layers:
            raise InputError("state comes from a model with a different number of layers")

        step = tokens.shape[1] == 1 and not (self.training and torch.is_grad_enabled())
        if step:
            return self._step(tokens, positions, state, logits), state
        order = _left_pad_order(positions)
        if order is not None:
            tokens, positions = tokens.gather(1, order), positions.gather(1, order)

        pieces = []  # logits of each piece, for logits="all"
        n = self._piece_length(tokens)
        for a in range(0, max(tokens.shape[1], 1), n):
            b = a + n
            chunk = Chunk.build(positions[:, a:b], state.num_tokens, state.doc_start)
            x = self._blocks(self.embed(tokens[:, a:b]), state, chunk, step=False)
            if logits == "all":
                pieces.append(self.logits(x))
        if logits == "none":
            return None, state
        if logits == "last":
            return self.logits(x[:, -1]), state
        out = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
        if order is not None:
            out = torch.empty_like(out).scatter_(1, order[..., None].expand_as(out), out)
        return out, state

    def _piece_length(self, tokens: torch.Tensor) -> int:
        """Tokens per pass of a prompt. The state carries everything from one pass to
        the next, so a prompt may be run in pieces with the same result; on the CPU,
        without autograd, passes of about PREFILL_PIECE rows (B x tokens) keep each
        layer's intermediates ([B, T, mlp_width] float32) nearer the caches, and the
        elementwise work between the products is bound by memory."""
        if tokens.device.type == "cpu" and not torch.is_grad_enabled():
            return max(PREFILL_PIECE // max(tokens.shape[0], 1), 1)
        return max(tokens.shape[1], 1)

    def _blocks(self, x: torch.Tensor, state: State, chunk: Chunk, step: bool) -> torch.Tensor:
        """All residual blocks on x [B, T, D]; updates the state in place."""
        ring_index = None
        if self.config.attention_layers:
            window = self.config.attention_window
            ring_index = state.ring_positions(window)
            if ring_index.device.type == "cpu" and not torch.compiler.is_compiling():
                # attention reads only the slots that can hold keys: a context shorter
                # than the window costs its length, not the window's (a compiled or
                # CUDA-graphed step keeps the fixed shape)
                ring_index = ring_index[:, : state.ring_slots_in_use(window)]
        if step and step_plan.applies(x):  # the same blocks, as prepared native calls
            x = step_plan.PLANS.get(self, state).run(x, state, chunk, ring_index)
        else:
            for block, layer_state in zip(self.layers, state.layers):
                if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                    x = _checkpointed(block, x, layer_state, chunk, ring_index)
                else:
                    x = block(x, layer_state, chunk, ring_index, step)
        state.num_tokens.copy_(state.num_tokens + chunk.is_real.sum(dim=1))
        state.doc_start.copy_(chunk.doc_start[:, -1])
        return x

    def _step(
        self, tokens: torch.Tensor, positions: torch.Tensor, state: State, logits: LogitsMode
    ) -> torch.Tensor | None:
        """One decode step (T == 1): no checks, no Python branching on values, so
        ``torch.compile`` can capture it whole (see ``compile_step``)."""
        if self._graphed_step is not None and tokens.is_cuda:
            return self._graphed_step(tokens, positions, state, logits)
        fn = self._compiled_step or self._step_eager
        return fn(tokens, positions, state, logits)

    def _step_eager(self, tokens, positions, state, logits):
        chunk = Chunk.for_step(positions, state.num_tokens, state.doc_start)
        x = self._blocks(self.embed(tokens), state, chunk, step=True)
        if logits == "none":
            return None
        z = self.logits(x)
        return z[:, -1] if logits == "last" else z

    def compile_step(self, enable: bool = True, **compile_kwargs) -> Griffin:
        """Compiles the decode step with ``torch.compile`` (CPU: C++ codegen, needs a
        compiler; CUDA: add ``capture_step()`` to replay it as CUDA graphs, since
        ``mode="reduce-overhead"`` skips graphs for steps that update their inputs
        in place, as this one does). The first steps are slow while it compiles."""
        if enable and self.device.type == "cpu":
            kernels.available()  # builds rgemma's kernels now: a compiled step cannot
        self._compiled_step = (
            torch.compile(self._step_eager, dynamic=False, **compile_kwargs) if enable else None
        )
        if self._graphed_step is not None:  # recorded graphs hold the old function
            self.capture_step()
        return self

    def capture_step(self, enable: bool = True, max_graphs: int = 8) -> Griffin:
        """CUDA: record the decode step as CUDA graphs and replay them.

        A decode step is hundreds of small kernels; at batch 1 launching them
        costs more than running them. A graph is recorded per (state, batch
        size, logits mode) the first time that state is stepped, then each step
        replays it: the state is updated in place, as by the eager step. Works
        with ``compile_step()`` (default mode) too. No effect on the CPU.
        """
        self._graphed_step = _GraphedStep(self, max_graphs) if enable else None
        return self

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, T] -> [B, T, D], scaled by sqrt(D) rounded to bfloat16."""
        x = self.embed_tokens(tokens).to(self.activation_dtype)
        if self.config.embeddings_scale_by_sqrt_dim:
            scale = torch.tensor(math.sqrt(self.config.width), dtype=torch.bfloat16)
            x = x * scale.to(x.dtype)
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """[..., D] -> [..., V]: final norm, tied embeddings, soft-cap."""
        z = self.embed_tokens.attend(self.final_norm(x))  # tied table (maybe quantized)
        c = self.config.logits_soft_cap
        return torch.tanh(z / c) * c if c else z

    def _check_inputs(self, tokens, positions, logits) -> tuple[torch.Tensor, torch.Tensor]:
        if logits not in ("all", "last", "none"):
            raise InputError(f"logits must be 'all', 'last' or 'none', got {logits!r}")
        tokens = torch.as_tensor(tokens, device=self.device)
        positions = torch.as_tensor(positions, device=self.device)
        if tokens.ndim != 2 or positions.shape != tokens.shape:
            raise InputError(
                f"tokens and positions must both be [B, T]; got {tuple(tokens.shape)} "
                f"and {tuple(positions.shape)}"
            )
        if tokens.is_floating_point() or positions.is_floating_point():
            raise InputError("tokens and positions must be integer tensors")
        if tokens.numel() and (
            int(tokens.min()) < 0 or int(tokens.max()) >= self.config.vocab_size
        ):
            raise InputError(
                f"token ids must be in [0, {self.config.vocab_size}); got "
                f"{int(tokens.min())}..{int(tokens.max())}"
            )
        if positions.numel() and int(positions.min()) < -1:
            raise InputError("positions must be >= 0, or -1 for padding")
        return tokens.long(), positions.long()

    # ------------------------------------------------------------ weights
    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> Griffin:
        """Random initialisation for training: every module's ``reset_parameters``
        (the Griffin paper's scales), drawn from one generator seeded by ``seed``."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for module in self.modules():
            if next(module.parameters(recurse=False), None) is not None:
                module.reset_parameters(generator=gen)
        return self

    @classmethod
    def from_hf_state_dict(cls, sd, config: GriffinConfig, *, dtype=None, device=None) -> Griffin:
        """A model from a Hugging Face state dict (with or without ``model.``)."""

        sd = weights.strip_hf_prefix(sd)
        weights.check_state_dict(sd, config, source="Hugging Face state dict")
        return cls._from_our_state_dict(sd, config, dtype=dtype, device=device)

    @classmethod
    def from_official_state_dict(
        cls, sd, config: GriffinConfig, *, dtype=None, device=None
    ) -> Griffin:
        """A model from the official ``recurrentgemma.torch.Griffin`` state dict."""

        sd = weights.official_to_hf(sd)
        weights.check_state_dict(sd, config, source="official state dict")
        return cls._from_our_state_dict(sd, config, dtype=dtype, device=device)

    @classmethod
    def _from_our_state_dict(cls, sd, config, *, dtype, device) -> Griffin:
        if dtype is None:
            dtype = next(iter(sd.values())).dtype
        with torch.device("meta"):
            model = cls(config, dtype=dtype)
        model.to_empty(device=device or "cpu")
        with torch.no_grad():
            for name, p in model.state_dict().items():
                p.copy_(sd[name])
        return model


class _GraphedStep:
    """The decode step as CUDA graphs, keyed by the state's storage, batch size and
    logits mode (least recently used dropped past ``max_graphs``)."""

    def __init__(self, model: Griffin, max_graphs: int):
        self.model, self.max_graphs = model, max_graphs
        self.graphs: dict[tuple, dict] = {}

    def __call__(
        self, tokens: torch.Tensor, positions: torch.Tensor, state: State, logits: LogitsMode
    ) -> torch.Tensor | None:
        key = (
            logits,
            tuple(tokens.shape),
            torch.is_inference_mode_enabled(),
            tuple((t.data_ptr(), t.dtype) for t in state.tensors().values()),
        )
        rec = self.graphs.pop(key, None) or self._record(tokens, positions, state, logits)
        self.graphs[key] = rec  # most recently used last
        while len(self.graphs) > self.max_graphs:
            del self.graphs[next(iter(self.graphs))]
        rec["tokens"].copy_(tokens)
        rec["positions"].copy_(positions)
        rec["graph"].replay()
        return None if rec["out"] is None else rec["out"].clone()

    def _record(self, tokens, positions, state, logits) -> dict:
        step = self.model._compiled_step or self.model._step_eager
        static_tokens, static_positions = tokens.clone(), positions.clone()
        before = state.clone()  # warm-up runs step the state: undo them
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step(static_tokens, static_positions, state, logits)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # recorded, not run
            out = step(static_tokens, static_positions, state, logits)
        state.copy_(before)
        return {"graph": graph, "tokens": static_tokens, "positions": static_positions, "out": out}


def _checkpointed(
    block: ResidualBlock, x: torch.Tensor, layer_state, chunk: Chunk, ring_index
) -> torch.Tensor:
    """Activation checkpointing of one block. The block updates its state in place,
    so backward's recomputation must start from a copy of the state as it was."""
    before = clone_layer(layer_state)

    def run(x: torch.Tensor) -> torch.Tensor:
        work = clone_layer(before)
        y = block(x, work, chunk, ring_index)
        with torch.no_grad():
            for name, t in layer_state.tensors().items():
                t.copy_(work.tensors()[name])
        return y

    return torch.utils.checkpoint.checkpoint(run, x, use_reentrant=False)


def _left_pad_order(positions: torch.Tensor) -> torch.Tensor | None:
    """A per-row permutation moving padding (-1) to the left, or None if it is there."""
    is_real = positions >= 0
    if not bool((is_real[:, :-1] & ~is_real[:, 1:]).any()):
        return None
    return torch.sort(is_real.to(torch.int8), dim=1, stable=True).indices
