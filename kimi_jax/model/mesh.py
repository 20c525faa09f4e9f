"""The device mesh a run computes on, and where every parameter lives on it.

A mesh has two named axes (spelled as in the manifest's ``compute.mesh``):

* ``model``: tensor parallelism. Every weight matrix outside the routed experts is split by its
  output rows (attention heads for ``q_b_proj``/``kv_b_proj``, hidden features for ``o_proj``,
  intermediate features for the dense MLP and the shared expert's ``gate_proj``/``up_proj``...).
  Splitting only output rows never splits a sum, so it moves activations, never weights: the rows
  a device computes with are exactly the rows its process reads from storage.
* ``expert``: data-parallel attention. The non-expert weights are replicated along it.

Routed experts are split over both axes: a stack's slot axis is cut into one block per device
(expert parallelism over the whole mesh); each device runs only its own experts on every position
and the partial results are combined with one ``psum`` (:func:`over_expert_axis`). The router and
the norms stay replicated, and so do activations and caches: routing and capture values are the
same replicated values on every device and reach the host exactly as on one device. The lm_head
is split over the vocabulary across every device.

A dimension is only split when the axis divides it (and, for the per-head projections, divides
the head count); otherwise that array is replicated along the axis. JAX's sharded ``jit``
computes the same function whatever the input shardings, so a replicated fallback changes where
work happens, never what is computed. Devices are ordered by process, so each process's devices
form one contiguous block of the flattened mesh, which is what lets a process read only a
contiguous share of each tensor (:mod:`kimi_jax.model.placement`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kimi_jax.errors import KimiJaxError
from kimi_jax.platform_info import mesh_label

EXPERT_AXIS = "expert"
MODEL_AXIS = "model"
AXES = (EXPERT_AXIS, MODEL_AXIS)

# Projections whose output rows are per-head blocks: split only on head boundaries.
PER_HEAD_ROWS = ("q_b_proj", "kv_b_proj")
# Kept whole on every device: the router, so routing is computed identically everywhere.
REPLICATED = ("gate",)


@dataclasses.dataclass(frozen=True)
class MeshShape:
    """``expert`` x ``model`` devices; ``placement`` says how the weights get onto them.

    ``streamed``: every layer is read from storage when it is needed, each process reading only
    the share its devices hold. ``resident``: every layer is read once, before step 0, and kept
    sharded on the devices; steps read nothing.
    """

    expert: int = 1
    model: int = 1
    placement: str = "streamed"

    @property
    def size(self) -> int:
        return self.expert * self.model

    def label(self) -> str:
        return mesh_label(self.expert, self.model, self.placement)


class MeshError(KimiJaxError):
    """The mesh does not fit the devices present (a run reports it as compute.mesh of its manifest)."""


def mesh_devices(shape: MeshShape, devices: list | None = None) -> np.ndarray:
    """The ``[expert, model]`` device grid: all devices, sorted by (process, id), so each process
    owns one contiguous block of the flattened order."""
    devices = list(jax.devices() if devices is None else devices)
    if shape.size != len(devices):
        per_process: dict[int, int] = {}
        for d in devices:
            per_process[d.process_index] = per_process.get(d.process_index, 0) + 1
        found = ", ".join(f"process {p}: {n}" for p, n in sorted(per_process.items()))
        raise MeshError(f"expert x model = {shape.expert} x {shape.model} = {shape.size} devices, but "
                        f"{len(devices)} {devices[0].platform} device(s) are present ({found})")  # fmt: skip
    ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
    return np.array(ordered, dtype=object).reshape(shape.expert, shape.model)


def build_mesh(shape: MeshShape, devices: list | None = None) -> Mesh:
    return Mesh(mesh_devices(shape, devices), AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def staging_sharding(mesh: Mesh) -> NamedSharding:
    """Leading axis split over every device, in process order: how bytes come off storage."""
    return NamedSharding(mesh, PartitionSpec(AXES))


# -------------------------------------------------------------------------------- sharding rules


def _axis_size(mesh: Mesh, axis: str | tuple[str, ...]) -> int:
    names = (axis,) if isinstance(axis, str) else axis
    return int(np.prod([mesh.shape[n] for n in names]))


def _split(shape: tuple[int, ...], dim: int, axis, mesh: Mesh) -> PartitionSpec:
    """Split ``dim`` of ``shape`` over ``axis`` when it divides evenly, else replicate."""
    spec: list[Any] = [None] * len(shape)
    size = _axis_size(mesh, axis)
    if size > 1 and len(shape) >= abs(dim) and shape[dim] % size == 0:
        spec[dim] = axis
    return PartitionSpec(*spec)


def _names(path) -> list[str]:
    return [str(getattr(k, "name", getattr(k, "key", k))) for k in path]


def leaf_spec(path, shape: tuple[int, ...], mesh: Mesh, heads: int) -> PartitionSpec:
    """The partition of one non-expert parameter leaf (a layer's or the head's), from the field
    names on its path (pytree keys or a canonical tensor name split at dots); see the module doc."""
    names = _names(path)
    whole = PartitionSpec(*[None] * len(shape))
    if "lm_head" in names:
        head = _split(shape, -2, AXES, mesh)
        return head if head != whole else _split(shape, -2, MODEL_AXIS, mesh)
    if len(shape) < 2 or any(n in REPLICATED for n in names):
        return whole
    if any(n in PER_HEAD_ROWS for n in names) and heads % mesh.shape[MODEL_AXIS]:
        return whole
    return _split(shape, -2, MODEL_AXIS, mesh)


# ------------------------------------------------------------------------------ expert parallelism


def over_expert_axis(routed: Callable) -> Callable:
    """``routed(experts, slots, weights, x)`` run expert-parallel over the ambient mesh (the one set
    with :func:`jax.set_mesh` around the jitted call), when it has more than one device.

    Each device gets its contiguous block of the stack's slots (device order: ``expert`` major,
    ``model`` minor, as the stack is laid out), runs ``routed`` on it with the slots shifted into
    its block (picks of other devices' slots match none of its slots and contribute nothing), and
    the partial results are summed over the mesh. Without a mesh, or when the devices do not
    divide the stack, ``routed`` runs as it is.
    """

    def run(experts, slots, weights, x):
        mesh = jax.sharding.get_abstract_mesh()
        n = experts.gate_proj.shape[0]
        if mesh.empty or set(AXES) - set(mesh.axis_names):
            return routed(experts, slots, weights, x)
        devices = mesh.shape[EXPERT_AXIS] * mesh.shape[MODEL_AXIS]
        if devices == 1 or n % devices:
            return routed(experts, slots, weights, x)
        block = n // devices

        def local(experts, slots, weights, x):
            first = jax.lax.axis_index(AXES) * block
            return jax.lax.psum(routed(experts, slots - first.astype(slots.dtype), weights, x), AXES)

        stack_spec = jax.tree_util.tree_map(lambda _: PartitionSpec(AXES), experts)
        whole = PartitionSpec()
        return jax.shard_map(local, in_specs=(stack_spec, whole, whole, whole), out_specs=whole,
                             check_vma=False)(experts, slots, weights, x)  # fmt: skip

    return run


# ------------------------------------------------------------------------------------------ host


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every array of ``tree`` whole on every device of ``mesh`` (split activations are gathered).
    A collective: every process calls it at the same point of the run."""
    return _replicator(mesh)(tree)


@functools.lru_cache(maxsize=8)
def _replicator(mesh: Mesh):
    return jax.jit(lambda tree: tree, out_shardings=replicated(mesh))


def host_value(a: Any) -> np.ndarray:
    """A device array's value on the host. A replicated array is read from a local copy; a split one
    is gathered first (across processes too, a collective), so every process sees the whole value."""
    if isinstance(a, jax.Array) and not a.is_fully_addressable and not a.is_fully_replicated:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(a, tiled=True))
    return np.asarray(a)


def gather_counts(values: list[int]) -> list[list[int]]:
    """Every process's ``values`` (non-negative integers below 2**62), in process order. A collective:
    every process calls it at the same point of the run. One process: ``[values]``."""
    if jax.process_count() == 1:
        return [[int(v) for v in values]]
    from jax.experimental import multihost_utils

    # int32 words, so the counts survive without jax_enable_x64
    words = np.array([[int(v) >> 31, int(v) & (2**31 - 1)] for v in values], dtype=np.int32).reshape(-1, 2)
    gathered = np.asarray(multihost_utils.process_allgather(words))
    return [[int(hi) << 31 | int(lo) for hi, lo in row] for row in gathered]


__all__ = [
    "EXPERT_AXIS", "MODEL_AXIS", "AXES", "PER_HEAD_ROWS", "REPLICATED", "MeshShape", "MeshError", "mesh_devices",
    "build_mesh", "replicated", "staging_sharding", "leaf_spec",
    "over_expert_axis", "replicate", "host_value", "gather_counts",
]
