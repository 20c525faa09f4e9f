"""Parameter pytrees for one layer (or the head) and builders from canonical tensor names.

Every class is a frozen dataclass registered with :func:`jax.tree_util.register_dataclass`, with
field names that follow the checkpoint (``q_a_proj``, ``kv_b_proj``, ``shared_experts``...) and
weights in the HF ``[out, in]`` layout. A linear weight is a container from
:mod:`kimi_jax.model.weights` (``Int4Weight`` / ``Fp8Weight`` / ``PlainWeight``, carrying how it
meets the matmul), or a plain numpy/jax array (the in-memory references of the tests); norm scales
and biases are arrays. :func:`kimi_jax.model.weights.linear_f32` takes either.

Canonical tensor names carry no ``model.`` prefix: ``layers.3.self_attn.q_a_proj.weight``,
``layers.3.mlp.gate.e_score_correction_bias``, ``layers.3.mlp.experts.7.down_proj.weight``,
``norm.weight``, ``lm_head.weight``.

A MoE layer's parameters come in two parts: :class:`MoEBaseParams` (everything but the routed
experts, read before the router runs) and :class:`ExpertStack` (routed experts stacked along a
leading axis: the ones the router picked, padded to a bucket size, or every expert of the layer
when they are kept; see :mod:`kimi_jax.model.slots`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kimi_jax.config import ModelConfig
from kimi_jax.errors import CheckpointError
from kimi_jax.shapes import expert_shapes, head_shapes, layer_shapes

Weight = Any  # np.ndarray | jax.Array | Int4Weight | Fp8Weight | PlainWeight


def _pytree(cls):
    """Frozen dataclass whose fields are all pytree children."""
    return jax.tree_util.register_dataclass(dataclasses.dataclass(frozen=True)(cls))


@_pytree
class AttentionParams:
    q_a_proj: Weight  # [q_lora_rank, hidden]
    q_a_layernorm: Weight  # [q_lora_rank]
    q_b_proj: Weight  # [heads * (nope + rope), q_lora_rank]
    kv_a_proj_with_mqa: Weight  # [kv_lora_rank + rope, hidden]
    kv_a_layernorm: Weight  # [kv_lora_rank]
    kv_b_proj: Weight  # [heads * (nope + v), kv_lora_rank]
    o_proj: Weight  # [hidden, heads * v]


@_pytree
class MLPParams:
    """SwiGLU ``down(silu(gate(x)) * up(x))``: the dense MLP and the shared expert."""

    gate_proj: Weight  # [inter, hidden]
    up_proj: Weight  # [inter, hidden]
    down_proj: Weight  # [hidden, inter]


@_pytree
class RouterParams:
    weight: Weight  # [n_routed_experts, hidden]
    e_score_correction_bias: Weight  # [n_routed_experts]


@_pytree
class ExpertStack:
    """``n`` routed experts of one layer, stacked on a leading axis.

    Which expert each slot holds is the slot plan's (:mod:`kimi_jax.model.slots`): the experts
    picked, in order, padded; every expert in id order; or a mesh's deal. Padding slots hold any
    finite weights (or zeros) and no pick refers to them.
    """

    gate_proj: Weight  # [n, moe_inter, hidden]
    up_proj: Weight  # [n, moe_inter, hidden]
    down_proj: Weight  # [n, hidden, moe_inter]


@_pytree
class DenseLayerParams:
    input_layernorm: Weight  # [hidden]
    post_attention_layernorm: Weight  # [hidden]
    self_attn: AttentionParams
    mlp: MLPParams


@_pytree
class MoEBaseParams:
    """A MoE layer minus its routed experts. ``shared_experts`` is None when n_shared_experts == 0."""

    input_layernorm: Weight
    post_attention_layernorm: Weight
    self_attn: AttentionParams
    gate: RouterParams
    shared_experts: MLPParams | None


@_pytree
class HeadParams:
    norm: Weight  # [hidden]
    lm_head: Weight  # [vocab, hidden]


@_pytree
class MTPInputParams:
    """What a multi-token-prediction layer applies before its decoder layer (kimi_jax.model.mtp)."""

    norm: Weight  # [hidden] the main model's final norm, applied to its hidden states
    enorm: Weight  # [hidden]
    hnorm: Weight  # [hidden]
    eh_proj: Weight  # [hidden, 2 * hidden]


# ----------------------------------------------------------------------------------------- builders


def _get(tensors: Mapping[str, Weight], name: str, shape: tuple[int, ...]) -> Weight:
    try:
        value = tensors[name]
    except KeyError:
        raise CheckpointError(f"tensor {name!r}: missing (expected shape {shape})") from None
    found = tuple(int(d) for d in getattr(value, "shape", ()))
    if found != tuple(shape):
        raise CheckpointError(f"tensor {name!r}: expected shape {tuple(shape)}, found {found}")
    return value


def _checked(tensors: Mapping[str, Weight], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Weight]:
    """The tensors named in ``shapes``, each checked against its declared shape."""
    return {name: _get(tensors, name, shape) for name, shape in shapes.items()}


def _module(cls, t: Mapping[str, Weight], prefix: str):
    """A params class whose fields are named as the checkpoint names the module's weights."""
    return cls(**{f.name: t[f"{prefix}.{f.name}.weight"] for f in dataclasses.fields(cls)})


def _check_layer(cfg: ModelConfig, layer: int, want_moe: bool) -> None:
    if not 0 <= layer <= cfg.num_hidden_layers:  # num_hidden_layers: a multi-token-prediction layer
        raise CheckpointError(f"layer {layer}: out of range [0, {cfg.num_hidden_layers}]")
    if cfg.is_moe_layer(layer) != want_moe:
        kind = cfg.layer_kind(layer)
        raise CheckpointError(f"layer {layer}: is a {kind} layer, not a {'moe' if want_moe else 'dense'} layer")


def dense_layer_params(cfg: ModelConfig, layer: int, tensors: Mapping[str, Weight]) -> DenseLayerParams:
    _check_layer(cfg, layer, want_moe=False)
    p, t = f"layers.{layer}", _checked(tensors, layer_shapes(cfg, layer))
    return DenseLayerParams(
        input_layernorm=t[f"{p}.input_layernorm.weight"],
        post_attention_layernorm=t[f"{p}.post_attention_layernorm.weight"],
        self_attn=_module(AttentionParams, t, f"{p}.self_attn"),
        mlp=_module(MLPParams, t, f"{p}.mlp"),
    )


def moe_base_params(cfg: ModelConfig, layer: int, tensors: Mapping[str, Weight]) -> MoEBaseParams:
    _check_layer(cfg, layer, want_moe=True)
    p, t = f"layers.{layer}", _checked(tensors, layer_shapes(cfg, layer))
    shared = _module(MLPParams, t, f"{p}.mlp.shared_experts") if cfg.n_shared_experts > 0 else None
    return MoEBaseParams(
        input_layernorm=t[f"{p}.input_layernorm.weight"],
        post_attention_layernorm=t[f"{p}.post_attention_layernorm.weight"],
        self_attn=_module(AttentionParams, t, f"{p}.self_attn"),
        gate=RouterParams(weight=t[f"{p}.mlp.gate.weight"],
                          e_score_correction_bias=t[f"{p}.mlp.gate.e_score_correction_bias"]),
        shared_experts=shared,
    )


def layer_params(cfg: ModelConfig, layer: int, tensors: Mapping[str, Weight]) -> DenseLayerParams | MoEBaseParams:
    """The parameters of ``layer`` as its kind needs them (a MoE layer without its routed experts)."""
    build = moe_base_params if cfg.is_moe_layer(layer) else dense_layer_params
    return build(cfg, layer, tensors)


def expert_stack(
    cfg: ModelConfig, layer: int, expert_ids: Sequence[int], tensors: Mapping[str, Weight]
) -> ExpertStack:
    """Stack experts ``expert_ids`` (in that order; repeats allowed, e.g. as padding) of ``layer``."""
    _check_layer(cfg, layer, want_moe=True)
    ids = [int(i) for i in expert_ids]
    if not ids:
        raise CheckpointError(f"layer {layer}: expert_stack needs at least one expert id")
    bad = [i for i in ids if not 0 <= i < cfg.n_routed_experts]
    if bad:
        raise CheckpointError(f"layer {layer}: expert ids {bad} out of range [0, {cfg.n_routed_experts})")
    experts = [_module(MLPParams, _checked(tensors, expert_shapes(cfg, layer, i)), f"layers.{layer}.mlp.experts.{i}")
               for i in ids]  # fmt: skip
    where = f"layers.{layer}.mlp.experts.{{{','.join(map(str, ids))}}}"
    return ExpertStack(**{f.name: stack_weights([getattr(m, f.name) for m in experts], f"{where}.{f.name}.weight")
                          for f in dataclasses.fields(ExpertStack)})  # fmt: skip


def head_params(cfg: ModelConfig, tensors: Mapping[str, Weight]) -> HeadParams:
    """Final norm and lm_head (with tied embeddings the caller passes the embedding as ``lm_head.weight``)."""
    t = _checked(tensors, head_shapes(cfg))
    return HeadParams(norm=t["norm.weight"], lm_head=t["lm_head.weight"])


def stack_weights(weights: Sequence[Weight], what: str) -> Weight:
    """Stack same-shaped weights on a new leading axis.

    Plain arrays are stacked directly (numpy stays numpy, on the host). Quantized containers are
    pytrees (``Int4Weight``: packed + scale; ``Fp8Weight``: weight + scale_inv) whose
    ``dequantize`` accepts leading stacked axes, so their array fields are stacked leaf by leaf;
    mixing kinds or static metadata (group_size, block_size) is a checkpoint error.
    """
    leaves0, treedef = jax.tree_util.tree_flatten(weights[0])
    columns: list[list[Any]] = [[leaf] for leaf in leaves0]
    for w in weights[1:]:
        leaves, td = jax.tree_util.tree_flatten(w)
        if td != treedef:
            raise CheckpointError(
                f"tensor {what}: experts are stored in different formats ({treedef} vs {td}); cannot stack"
            )
        for col, leaf in zip(columns, leaves):
            col.append(leaf)
    stacked = []
    for col in columns:
        if all(isinstance(a, np.ndarray) for a in col):
            stacked.append(np.stack(col))
        else:
            stacked.append(jnp.stack([jnp.asarray(a) for a in col]))
    return jax.tree_util.tree_unflatten(treedef, stacked)


__all__ = [
    "AttentionParams", "MLPParams", "RouterParams", "ExpertStack", "DenseLayerParams",
    "MoEBaseParams", "HeadParams", "MTPInputParams", "dense_layer_params", "moe_base_params", "layer_params",
    "expert_stack", "stack_weights", "head_params",
]
