"""The in-program expert plan agrees with the host's (kimi_jax.model.slots)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from kimi_jax.model.slots import expert_plan_in_program, plan_expert_slots


@pytest.mark.parametrize("t,k,n_experts", [(1, 8, 64), (1, 6, 16), (3, 4, 16), (5, 8, 384), (4, 4, 8)])
def test_same_distinct_ids_order_and_slots_as_the_host(t, k, n_experts):
    rng = np.random.default_rng(t * 100 + k)
    for _ in range(20):
        idx = np.stack([rng.choice(n_experts, k, replace=False) for _ in range(t)]).astype(np.int32)
        distinct, host_ids, host_slots = plan_expert_slots(idx, n_experts)
        ids, slots = (np.asarray(a) for a in expert_plan_in_program(jnp.asarray(idx), n_experts))
        assert list(ids[: len(distinct)]) == distinct
        np.testing.assert_array_equal(slots, host_slots)
        # the stack may be longer than the host's bucket (its size is static: T*k rounded up), but
        # every extra slot repeats the smallest id and no pick refers to it
        assert len(ids) >= len(host_ids) and set(ids[len(distinct):]) <= {distinct[0]}
        assert slots.max() < len(distinct)
        if t == 1:
            assert list(ids) == host_ids  # decode: exactly the host's stack


def test_a_stack_for_many_picks_pads_little():
    """Above the unrolled picks, a stack is its distinct experts rounded up to a quarter of their power
    of two: a few program sizes per octave, and at most a quarter (8 slots) of copied padding."""
    rng = np.random.default_rng(5)
    for n_experts, t, k in ((384, 8, 8), (384, 32, 8), (64, 8, 8), (16, 5, 4)):
        for _ in range(20):
            idx = np.stack([rng.choice(n_experts, k, replace=False) for _ in range(t)]).astype(np.int32)
            distinct, stack_ids, slots = plan_expert_slots(idx, n_experts)
            assert len(distinct) <= len(stack_ids) <= max(len(distinct) + 8, int(len(distinct) * 1.25))
            assert len(stack_ids) <= n_experts and set(stack_ids[len(distinct):]) <= {distinct[0]}
            np.testing.assert_array_equal(np.asarray(stack_ids)[slots], idx)
