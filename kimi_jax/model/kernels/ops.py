"""The kernels as jittable functions on the engine's weight containers.

Each returns the float32 result, or ``None`` where the kernels cannot take the call (not built,
switched off, a weight form or dtype they do not handle): the caller then computes on its XLA path.
A shape that contradicts the weight raises :class:`~kimi_jax.errors.FormatError`, as the XLA path
would fail too.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kimi_jax.errors import FormatError
from kimi_jax.model.kernels._library import ISAS, library
from kimi_jax.model.params import ExpertStack
from kimi_jax.model.containers import Fp8Weight, Int4Weight, PlainWeight
from kimi_jax.storage.codecs import BF16_ROUNDED, EXACT, block_size_pair

F32 = jnp.float32
_MODES = {EXACT: 0, BF16_ROUNDED: 1}
_FORMATS = {"int4": 0, "fp8": 1, "bf16": 2}


def _isa_code(isa: str | None) -> int | None:
    lib = library()
    if not lib.available:
        return None
    name = lib.isa if isa is None else isa
    if name not in lib.supported_isas:
        raise ValueError(f"isa: expected one of {', '.join(lib.supported_isas)} on this CPU, found {name!r}")
    return ISAS.index(name)


def _unwrap(w: Any) -> Any:
    """A plain weight's array (a container of quantized parts stays as it is)."""
    return w.array if isinstance(w, PlainWeight) else w


def _describe(w: Any) -> tuple[str, dict] | None:
    """(format, static attributes) of a weight the kernels take, else None."""
    if isinstance(w, Int4Weight):
        group = int(w.group_size)
        if group < 8 or group % 8 or w.dequant not in _MODES or w.packed.dtype not in (jnp.int32, jnp.uint32):
            return None
        if w.scale.dtype != jnp.bfloat16:
            return None
        return "int4", {"group_size": group, "mode": _MODES[w.dequant]}
    if isinstance(w, Fp8Weight):
        b0, b1 = block_size_pair(w.block_size)
        if w.dequant not in _MODES or w.weight.dtype not in (jnp.float8_e4m3fn, jnp.uint8):
            return None
        if w.scale_inv.dtype != F32:
            return None
        return "fp8", {"block_rows": b0, "block_cols": b1, "mode": _MODES[w.dequant]}
    if hasattr(w, "dtype") and hasattr(w, "shape") and not hasattr(w, "dequantize") and w.dtype == jnp.bfloat16:
        return "bf16", {}
    return None


def kernel_linear(x: jax.Array, w: Any, *, isa: str | None = None) -> jax.Array | None:
    """``x @ W.T`` as float32 ``[..., out]`` for ``x`` float32 or bfloat16 ``[..., in]`` and one weight
    ``[out, in]``: :class:`Int4Weight` (group size a multiple of 8, either dequant mode),
    :class:`Fp8Weight` (float8_e4m3fn or uint8, any block size, either mode), or a plain bfloat16
    array (also inside a :class:`PlainWeight`). ``None`` for anything else (stacked weights, float32
    weights, other dtypes) or when the kernels are unavailable. ``isa`` forces an instruction set the
    CPU has (tests); by default the one chosen at load."""
    code = _isa_code(isa)
    w = _unwrap(w)
    described = _describe(w)
    if code is None or described is None or len(w.shape) != 2 or x.dtype not in (jnp.float32, jnp.bfloat16):
        return None
    fmt, attrs = described
    n_out, n_in = (int(d) for d in w.shape)
    if x.ndim < 1 or x.shape[-1] != n_in:
        raise FormatError(f"activation: expected last dimension {n_in} to match the weight {tuple(w.shape)}, "
                          f"found shape {tuple(x.shape)}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, n_in)
    result = jax.ShapeDtypeStruct((x2.shape[0], n_out), F32)
    ints = {k: np.int64(v) for k, v in attrs.items()}
    if fmt == "int4":
        call = jax.ffi.ffi_call("kimi_jax_int4_linear", result, vmap_method="sequential")
        y = call(x2, w.packed, w.scale, in_features=np.int64(n_in), isa=np.int64(code), **ints)
    elif fmt == "fp8":
        call = jax.ffi.ffi_call("kimi_jax_fp8_linear", result, vmap_method="sequential")
        y = call(x2, w.weight, w.scale_inv, isa=np.int64(code), **ints)
    else:
        call = jax.ffi.ffi_call("kimi_jax_bf16_linear", result, vmap_method="sequential")
        y = call(x2, w, isa=np.int64(code))
    return y.reshape(*lead, n_out)


def _stack_arrays(fmt: str, w: Any) -> tuple[jax.Array, jax.Array]:
    if fmt == "int4":
        return w.packed, w.scale
    if fmt == "fp8":
        return w.weight, w.scale_inv
    return w, jnp.zeros((0,), jnp.bfloat16)


def kernel_routed_experts(experts: ExpertStack, slots: jax.Array, weights: jax.Array, x: jax.Array,
                          stack_ids: jax.Array | None = None, *, isa: str | None = None) -> jax.Array | None:  # fmt: skip
    """:func:`kimi_jax.model.layers.routed_experts` in one call: ``out[t] = sum_j c[t, j] *
    down(silu(gate x_t) * up x_t)`` (float32 ``[T, H]``) over the slots ``j`` row ``t`` picks, in
    ascending slot order, where slot ``j`` is stack entry ``j`` (or ``stack_ids[j]``). Each picked
    expert's weights are read once for all the rows that picked it; unpicked (padding) slots are never
    read. Takes float32 ``x`` and stacks of one format (all int4 with one group size and mode, all FP8
    with one block size and mode, or all bfloat16, plain or in :class:`PlainWeight`); ``None``
    otherwise (bfloat16 ``x`` included: its intermediate roundings are the XLA path's)."""
    code = _isa_code(isa)
    parts = [_unwrap(p) for p in (experts.gate_proj, experts.up_proj, experts.down_proj)]
    described = [_describe(p) for p in parts]
    if code is None or x.dtype != jnp.float32 or x.ndim != 2 or any(d is None for d in described):
        return None
    fmt, attrs = described[0]
    if any(d != described[0] for d in described) or any(len(p.shape) != 3 for p in parts):
        return None
    t, hidden = (int(d) for d in x.shape)
    n, inter, _ = (int(d) for d in parts[0].shape)
    if tuple(parts[0].shape) != (n, inter, hidden) or tuple(parts[2].shape) != (n, hidden, inter):
        raise FormatError(f"routed experts: expected gate/up [n, inter, {hidden}] and down [n, {hidden}, inter] "
                          f"for x {tuple(x.shape)}, found {tuple(parts[0].shape)}, {tuple(parts[1].shape)}, "
                          f"{tuple(parts[2].shape)}")
    if slots.shape != weights.shape or slots.ndim != 2 or slots.shape[0] != t:
        raise FormatError(f"routed experts: expected slots and weights [{t}, k], found {tuple(slots.shape)} "
                          f"and {tuple(weights.shape)}")
    arrays = [a for p in parts for a in _stack_arrays(fmt, p)]
    ids = jnp.zeros((0,), jnp.int32) if stack_ids is None else stack_ids.astype(jnp.int32)
    call = jax.ffi.ffi_call("kimi_jax_routed_experts", jax.ShapeDtypeStruct((t, hidden), F32),
                            vmap_method="sequential")
    return call(x, *arrays, slots.astype(jnp.int32), weights.astype(F32), ids, format=np.int64(_FORMATS[fmt]),
                group_size=np.int64(attrs.get("group_size", 8)), block_rows=np.int64(attrs.get("block_rows", 1)),
                block_cols=np.int64(attrs.get("block_cols", 1)), mode=np.int64(attrs.get("mode", 0)),
                isa=np.int64(code), use_stack_ids=np.int64(stack_ids is not None))  # fmt: skip
