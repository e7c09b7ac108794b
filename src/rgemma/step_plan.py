"""The CPU decode step as a list of prepared calls on fixed buffers.

Between its weight reads, an eager decode step makes a few hundred Python
calls: module calls, the choice of each product's path, and the conversions,
checks and allocations around every native call. At batch 1 on a large model
they are a sizable part of a step that should be bound by reading the weights.
A plan makes those choices once, for one model, batch size and state: every
native call of the step (``kernels.*_into``) is bound to the model's weights,
the state's tensors and buffers of the plan's own, so a step is a loop over
calls without arguments. Whatever has no native call (a product on another
path, a block whose step kernel does not take its tensors) runs through its
module, writing into the same buffers. A plan runs the same operations in the
same order as the modules' step, so both give the same logits and states, bit
for bit (``tests/test_step_plan.py``).

A plan holds its model's tensors and the state's by address. ``Plans.get``
keys a plan by the state's addresses (the engine steps a new ``State`` of views
of one batch state every time) and checks that the model still holds the
tensors the plan was built on (weights replaced or moved, a module swapped:
a new plan, and the plans on the old tensors are dropped, freeing them).

Residual block, as bound (buffers [B, D] x, normed, out; the temporal block's
and the MLP's their own):

    normed = temporal_pre_norm(x)
    out = temporal step(normed)              # recurrent: linear_x, linear_y ->
                                             # recurrent_step -> linear_out;
                                             # attention: q, k, v -> attend -> o
    x += out
    normed = channel_pre_norm(x)
    out = down(gelu(gate(normed)) * up(normed));  x += out
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import nn

from rgemma import kernels
from rgemma.attention import LocalAttentionBlock
from rgemma.layers import Chunk, RecurrentBlock, gelu
from rgemma.state import State

ENABLED = True  # False: the modules' own step, always (for comparisons)
MAX_ROWS = 16  # the native products' and RMSNorm's few-row paths

Call = Callable[[], None]


def applies(x: torch.Tensor) -> bool:
    """Whether a decode step on x [B, 1, D] runs through a plan: float32 on the CPU,
    at most MAX_ROWS rows, without autograd or a compiler, the kernels built."""
    return (
        ENABLED
        and x.shape[0] <= MAX_ROWS
        and x.dtype == torch.float32
        and x.device.type == "cpu"
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and kernels.available()
    )


class StepPlan:
    """The residual blocks of one decode step of ``model`` on ``state`` ([B] rows)."""

    def __init__(self, model: nn.Module, state: State):
        cfg = model.config
        self.batch, self.width = state.batch_size, cfg.width
        self.buffers: list[torch.Tensor] = []  # every tensor the calls write, kept alive here
        self.x, self.normed, self.out = (self._buffer(cfg.width) for _ in range(3))
        self.reset, self.real = (self._buffer(dtype=torch.bool) for _ in range(2))
        # the current step's state and facts, while it runs: the plan holds the state it
        # was built on by address only (``Plans`` keys plans by those addresses)
        self.state: State | None = None
        self.chunk: Chunk | None = None
        self.ring_index: torch.Tensor | None = None
        self.held = _held_tensors(model)
        self.calls: list[Call] = []
        for i, (block, layer_state) in enumerate(zip(model.layers, state.layers)):
            self.calls += self._block(i, block, layer_state)

    def valid(self) -> bool:
        """Whether the model still holds the tensors (and modules) the plan was built on."""
        modules, tensors = self.held
        return all(d.get(k) is v for d, k, v in modules) and all(
            d.get(k) is t and t.data_ptr() == p for d, k, t, p in tensors
        )

    def run(
        self, x: torch.Tensor, state: State, chunk: Chunk, ring_index: torch.Tensor
    ) -> torch.Tensor:
        """The residual blocks on x [B, 1, D] -> [B, 1, D]; updates ``state`` (one with this
        plan's ``state_key``) in place."""
        self.state, self.chunk, self.ring_index = state, chunk, ring_index
        self.x.copy_(x.view(self.batch, self.width))
        self.reset.copy_(chunk.reset[:, 0])
        self.real.copy_(chunk.is_real[:, 0])
        try:
            for call in self.calls:
                call()
        finally:
            self.state = self.chunk = self.ring_index = None
        return self.x.view(x.shape).clone()

    # ------------------------------------------------------------- binding

    def _buffer(self, *width: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A new buffer [B, *width], held by the plan (the bound calls hold addresses only)."""
        t = torch.zeros(self.batch, *width, dtype=dtype)
        self.buffers.append(t)
        return t

    def _block(self, i: int, block: nn.Module, layer_state) -> list[Call]:
        """Block i on x, in place; layer_state: the state's layer i, by address."""
        temporal = self._temporal(i, block.temporal_block, layer_state)
        if temporal is None:  # the whole block through its module
            return [self._module_block(i, block)]
        return [
            self._norm(block.temporal_pre_norm),
            *temporal,
            self._add_out,
            self._norm(block.channel_pre_norm),
            *self._mlp(block.mlp_block),
            self._add_out,
        ]

    def _add_out(self) -> None:
        self.x.add_(self.out)

    def _temporal(self, i: int, block: nn.Module, layer_state) -> list[Call] | None:
        """The temporal block's step, normed -> out; None where its step kernel does not
        take these tensors."""
        B = self.batch
        if isinstance(block, RecurrentBlock):
            ux, uy, z = (self._buffer(block.linear_x.out_features) for _ in range(3))
            step = block.native_step_into(ux, uy, layer_state, self.reset, self.real, z)
            if step is None:
                return None
            return [
                self._product(block.linear_x, self.normed, ux),
                self._product(block.linear_y, self.normed, uy),
                step,
                self._product(block.linear_out, z, self.out),
            ]
        if isinstance(block, LocalAttentionBlock):
            H, Dh = block.num_heads, block.head_dim
            q, attended, k, v = (self._buffer(n) for n in (H * Dh, H * Dh, Dh, Dh))
            if not block._native_step(q, layer_state):
                return None

            def attend() -> None:
                layer, chunk = self.state.layers[i], self.chunk
                out = block.native_attend(q.view(B, H, Dh), k, v, layer, chunk, self.ring_index)
                attended.copy_(out.view(B, H * Dh))

            return [
                self._product(block.q_proj, self.normed, q),
                self._product(block.k_proj, self.normed, k),
                self._product(block.v_proj, self.normed, v),
                attend,
                self._product(block.o_proj, attended, self.out),
            ]
        return None

    def _mlp(self, mlp: nn.Module) -> list[Call]:
        """``MLPBlock.forward``: normed -> out."""
        gate, up = (self._buffer(mlp.gate_proj.out_features) for _ in range(2))

        def gated() -> None:
            torch.mul(gelu(gate), up, out=gate)

        return [
            self._product(mlp.gate_proj, self.normed, gate),
            self._product(mlp.up_proj, self.normed, up),
            gated,
            self._product(mlp.down_proj, gate, self.out),
        ]

    def _norm(self, norm: nn.Module) -> Call:
        """x -> normed."""
        return norm.native_into(self.x, self.normed) or _through(norm, self.x, self.normed)

    @staticmethod
    def _product(linear: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Call:
        native = getattr(linear, "native_into", None)
        return (native and native(x, y)) or _through(linear, x, y)

    def _module_block(self, i: int, block: nn.Module) -> Call:
        B, D = self.batch, self.width

        def through_module() -> None:
            layer = self.state.layers[i]
            out = block(self.x.view(B, 1, D), layer, self.chunk, self.ring_index, True)
            self.x.copy_(out.view(B, D))

        return through_module


def _through(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Call:
    """y = module(x) through the module's own forward (no native call for it)."""

    def through_module() -> None:
        y.copy_(module(x))

    return through_module


def _held_tensors(model: nn.Module) -> tuple[list, list]:
    """What the plan's calls hold of ``model``'s blocks: (dict, key, value) for every
    submodule, a quantized layer's tuned paths and an absent parameter, and (dict, key,
    tensor, address) for every parameter and buffer."""
    modules, tensors = [], []
    for module in model.layers.modules():
        modules += [(module._modules, k, v) for k, v in module._modules.items()]
        if "paths" in vars(module):  # a quantized layer's tuned products
            modules.append((vars(module), "paths", module.paths))
        for d in (module._parameters, module._buffers):
            tensors += [(d, k, t, t.data_ptr()) for k, t in d.items() if t is not None]
            modules += [(d, k, None) for k, t in d.items() if t is None]  # e.g. no bias
    return modules, tensors


def state_key(state: State) -> tuple:
    """The state's tensors by address, dtype and layout: a plan bound to one state runs
    any state with the same key (the same memory, e.g. views of one batch state)."""
    return tuple(
        (t.data_ptr(), t.dtype, t.is_contiguous())
        for layer in state.layers
        for t in layer.tensors().values()
    )


class Plans:
    """Each model's plans, by batch size, thread count and state (the last few)."""

    KEEP = 4

    def __init__(self):
        self._by_model: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def get(self, model: nn.Module, state: State) -> StepPlan:
        plans = self._by_model.setdefault(model, {})
        key = (state.batch_size, torch.get_num_threads(), state_key(state))
        plan = plans.pop(key, None)
        if plan is None or not plan.valid():
            for stale in [k for k, p in plans.items() if not p.valid()]:
                del plans[stale]  # (they hold weights the model no longer has)
            plan = StepPlan(model, state)
        plans[key] = plan  # the most recent last
        while len(plans) > self.KEEP:
            plans.pop(next(iter(plans)))
        return plan


PLANS = Plans()
