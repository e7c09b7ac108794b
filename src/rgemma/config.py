"""GriffinConfig: the shape of a RecurrentGemma / Griffin / Hawk model.

A small dataclass, presets by name, and the Hugging Face ``config.json``
round trip (``model_type: recurrent_gemma``).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

RECURRENT = "recurrent"
ATTENTION = "attention"
BLOCK_KINDS = (RECURRENT, ATTENTION)


class ConfigError(ValueError):
    """A model configuration that cannot describe a valid model."""


# Largest accepted value of each size: far above any published model (2B: vocabulary
# 256,000, width 2,560, 26 layers, window 2,048), so that a corrupt or hostile config.json
# is refused before anything is allocated from it.
MAX_SIZES = {
    "vocab_size": 1 << 22,
    "width": 1 << 16,
    "mlp_width": 1 << 18,
    "num_heads": 1 << 12,
    "lru_width": 1 << 16,
    "attention_window": 1 << 20,
    "conv1d_width": 1 << 8,
    "num_layers": 1 << 12,
}


def check_size(name: str, value: Any) -> int:
    """``value`` as a positive int no larger than MAX_SIZES[name], else ConfigError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise ConfigError(f"GriffinConfig.{name} must be a positive integer, got {value!r}")
    value = int(value)
    if value <= 0:
        raise ConfigError(f"GriffinConfig.{name} must be a positive integer, got {value!r}")
    if value > MAX_SIZES[name]:
        raise ConfigError(
            f"GriffinConfig.{name} is {value}; rgemma accepts at most "
            f"{MAX_SIZES[name]} (a larger value means a corrupt config)"
        )
    return value


def griffin_pattern(num_layers: int) -> tuple[str, ...]:
    """(recurrent, recurrent, attention) repeated: layer i is attention iff i % 3 == 2."""
    return tuple(ATTENTION if i % 3 == 2 else RECURRENT for i in range(num_layers))


@dataclasses.dataclass(frozen=True)
class GriffinConfig:
    """Hyper-parameters of a Griffin model (https://arxiv.org/abs/2402.19427).

    Attributes:
      vocab_size: number of tokens (embedding rows; logits are tied to them).
      width: model width D (embedding size, residual stream).
      mlp_width: hidden width of the GeGLU MLP (official ``mlp_expanded_width``;
        Hugging Face's ``intermediate_size`` is twice this).
      num_heads: attention heads, and the number of diagonal blocks of the
        RG-LRU gates. Must divide ``width`` and ``lru_width``.
      block_types: one of "recurrent" / "attention" per residual block.
      lru_width: width of the recurrent branch (defaults to ``width``).
      attention_window: local attention window W: a query at q sees keys
        k with 0 <= q - k <= W.
      logits_soft_cap: c in tanh(logits / c) * c; 0 disables it.
      embeddings_scale_by_sqrt_dim: scale embeddings by sqrt(width) rounded
        to bfloat16.
      conv1d_width: temporal width of the causal depthwise convolution.
      rms_norm_eps: epsilon of RMSNorm.
      rope_base: RoPE max wavelength.
    """

    vocab_size: int = 256_000
    width: int = 2560
    mlp_width: int = 7680
    num_heads: int = 10
    block_types: tuple[str, ...] = griffin_pattern(26)
    lru_width: int | None = None
    attention_window: int = 2048
    logits_soft_cap: float = 30.0
    embeddings_scale_by_sqrt_dim: bool = True
    conv1d_width: int = 4
    rms_norm_eps: float = 1e-6
    rope_base: float = 10_000.0
    pad_token_id: int = 0
    eos_token_id: int = 1
    bos_token_id: int = 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_types", tuple(self.block_types))
        if self.lru_width is None:
            object.__setattr__(self, "lru_width", self.width)
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raises ConfigError naming the field and the fix when the shape is invalid."""
        for name in (
            "vocab_size",
            "width",
            "mlp_width",
            "num_heads",
            "lru_width",
            "attention_window",
            "conv1d_width",
        ):
            value = getattr(self, name)
            if not isinstance(value, int):
                raise ConfigError(f"GriffinConfig.{name} must be a positive integer, got {value!r}")
            check_size(name, value)
        check_size("num_layers", len(self.block_types) or 1)
        if not self.block_types:
            raise ConfigError(
                "GriffinConfig.block_types is empty: a model needs at least one block"
            )
        bad = [b for b in self.block_types if b not in BLOCK_KINDS]
        if bad:
            raise ConfigError(
                f"GriffinConfig.block_types has unknown kinds {sorted(set(bad))}; "
                f"each must be one of {BLOCK_KINDS}"
            )
        if self.width % self.num_heads:
            raise ConfigError(
                f"width {self.width} is not divisible by num_heads {self.num_heads}: "
                "choose num_heads dividing width"
            )
        if self.lru_width % self.num_heads:
            raise ConfigError(
                f"lru_width {self.lru_width} is not divisible by num_heads {self.num_heads}: "
                "the RG-LRU gates are block-diagonal with one block per head"
            )
        if ATTENTION in self.block_types and (self.head_dim % 4):
            raise ConfigError(
                f"head_dim {self.head_dim} (width / num_heads) must be divisible by 4 "
                "(RoPE rotates pairs in the first half of each head)"
            )
        if self.logits_soft_cap < 0:
            raise ConfigError(
                f"logits_soft_cap must be >= 0 (0 disables it), got {self.logits_soft_cap}"
            )

    # --------------------------------------------------------------- derived
    @property
    def num_layers(self) -> int:
        return len(self.block_types)

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def attention_layers(self) -> tuple[int, ...]:
        return tuple(i for i, b in enumerate(self.block_types) if b == ATTENTION)

    @property
    def recurrent_layers(self) -> tuple[int, ...]:
        return tuple(i for i, b in enumerate(self.block_types) if b == RECURRENT)

    def replace(self, **changes: Any) -> GriffinConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["block_types"] = list(self.block_types)
        return d

    def fingerprint(self) -> str:
        """A short string that identifies the architecture (for state files)."""
        import hashlib

        keys = (
            "vocab_size",
            "width",
            "mlp_width",
            "num_heads",
            "block_types",
            "lru_width",
            "attention_window",
            "conv1d_width",
        )
        blob = json.dumps({k: self.to_dict()[k] for k in keys}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    # ---------------------------------------------------------------- presets
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> GriffinConfig:
        """A preset by name: recurrentgemma-2b(-it), recurrentgemma-9b(-it), griffin-7b, hawk-7b."""
        key = name.lower().removesuffix("-it")
        if key not in PRESETS:
            raise ConfigError(
                f"unknown preset {name!r}; known presets: {', '.join(preset_names())}"
            )
        return cls(**{**PRESETS[key], **overrides})

    # ---------------------------------------------------------- Hugging Face
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> GriffinConfig:
        """Reads a Hugging Face RecurrentGemma ``config.json`` dictionary."""
        model_type = d.get("model_type")
        if model_type != "recurrent_gemma":
            raise ConfigError(
                f"config.json has model_type {model_type!r}; rgemma reads only 'recurrent_gemma' "
                "(RecurrentGemma / Griffin checkpoints)"
            )
        missing = [
            k
            for k in (
                "num_hidden_layers",
                "hidden_size",
                "num_attention_heads",
                "intermediate_size",
            )
            if k not in d
        ]
        if missing:
            raise ConfigError(f"config.json lacks the field {missing[0]!r}")
        num_layers = check_size("num_layers", d["num_hidden_layers"])
        width = check_size("width", d["hidden_size"])
        heads = check_size("num_heads", d["num_attention_heads"])
        intermediate = check_size("mlp_width", d["intermediate_size"])
        kv_heads = d.get("num_key_value_heads")
        if kv_heads is not None and int(kv_heads) != 1:
            raise ConfigError(
                f"config.json: num_key_value_heads is {kv_heads}; RecurrentGemma's local "
                "attention is multi-query (one K/V head): set it to 1"
            )
        pattern = d.get("block_types", d.get("_block_types", [RECURRENT, RECURRENT, ATTENTION]))
        if not isinstance(pattern, (list, tuple)) or not pattern:
            raise ConfigError("config.json: block_types must be a non-empty list")
        pattern = list(pattern)[:num_layers]
        blocks = tuple((pattern * (num_layers // len(pattern) + 1))[:num_layers])
        if intermediate % 2:
            raise ConfigError(
                f"config.json: intermediate_size {intermediate} is odd; for RecurrentGemma it is "
                "twice the MLP width"
            )
        rope = d.get("rope_parameters") or {}
        rope_base = rope.get("rope_theta", d.get("rope_theta", 10_000.0))
        eos = d.get("eos_token_id", 1)
        if isinstance(eos, list):
            eos = eos[0]
        try:
            return cls(
                vocab_size=check_size("vocab_size", d.get("vocab_size", 256_000)),
                width=width,
                mlp_width=intermediate // 2,
                num_heads=heads,
                block_types=blocks,
                lru_width=check_size("lru_width", d.get("lru_width") or width),
                attention_window=check_size(
                    "attention_window", d.get("attention_window_size", 2048)
                ),
                logits_soft_cap=float(d.get("logits_soft_cap") or 0.0),
                embeddings_scale_by_sqrt_dim=bool(d.get("embeddings_scale_by_sqrt_dim", True)),
                conv1d_width=check_size("conv1d_width", d.get("conv1d_width", 4)),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_base=float(rope_base),
                pad_token_id=int(d.get("pad_token_id") or 0),
                eos_token_id=int(eos if eos is not None else 1),
                bos_token_id=int(d["bos_token_id"] if d.get("bos_token_id") is not None else 2),
            )
        except (TypeError, ValueError) as e:  # a field of the wrong JSON type
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"config.json: a field has the wrong type ({e})") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """A Hugging Face ``config.json`` dictionary that ``transformers`` reads.

        ``block_types`` is written as the full per-layer list (HF cycles it to
        ``num_hidden_layers``, which reproduces it exactly). The RoPE fraction
        is 0.5: RoPE rotates the first half of each head.
        """
        return {
            "architectures": ["RecurrentGemmaForCausalLM"],
            "model_type": "recurrent_gemma",
            "vocab_size": self.vocab_size,
            "hidden_size": self.width,
            "intermediate_size": 2 * self.mlp_width,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": 1,
            "head_dim": self.head_dim,
            "lru_width": self.lru_width,
            "attention_window_size": self.attention_window,
            "conv1d_width": self.conv1d_width,
            "logits_soft_cap": self.logits_soft_cap,
            "rms_norm_eps": self.rms_norm_eps,
            "block_types": list(self.block_types),
            "embeddings_scale_by_sqrt_dim": self.embeddings_scale_by_sqrt_dim,
            "hidden_activation": "gelu_pytorch_tanh",
            "rope_theta": self.rope_base,
            "partial_rotary_factor": 0.5,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": self.rope_base,
                "partial_rotary_factor": 0.5,
            },
            "attention_bias": False,
            "tie_word_embeddings": True,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": self.eos_token_id,
            "bos_token_id": self.bos_token_id,
            "torch_dtype": "float32",
        }


def _recurrentgemma(width: int, num_heads: int, num_layers: int) -> dict[str, Any]:
    """RecurrentGemma (the model card's shapes): the MLP 3x wide, the RG-LRU as wide as the
    model, a 2048-token attention window, logits soft-capped at 30."""
    return dict(
        width=width,
        mlp_width=3 * width,
        num_heads=num_heads,
        lru_width=width,
        block_types=griffin_pattern(num_layers),
        attention_window=2048,
        logits_soft_cap=30.0,
        embeddings_scale_by_sqrt_dim=True,
    )


def _paper_7b(block_types: tuple[str, ...]) -> dict[str, Any]:
    """The Griffin paper's 7B models (Griffin, and Hawk without attention)."""
    return dict(
        width=4096,
        mlp_width=3 * 4096,
        num_heads=32,
        lru_width=5632,
        block_types=block_types,
        attention_window=1024,
        logits_soft_cap=0.0,
        embeddings_scale_by_sqrt_dim=False,
    )


PRESETS: dict[str, dict[str, Any]] = {
    "recurrentgemma-2b": _recurrentgemma(2560, num_heads=10, num_layers=26),
    "recurrentgemma-9b": _recurrentgemma(4096, num_heads=16, num_layers=38),
    "griffin-7b": _paper_7b(griffin_pattern(32)),
    "hawk-7b": _paper_7b((RECURRENT,) * 32),
}


def preset_names() -> list[str]:
    names = []
    for key in PRESETS:
        names.append(key)
        if key.startswith("recurrentgemma"):
            names.append(key + "-it")
    return names
