"""Tensor names and layouts: official RecurrentGemma <-> rgemma (Hugging Face).

rgemma's ``Griffin.state_dict()`` uses the Hugging Face RecurrentGemma names
without the leading ``model.`` ("our names"). The official ``recurrentgemma``
package (PyTorch ``recurrentgemma.torch.Griffin`` and the Flax model stored in
Orbax checkpoints) uses other names and, for three tensors, other layouts:

====================================  =========================================
official                              ours
====================================  =========================================
``embedder.input_embedding`` [V, D]   ``embed_tokens.weight`` [V, D]
``final_norm.scale`` [D]              ``final_norm.weight`` [D]
``blocks.i.*_pre_norm.scale``         ``layers.i.*_pre_norm.weight``
``mlp_block.ffw_up.w`` [2, D, M]      ``mlp_block.gate_proj.weight`` = w[0].T,
                                      ``mlp_block.up_proj.weight`` = w[1].T [M, D]
``mlp_block.ffw_up.b`` [2, 1, 1, M]   ``gate_proj.bias`` = b[0], ``up_proj.bias`` = b[1]
``mlp_block.ffw_down.{weight,bias}``  ``mlp_block.down_proj.{weight,bias}``
``recurrent_block.linear_{x,y,out}``  ``temporal_block.linear_{x,y,out}``
``recurrent_block.conv_1d.w`` [K, L]  ``temporal_block.conv_1d.weight`` [L, 1, K] = w.T
``recurrent_block.conv_1d.b`` [L]     ``temporal_block.conv_1d.bias`` [L]
``rg_lru.a_param`` [L]                ``rg_lru.recurrent_param`` [L]
``rg_lru.input_gate.{w,b}``           ``rg_lru.input_gate_{weight,bias}`` (same layout)
``rg_lru.a_gate.{w,b}``               ``rg_lru.recurrent_gate_{weight,bias}``
``attention_block.proj_{q,k,v}``      ``temporal_block.{q,k,v}_proj``
``attention_block.proj_final``        ``temporal_block.o_proj``
====================================  =========================================

(``w[k]`` of the official conv multiplies ``x[t - (K-1-k)]``; so does
``weight[:, 0, k]`` of a causal ``torch.nn.Conv1d`` with ``K-1`` left
padding.) Flax ``Dense`` kernels are ``[in, out]``, i.e. the transpose of the
PyTorch ``Linear`` weights; :func:`flax_to_official` undoes that.

All conversions work tensor by tensor with views where possible, so they also
run on ``meta`` tensors (shapes only) and on memory-mapped checkpoints.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from rgemma.config import ATTENTION, MAX_SIZES, PRESETS, RECURRENT, GriffinConfig

HF_PREFIX = "model."
LM_HEAD = "lm_head.weight"
EMBED = "embed_tokens.weight"


class WeightsError(ValueError):
    """A state dict that does not fit the expected names or shapes."""


# ---------------------------------------------------------------- name tables
# Tensors that are renamed only (identical layout), by block kind. Keys are
# the official names below ``blocks.{i}.``, values ours below ``layers.{i}.``.
_COMMON_RENAMES = {
    "temporal_pre_norm.scale": "temporal_pre_norm.weight",
    "channel_pre_norm.scale": "channel_pre_norm.weight",
    "mlp_block.ffw_down.weight": "mlp_block.down_proj.weight",
    "mlp_block.ffw_down.bias": "mlp_block.down_proj.bias",
}
_RECURRENT_RENAMES = {
    **{
        f"recurrent_block.{lin}.{p}": f"temporal_block.{lin}.{p}"
        for lin in ("linear_x", "linear_y", "linear_out")
        for p in ("weight", "bias")
    },
    "recurrent_block.conv_1d.b": "temporal_block.conv_1d.bias",
    "recurrent_block.rg_lru.a_param": "temporal_block.rg_lru.recurrent_param",
    "recurrent_block.rg_lru.input_gate.w": "temporal_block.rg_lru.input_gate_weight",
    "recurrent_block.rg_lru.input_gate.b": "temporal_block.rg_lru.input_gate_bias",
    "recurrent_block.rg_lru.a_gate.w": "temporal_block.rg_lru.recurrent_gate_weight",
    "recurrent_block.rg_lru.a_gate.b": "temporal_block.rg_lru.recurrent_gate_bias",
}
_ATTENTION_RENAMES = {
    "attention_block.proj_q.weight": "temporal_block.q_proj.weight",
    "attention_block.proj_k.weight": "temporal_block.k_proj.weight",
    "attention_block.proj_v.weight": "temporal_block.v_proj.weight",
    "attention_block.proj_final.weight": "temporal_block.o_proj.weight",
    "attention_block.proj_final.bias": "temporal_block.o_proj.bias",
}
_BLOCK_RENAMES = {**_COMMON_RENAMES, **_RECURRENT_RENAMES, **_ATTENTION_RENAMES}
_BLOCK_RENAMES_INV = {v: k for k, v in _BLOCK_RENAMES.items()}
_TOP_RENAMES = {"embedder.input_embedding": EMBED, "final_norm.scale": "final_norm.weight"}
_TOP_RENAMES_INV = {v: k for k, v in _TOP_RENAMES.items()}

# Tensors whose layout differs (handled by the functions below).
_OFF_CONV_W = "recurrent_block.conv_1d.w"
_OFF_UP_W = "mlp_block.ffw_up.w"
_OFF_UP_B = "mlp_block.ffw_up.b"
_OUR_CONV_W = "temporal_block.conv_1d.weight"
_OUR_GATE, _OUR_UP = "mlp_block.gate_proj", "mlp_block.up_proj"

_OFFICIAL_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
_OUR_BLOCK = re.compile(r"layers\.(\d+)\.(.+)")


# ------------------------------------------------------------ layout changes
def conv_official_to_hf(w: torch.Tensor) -> torch.Tensor:
    """Official conv kernel [K, L] -> depthwise ``Conv1d`` weight [L, 1, K] (a view)."""
    return w.t().unsqueeze(1)


def conv_hf_to_official(w: torch.Tensor) -> torch.Tensor:
    """Depthwise ``Conv1d`` weight [L, 1, K] -> official conv kernel [K, L] (a view)."""
    return w[:, 0, :].t()


def ffw_up_official_to_hf(
    w: torch.Tensor, b: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Splits the official fused up projection into gate / up (views).

    Args:
      w: [2, D, M]; ``w[0]`` feeds the GELU (gate), ``w[1]`` the linear branch (up).
      b: [2, 1, 1, M] or None.
    Returns:
      ``{"gate_proj.weight": [M, D], "up_proj.weight": [M, D]}`` plus the
      ``.bias`` entries [M] when ``b`` is given.
    """
    out = {"gate_proj.weight": w[0].t(), "up_proj.weight": w[1].t()}
    if b is not None:
        out["gate_proj.bias"] = b.reshape(2, -1)[0]
        out["up_proj.bias"] = b.reshape(2, -1)[1]
    return out


def ffw_up_w_hf_to_official(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate / up weights [M, D] each -> official ``ffw_up.w`` [2, D, M] (a new tensor)."""
    return torch.stack([gate.t(), up.t()])


def ffw_up_b_hf_to_official(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate / up biases [M] each -> official ``ffw_up.b`` [2, 1, 1, M] (a new tensor)."""
    return torch.stack([gate, up]).reshape(2, 1, 1, -1)


# ------------------------------------------------------------- HF prefix
def strip_hf_prefix(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Hugging Face names (``model.layers.0...``) -> ours (``layers.0...``).

    A stored ``lm_head.weight`` is dropped when it is tied to the embeddings
    (same storage, or equal values); an untied one raises WeightsError since
    RecurrentGemma ties its logits to the embeddings. Keys without the prefix
    are kept as they are (``check_state_dict`` reports them if unexpected).
    """
    out: dict[str, Any] = {}
    for name, value in sd.items():
        if name == LM_HEAD:
            continue
        out[name[len(HF_PREFIX) :] if name.startswith(HF_PREFIX) else name] = value
    if LM_HEAD in sd and EMBED in out and not _tied(sd[LM_HEAD], out[EMBED]):
        raise WeightsError(
            "lm_head.weight differs from model.embed_tokens.weight; RecurrentGemma ties the "
            "output projection to the embeddings, so an untied lm_head cannot be loaded"
        )
    return out


def _tied(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when ``a`` and ``b`` are the same tensor, share storage, or are equal."""
    if a is b:
        return True
    if a.shape != b.shape:
        return False
    if a.device.type == "meta" or b.device.type == "meta":
        return True  # shapes only: cannot tell, assume the usual tying
    if a.data_ptr() == b.data_ptr() and a.stride() == b.stride():
        return True
    return bool(torch.equal(a, b.to(a.dtype)))


def add_hf_prefix(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Our names -> Hugging Face names (``model.`` prefix; no lm_head)."""
    return {HF_PREFIX + name: value for name, value in sd.items() if name != LM_HEAD}


# ---------------------------------------------------- official <-> ours
def official_to_hf(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official ``recurrentgemma.torch.Griffin`` state dict -> our names.

    Every output is a view of an input tensor (no copies), so this is cheap on
    memory-mapped or meta tensors. Raises WeightsError naming the tensors it
    does not know.
    """
    return _map_tensors(sd, _official_tensor_to_hf, "an official RecurrentGemma state dict")


def _map_tensors(sd: Mapping[str, torch.Tensor], map_one, layout: str) -> dict[str, torch.Tensor]:
    """Every tensor of ``sd`` through ``map_one(name, sd)`` (a dict of new tensors, or
    None for a name it does not know); WeightsError naming the unknown ones."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for name in sd:
        mapped = map_one(name, sd)
        if mapped is None:
            unknown.append(name)
        else:
            out.update(mapped)
    if unknown:
        raise WeightsError(f"not {layout}: unknown tensors {_short_list(unknown)}")
    return out


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How one direction of the mapping renames: top-level tensors, per-block tensors
    (``{prefix}.{i}.{rest}``) and the conv kernel, whose layout changes too."""

    top: dict[str, str]
    block: re.Pattern
    prefix: str
    renames: dict[str, str]
    conv: tuple[str, str, Callable[[torch.Tensor], torch.Tensor]]


_TO_HF = _Layout(
    _TOP_RENAMES,
    _OFFICIAL_BLOCK,
    "layers",
    _BLOCK_RENAMES,
    (_OFF_CONV_W, _OUR_CONV_W, conv_official_to_hf),
)
_TO_OFFICIAL = _Layout(
    _TOP_RENAMES_INV,
    _OUR_BLOCK,
    "blocks",
    _BLOCK_RENAMES_INV,
    (_OUR_CONV_W, _OFF_CONV_W, conv_hf_to_official),
)


def _rename(
    name: str, sd: Mapping[str, torch.Tensor], to: _Layout
) -> tuple[dict[str, torch.Tensor] | None, str | None, str | None]:
    """(mapped tensors or None, block index, rest of the name) for the renames both
    directions share; the caller handles what they do not (the MLP's fused up projection)."""
    if name in to.top:
        return {to.top[name]: sd[name]}, None, None
    m = to.block.fullmatch(name)
    if m is None:
        return None, None, None
    i, rest = m.groups()
    if rest in to.renames:
        return {f"{to.prefix}.{i}.{to.renames[rest]}": sd[name]}, i, rest
    source, target, convert = to.conv
    if rest == source:
        return {f"{to.prefix}.{i}.{target}": convert(sd[name])}, i, rest
    return None, i, rest


def _official_tensor_to_hf(
    name: str, sd: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor] | None:
    """Our tensors made from the official tensor ``name`` (None if unknown)."""
    mapped, i, rest = _rename(name, sd, _TO_HF)
    if mapped is not None or rest is None:
        return mapped
    if rest == _OFF_UP_B:
        return {}  # converted together with ffw_up.w
    if rest == _OFF_UP_W:
        bias = sd.get(f"blocks.{i}.{_OFF_UP_B}")
        parts = ffw_up_official_to_hf(sd[name], bias)
        return {f"layers.{i}.mlp_block.{k}": v for k, v in parts.items()}
    return None


def hf_to_official(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our (or Hugging Face, ``model.``-prefixed) names -> official state dict.

    Renamed tensors and the conv kernel are views; the fused MLP up
    projection ``ffw_up.{w,b}`` is a new tensor per layer (gate and up
    stacked). Raises WeightsError naming unknown tensors or a gate without
    its up projection (or vice versa).
    """
    if any(k.startswith(HF_PREFIX) or k == LM_HEAD for k in sd):
        sd = strip_hf_prefix(sd)
    return _map_tensors(sd, _hf_tensor_to_official, "a RecurrentGemma state dict")


def _hf_tensor_to_official(
    name: str, sd: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor] | None:
    """Official tensors made from our tensor ``name`` (None if unknown)."""
    mapped, i, rest = _rename(name, sd, _TO_OFFICIAL)
    if mapped is not None or rest is None:
        return mapped
    if rest.startswith((_OUR_GATE + ".", _OUR_UP + ".")):
        part, param = rest.rsplit(".", 1)
        if part == _OUR_UP:  # stacked when its gate is met
            if f"layers.{i}.{_OUR_GATE}.{param}" not in sd:
                raise WeightsError(f"{name} has no matching layers.{i}.{_OUR_GATE}.{param}")
            return {}
        return _stack_gate_up(name, param, i, sd)
    return None


def _stack_gate_up(
    name: str, param: str, i: str, sd: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor] | None:
    """The official ``ffw_up.{w,b}`` of layer ``i`` from its gate / up ``param``."""
    up_name = f"layers.{i}.{_OUR_UP}.{param}"
    if param not in ("weight", "bias"):
        return None
    if up_name not in sd:
        raise WeightsError(f"{name} has no matching {up_name}")
    stack = ffw_up_w_hf_to_official if param == "weight" else ffw_up_b_hf_to_official
    key = _OFF_UP_W if param == "weight" else _OFF_UP_B
    return {f"blocks.{i}.{key}": stack(sd[name], sd[up_name])}


# ------------------------------------------------------------------- Flax
def flax_to_official(params: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A Flax params tree (as restored from Orbax) -> official PyTorch state dict.

    The tree is ``{"embedder": {"input_embedding": ...}, "blocks.0": {...},
    "final_norm": {"scale": ...}}`` (optionally under ``"params"``). Dense
    ``kernel`` [in, out] becomes ``weight`` [out, in] (a transposed view);
    everything else keeps its name and layout. Leaves may be numpy or jax
    arrays (bfloat16 included) or torch tensors.
    """
    if "params" in params and isinstance(params["params"], Mapping):
        params = params["params"]
    out = {}
    for name, leaf in _flatten(params):
        tensor = array_to_torch(leaf)
        if name.endswith(".kernel"):
            name, tensor = name[: -len("kernel")] + "weight", tensor.t()
        out[name] = tensor
    return out


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted name, leaf) pairs of a nested mapping, depth first."""
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def array_to_torch(x: Any) -> torch.Tensor:
    """A numpy / jax array (any float dtype, bfloat16 included) -> torch tensor."""
    if isinstance(x, torch.Tensor):
        return x
    import numpy as np

    arr = np.asarray(x)
    if arr.dtype.name == "bfloat16":  # ml_dtypes: reinterpret the 16-bit pattern
        return torch.from_numpy(np.ascontiguousarray(arr).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.array(arr, copy=not arr.flags.writeable))


# ----------------------------------------------------------- shapes / config
def official_config(config: GriffinConfig):
    """The official package's ``recurrentgemma.common.GriffinConfig`` for ``config`` (needs
    the ``recurrentgemma`` package: the tests and benchmarks build official models with it)."""
    from recurrentgemma import common

    kinds = {
        RECURRENT: common.TemporalBlockType.RECURRENT,
        ATTENTION: common.TemporalBlockType.ATTENTION,
    }
    return common.GriffinConfig(
        vocab_size=config.vocab_size, width=config.width, mlp_expanded_width=config.mlp_width,
        num_heads=config.num_heads, block_types=tuple(kinds[b] for b in config.block_types),
        embeddings_scale_by_sqrt_dim=config.embeddings_scale_by_sqrt_dim,
        attention_window_size=config.attention_window,
        logits_soft_cap=config.logits_soft_cap, lru_width=config.lru_width,
    )  # fmt: skip


def expected_shapes(config: GriffinConfig) -> dict[str, tuple[int, ...]]:
    """Our tensor names -> shapes for ``config`` (the exact state dict of Griffin)."""
    c = config
    shapes: dict[str, tuple[int, ...]] = {EMBED: (c.vocab_size, c.width)}
    for i, kind in enumerate(c.block_types):
        p = f"layers.{i}."
        shapes[p + "temporal_pre_norm.weight"] = (c.width,)
        shapes.update({p + k: v for k, v in _temporal_shapes(c, kind).items()})
        shapes[p + "channel_pre_norm.weight"] = (c.width,)
        shapes.update({p + k: v for k, v in _mlp_shapes(c).items()})
    shapes["final_norm.weight"] = (c.width,)
    return shapes


def _mlp_shapes(c: GriffinConfig) -> dict[str, tuple[int, ...]]:
    m, d = c.mlp_width, c.width
    return {
        "mlp_block.gate_proj.weight": (m, d),
        "mlp_block.gate_proj.bias": (m,),
        "mlp_block.up_proj.weight": (m, d),
        "mlp_block.up_proj.bias": (m,),
        "mlp_block.down_proj.weight": (d, m),
        "mlp_block.down_proj.bias": (d,),
    }


def _temporal_shapes(c: GriffinConfig, kind: str) -> dict[str, tuple[int, ...]]:
    d, lru, h = c.width, c.lru_width, c.num_heads
    t = "temporal_block."
    if kind == ATTENTION:
        return {
            t + "q_proj.weight": (d, d),
            t + "k_proj.weight": (c.head_dim, d),
            t + "v_proj.weight": (c.head_dim, d),
            t + "o_proj.weight": (d, d),
            t + "o_proj.bias": (d,),
        }
    bw = lru // h
    return {
        t + "linear_y.weight": (lru, d),
        t + "linear_y.bias": (lru,),
        t + "linear_x.weight": (lru, d),
        t + "linear_x.bias": (lru,),
        t + "linear_out.weight": (d, lru),
        t + "linear_out.bias": (d,),
        t + "conv_1d.weight": (lru, 1, c.conv1d_width),
        t + "conv_1d.bias": (lru,),
        t + "rg_lru.recurrent_param": (lru,),
        t + "rg_lru.input_gate_weight": (h, bw, bw),
        t + "rg_lru.input_gate_bias": (h, bw),
        t + "rg_lru.recurrent_gate_weight": (h, bw, bw),
        t + "rg_lru.recurrent_gate_bias": (h, bw),
    }


def shape_of(value: Any) -> tuple[int, ...]:
    """The shape of a tensor / array, or of a shape given as a sequence."""
    shape = getattr(value, "shape", value)
    return tuple(int(s) for s in shape)


def check_state_dict(
    sd: Mapping[str, Any],
    config: GriffinConfig,
    source: str,
    locations: Mapping[str, str] | None = None,
) -> None:
    """Raises WeightsError unless ``sd`` has exactly the tensors of ``config``.

    Args:
      sd: our names -> tensors (or anything with ``.shape``, or shapes).
      config: the model the tensors are meant for.
      source: where they come from (a file name), for the message.
      locations: optional name -> file holding it, named for mis-shaped tensors.
    """
    want = expected_shapes(config)
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    found = {k: shape_of(sd[k]) for k in want if k in sd}
    where = locations or {}
    wrong = [
        f"{k}: expected {want[k]}, found {found[k]}" + (f" in {where[k]}" if k in where else "")
        for k in found
        if found[k] != want[k]
    ]
    if not (missing or unexpected or wrong):
        return
    lines = [f"{source}: the tensors do not match the model ({_describe(config)}):"]
    if wrong:
        lines.append(f"  wrong shape ({len(wrong)}): " + _short_list(wrong, sep="; "))
    if missing:
        lines.append(f"  missing ({len(missing)}): " + _short_list(missing))
    if unexpected:
        lines.append(f"  unexpected ({len(unexpected)}): " + _short_list(unexpected))
    raise WeightsError("\n".join(lines))


def _describe(c: GriffinConfig) -> str:
    return (
        f"{c.num_layers} layers, width {c.width}, lru_width {c.lru_width}, "
        f"mlp_width {c.mlp_width}, {c.num_heads} heads, vocab {c.vocab_size}"
    )


def _short_list(items: list[str], limit: int = 8, sep: str = ", ") -> str:
    shown = sep.join(items[:limit])
    return shown + (f"{sep}... and {len(items) - limit} more" if len(items) > limit else "")


# ------------------------------------------------------------ config inference
_DEFAULT_HYPERS = dict(
    attention_window=2048, logits_soft_cap=30.0, embeddings_scale_by_sqrt_dim=True
)
_HYPER_FIELDS = tuple(_DEFAULT_HYPERS)
_SHAPE_FIELDS = ("width", "mlp_width", "num_heads", "lru_width", "block_types")


def infer_config_from_official(
    sd: Mapping[str, Any], preset: str | None = None, source: str = "state dict"
) -> GriffinConfig:
    """The GriffinConfig of an official state dict, from its tensor shapes.

    Shapes give vocab, width, MLP width, layers and their kinds, heads (the
    number of RG-LRU gate blocks, or width / head_dim for attention-only
    models), lru_width and the conv width. The attention window, logits
    soft-cap and embedding scaling are not in the weights: they come from
    ``preset`` when given (whose shapes must then agree: a WeightsError names
    the field), else from the griffin-7b / hawk-7b preset when the shapes are
    exactly those, else the RecurrentGemma values (2048, 30.0, True).
    """
    shapes = _infer_shapes(sd, source)
    if preset is not None:
        from rgemma.config import ConfigError

        try:
            reference = GriffinConfig.from_preset(preset)
        except ConfigError as e:
            raise WeightsError(str(e)) from None
        _check_against_preset(shapes, reference, preset, source)
        hypers = {k: getattr(reference, k) for k in _HYPER_FIELDS}
    else:
        hypers = _hypers_for_shapes(shapes)
    return GriffinConfig(**shapes, **hypers)


def _infer_shapes(sd: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Shape-derived GriffinConfig fields of an official state dict."""
    embed = _require(sd, "embedder.input_embedding", source)
    vocab, width = shape_of(embed)
    num_layers = _count_blocks(sd, source)
    mlp_width = shape_of(_require(sd, "blocks.0.mlp_block.ffw_up.w", source))[-1]
    kinds, heads, lru_width, conv_width = [], set(), None, 4
    for i in range(num_layers):
        gate = sd.get(f"blocks.{i}.recurrent_block.rg_lru.a_gate.w")
        key = sd.get(f"blocks.{i}.attention_block.proj_k.weight")
        if gate is not None:
            h, bw, _ = shape_of(gate)
            kinds.append(RECURRENT)
            heads.add(h)
            lru_width = h * bw
            conv_width = shape_of(_require(sd, f"blocks.{i}.recurrent_block.conv_1d.w", source))[0]
        elif key is not None:
            kinds.append(ATTENTION)
            head_dim = shape_of(key)[0]
            heads.add(width // head_dim if head_dim and width % head_dim == 0 else -1)
        else:
            raise WeightsError(
                f"{source}: blocks.{i} has neither recurrent_block.rg_lru.a_gate.w "
                "nor attention_block.proj_k.weight"
            )
    if len(heads) != 1 or -1 in heads:
        raise WeightsError(f"{source}: inconsistent number of heads across blocks: {sorted(heads)}")
    return dict(
        vocab_size=vocab,
        width=width,
        mlp_width=mlp_width,
        num_heads=heads.pop(),
        block_types=tuple(kinds),
        lru_width=lru_width or width,
        conv1d_width=conv_width,
    )


def _require(sd: Mapping[str, Any], name: str, source: str) -> Any:
    if name not in sd:
        raise WeightsError(
            f"{source}: missing tensor {name}: not an official RecurrentGemma state dict"
        )
    return sd[name]


def _count_blocks(sd: Mapping[str, Any], source: str) -> int:
    """Number of residual blocks; they must be numbered 0..n-1."""
    found = {int(m.group(1)) for k in sd if (m := _OFFICIAL_BLOCK.fullmatch(k))}
    if not found:
        raise WeightsError(
            f"{source}: no blocks.* tensors: not an official RecurrentGemma state dict"
        )
    n = len(found)
    if max(found) >= n:  # a gap; list a few of the missing without ranging to max(found)
        absent = [i for i in range(min(max(found), n + 8)) if i not in found][:8]
        more = " ..." if max(found) > n + 8 else ""
        raise WeightsError(
            f"{source}: blocks are not numbered 0..{n - 1} (block {max(found)} "
            f"is there): missing blocks {absent}{more}"
        )
    if n > MAX_SIZES["num_layers"]:
        raise WeightsError(
            f"{source}: {n} blocks; rgemma accepts at most {MAX_SIZES['num_layers']}"
        )
    return n


def _check_against_preset(
    shapes: dict[str, Any], reference: GriffinConfig, preset: str, source: str
) -> None:
    for field in _SHAPE_FIELDS + ("conv1d_width",):
        got, want = shapes[field], getattr(reference, field)
        if got != want:
            if field == "block_types":
                got, want = _pattern_summary(got), _pattern_summary(want)
            raise WeightsError(
                f"{source}: the weights do not match preset {preset!r}: "
                f"{field} is {got} in the weights but {want} in the preset"
            )


def _pattern_summary(kinds: tuple[str, ...]) -> str:
    attn = [i for i, k in enumerate(kinds) if k == ATTENTION]
    return f"{len(kinds)} layers with attention at {attn}"


def _hypers_for_shapes(shapes: dict[str, Any]) -> dict[str, Any]:
    """Non-shape fields: those of a paper preset whose shapes match exactly, else defaults."""
    for name in ("griffin-7b", "hawk-7b"):
        preset = PRESETS[name]
        if all(shapes[f] == preset[f] for f in _SHAPE_FIELDS):
            return {k: preset[k] for k in _HYPER_FIELDS}
    return dict(_DEFAULT_HYPERS)


def num_bytes(sd: Mapping[str, torch.Tensor]) -> int:
    """Total bytes of the tensors of ``sd``."""
    return sum(math.prod(t.shape) * t.element_size() for t in sd.values())
