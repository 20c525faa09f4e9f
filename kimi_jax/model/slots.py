"""Expert-slot planning: which slot of a layer's expert stack holds which expert, and where each of
the router's picks finds its expert.

Three layouts, one per kind of stack:

* a stack read for the picks (:func:`plan_expert_slots`, on the host): the distinct experts picked,
  sorted, each read once, padded to a few sizes per power of two so stacks of one size share one
  program;
* a stack of every expert kept in memory (:func:`expert_plan_in_program`, inside the program): the
  same plan with static shapes, the experts indexed in place;
* a stack dealt to the devices of a mesh (:func:`deal_expert_slots`): the distinct experts
  round-robin over the devices, one block of slots per device.

The host's bucket for a few picks (at most ``UNROLLED_SLOTS``) is the in-program one, so a layer
whose experts are all kept runs the same slots as one that reads them, and both agree bitwise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kimi_jax.model.layers import UNROLLED_SLOTS


def stack_bucket(distinct: int) -> int:
    """The stack size for ``distinct`` experts read for many picks: rounded up to a quarter of its
    power of two (at least 8): 38 -> 40, 150 -> 160. Stacks of one size share one program, and every
    padding slot is a copy of an expert's bytes: a power of two padded 38 experts of Kimi K2.5 to 64,
    copying 1.6 GB a layer where 1.0 GB were read (1.5 s against 0.65 s on this machine)."""
    step = max(8, 1 << max(0, (distinct - 1).bit_length() - 3))
    return -(-distinct // step) * step


def plan_expert_slots(idx: np.ndarray, n_routed_experts: int, bucket: bool = True) -> tuple[list[int], list[int], np.ndarray]:
    """``(distinct, stack_ids, slots)`` for the router's picks ``idx`` [T, k]: ``distinct`` are the
    ids picked, sorted, each read once; ``stack_ids`` pads them (when ``bucket``) to
    :func:`stack_bucket` by repeating the first (for at most ``UNROLLED_SLOTS`` picks: to the power
    of two of the number of picks), so padding never reads another expert; ``slots[t, j]`` is the position of
    ``idx[t, j]`` in the stack. Padding slots are never referenced."""
    idx = np.asarray(idx)
    ids = np.unique(idx)
    if not bucket:
        n = len(ids)
    elif idx.size <= UNROLLED_SLOTS:  # the in-program bucket: the power of two of the picks
        n = min(1 << (max(len(ids), idx.size) - 1).bit_length(), n_routed_experts)
    else:
        n = min(stack_bucket(len(ids)), n_routed_experts)
    distinct = [int(i) for i in ids]
    return distinct, distinct + [distinct[0]] * (n - len(distinct)), np.searchsorted(ids, idx).astype(np.int32)


def expert_plan_in_program(idx: jax.Array, n_routed_experts: int) -> tuple[jax.Array, jax.Array]:
    """:func:`plan_expert_slots` with static shapes: ``(stack_ids, slots)`` for picks ``idx`` [T, k].

    ``stack_ids`` are the distinct ids, ascending, padded with the smallest to the next power of two
    of T*k (capped at the expert count): the host's bucket when every pick is distinct, and when
    some repeat the extra padding slots are never referenced, so they are skipped as the host's are.
    """
    flat = idx.reshape(-1)
    n = min(1 << (flat.shape[0] - 1).bit_length(), n_routed_experts)
    distinct = jnp.unique(flat, size=n, fill_value=-1)  # ascending, then -1 padding
    real = distinct >= 0
    stack_ids = jnp.where(real, distinct, jnp.min(flat))
    # slot of a pick = how many distinct ids are smaller than it
    slots = jnp.sum((distinct[None, None, :] < idx[..., None]) & real, axis=-1)
    return stack_ids.astype(jnp.int32), slots.astype(jnp.int32)


def deal_expert_slots(idx: np.ndarray, n_routed: int, devices: int) -> tuple[list[int | None], np.ndarray]:
    """:func:`plan_expert_slots` dealt to the devices of a mesh: ``(stack_ids, slots)``.

    The stack has the single-device bucket size rounded up to a multiple of ``devices`` and one
    block of slots per device; the j-th distinct expert (by id) goes to device ``j % devices``,
    so every device holds at most one more expert than any other. ``stack_ids[s]`` is the
    expert in slot ``s`` or None (zeros, never referenced); ``slots[t, k]`` is the slot of
    ``idx[t, k]``.
    """
    distinct, stack_ids, _ = plan_expert_slots(idx, n_routed)
    per_device = -(-len(stack_ids) // devices)
    placed: list[int | None] = [None] * (per_device * devices)
    where = {}
    for j, expert in enumerate(distinct):
        slot = (j % devices) * per_device + j // devices
        placed[slot] = expert
        where[expert] = slot
    slots = np.vectorize(where.__getitem__, otypes=[np.int32])(np.asarray(idx))
    return placed, slots


__all__ = ["stack_bucket", "plan_expert_slots", "expert_plan_in_program", "deal_expert_slots"]
