"""LoRA: low-rank adapters on ``nn.Linear`` layers (Hu et al., 2021).

    y = x W^T + b + (alpha / r) * (x A^T) B^T        A: [r, in], B: [out, r]

W and b are frozen; only A and B train. B starts at zero, so an adapted
model starts as the base model. ``merge`` folds the update into W
(W += (alpha / r) B A) and turns each adapted layer back into a plain
``nn.Linear``, so the exported model has the base model's exact layout.

``LoRALinear`` subclasses ``nn.Linear``: its weight and bias keep their names
(``...q_proj.weight``), the adapters add ``...q_proj.lora_A`` / ``lora_B``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# Every Linear of a Griffin block, by module name.
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
RECURRENT_TARGETS = ("linear_x", "linear_y", "linear_out")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
ALL_TARGETS = ATTENTION_TARGETS + RECURRENT_TARGETS + MLP_TARGETS
DEFAULT_TARGETS = ATTENTION_TARGETS + RECURRENT_TARGETS


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` with a frozen weight and a trainable low-rank update."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float,
        bias: bool = True,
        **factory,
    ):
        super().__init__(in_features, out_features, bias=bias, **factory)
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.rank = rank
        self.alpha = alpha
        self.base_class: type[nn.Linear] = nn.Linear  # what ``merged`` turns back into
        self.lora_A = nn.Parameter(torch.zeros(rank, in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, **factory))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, rank: int, alpha: float, generator: torch.Generator | None = None
    ) -> LoRALinear:
        """Wraps an existing layer (sharing its weight and bias tensors)."""
        w = linear.weight
        with torch.device("meta"):
            new = cls(
                linear.in_features,
                linear.out_features,
                rank,
                alpha,
                bias=linear.bias is not None,
                dtype=w.dtype,
            )
        new.base_class = type(linear)
        new.weight = linear.weight
        new.bias = linear.bias
        new.lora_A = nn.Parameter(
            torch.empty(rank, linear.in_features, dtype=w.dtype, device=w.device)
        )
        new.lora_B = nn.Parameter(
            torch.zeros(linear.out_features, rank, dtype=w.dtype, device=w.device)
        )
        new.reset_lora(generator)
        new.weight.requires_grad_(False)
        if new.bias is not None:
            new.bias.requires_grad_(False)
        return new

    @torch.no_grad()
    def reset_lora(self, generator: torch.Generator | None = None) -> None:
        """A ~ U(-1/sqrt(in), 1/sqrt(in)) (Kaiming-uniform, a=sqrt(5)); B = 0."""
        bound = 1.0 / math.sqrt(self.in_features)
        a = torch.rand(self.lora_A.shape, generator=generator) * 2 * bound - bound
        self.lora_A.copy_(a)
        self.lora_B.zero_()

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) B A: the update to W, [out, in]."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Computed in the input's dtype (weights may be held in another)."""
        w, b, lora_a, lora_b = self.weight, self.bias, self.lora_A, self.lora_B
        if w.dtype != x.dtype:
            w, lora_a, lora_b = w.to(x.dtype), lora_a.to(x.dtype), lora_b.to(x.dtype)
            b = None if b is None else b.to(x.dtype)
        base = F.linear(x, w, b)
        return base + F.linear(F.linear(x, lora_a), lora_b) * self.scaling

    def merged(self) -> nn.Linear:
        """A layer of the adapted layer's class with W + (alpha / r) B A."""
        with torch.device("meta"):
            out = self.base_class(
                self.in_features,
                self.out_features,
                bias=self.bias is not None,
                dtype=self.weight.dtype,
            )
        with torch.no_grad():
            w = self.weight.float() + self.delta_weight().float()
            out.weight = nn.Parameter(w.to(self.weight.dtype), requires_grad=True)
            if self.bias is not None:
                out.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=True)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


def parse_targets(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """ "q_proj,v_proj" / "attention" / "recurrent" / "mlp" / "all" -> module names."""
    if spec is None:
        return DEFAULT_TARGETS
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    groups = {
        "attention": ATTENTION_TARGETS,
        "recurrent": RECURRENT_TARGETS,
        "mlp": MLP_TARGETS,
        "all": ALL_TARGETS,
    }
    out: list[str] = []
    for item in (s.strip() for s in items):
        if not item:
            continue
        names = groups.get(item, (item,))
        for n in names:
            if n not in ALL_TARGETS:
                raise ValueError(
                    f"unknown LoRA target {n!r}; choose from "
                    f"{', '.join(ALL_TARGETS)} or attention/recurrent/mlp/all"
                )
            if n not in out:
                out.append(n)
    if not out:
        raise ValueError("no LoRA targets given")
    return tuple(out)


def apply_lora(
    model: nn.Module,
    rank: int,
    alpha: float | None = None,
    targets: Iterable[str] | str | None = None,
    seed: int = 0,
) -> list[str]:
    """Replaces the targeted ``nn.Linear`` modules by ``LoRALinear`` in place.

    Freezes every parameter of the model except the adapters. Returns the
    names of the adapted modules. ``alpha`` defaults to ``rank`` (scaling 1).
    """
    targets = parse_targets(targets)
    alpha = float(rank if alpha is None else alpha)
    generator = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    adapted = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if (
                child_name in targets
                and isinstance(child, nn.Linear)
                and not isinstance(child, LoRALinear)
            ):
                setattr(module, child_name, LoRALinear.from_linear(child, rank, alpha, generator))
                adapted.append(f"{name}.{child_name}" if name else child_name)
    if not adapted:
        raise ValueError(f"no nn.Linear named {', '.join(targets)} in the model")
    return adapted


def merge(model: nn.Module) -> nn.Module:
    """Folds every adapter into its weight, in place; returns the model.

    Afterwards the model has no ``LoRALinear`` left and the same parameter
    names and shapes as before ``apply_lora``; all parameters trainable again.
    """
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' parameters (what an optimizer should train)."""
    return [p for n, p in model.named_parameters() if n.endswith(("lora_A", "lora_B"))]


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())
