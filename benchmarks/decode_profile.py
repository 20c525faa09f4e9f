"""Where a decode step's time goes: per-stage wall times of the engine's host work and its programs.

Runs the peers' medium DeepSeek-V3 checkpoint (``peers.py`` builds it; ``--smoke``: the tiny one)
with the KV cache, ``compute.matmul: stored`` and the given budget, and reports, per decode step
(steps after the first two, which compile), the milliseconds spent in each engine stage: the
embedding row, the whole-model program's call (which includes the head and the layer records) or,
layer by layer, the MoE layers, the reads of bases and head, the head and the layer records;
what the stages leave of the step's mean is host bookkeeping. Then, on the same
weights, each program alone: a dense layer, a MoE layer, its attention and router, its experts,
the whole-model program and the head.

    python benchmarks/decode_profile.py [--budget auto|0] [--tokens 24] [--smoke]
"""

from __future__ import annotations

import argparse
import collections
import functools
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from common import emit, machine

from kimi_jax.fileio import default_cache_dir
from kimi_jax.model import layers
from kimi_jax.model.engine import Engine
from kimi_jax.model.slots import expert_plan_in_program
from kimi_jax.model.source import LocalSource
from kimi_jax.model.step import kept_moe_layer, whole_model_step
from kimi_jax.storage.checkpoint import open_checkpoint
from kimi_jax.storage.residency import plan_residency, resolve_budget

STAGES = ((Engine, "_forward_fused"), (Engine, "layer_record"), (LocalSource, "embed"),
          (LocalSource, "stage_layer"), (LocalSource, "stage_head"), (LocalSource, "fused_weights"),
          (LocalSource, "logits"))  # fmt: skip


def timed_stages() -> dict[str, float]:
    """Wrap the engine's and its weight source's stages with wall-clock timers; returns the running
    totals (seconds)."""
    totals: dict[str, float] = collections.defaultdict(float)
    for cls, name in STAGES:
        original = getattr(cls, name)

        def timed(*args, _original=original, _name=name, **kwargs):
            started = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                totals[_name] += time.perf_counter() - started

        setattr(cls, name, functools.wraps(original)(timed))
    return totals


def best_ms(fn, *args, repeats: int = 30) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - started)
    return round(statistics.median(times) * 1000, 3)


def programs_alone(engine: Engine, caches: list) -> dict[str, float]:
    """Each program of a decode step on its own, on the engine's kept weights (all of them kept)."""
    cfg = engine.cfg
    n = cfg.num_hidden_layers
    bases, stacks, head = engine.source.fused_weights()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, cfg.hidden_size)).astype(np.float32))
    pos = jnp.asarray([len(PROMPT)], jnp.int32)
    moe = next(layer for layer in range(n) if stacks[layer] is not None)
    h, _, routing, _ = layers.moe_attention_and_route(cfg, bases[moe], x, pos, caches[moe])
    stack_ids, slots = expert_plan_in_program(routing.idx, cfg.n_routed_experts)
    return {
        "dense_layer": best_ms(functools.partial(layers.dense_layer, cfg), bases[0], x, pos, caches[0]),
        "moe_layer": best_ms(functools.partial(kept_moe_layer, cfg), bases[moe], stacks[moe], x, pos, caches[moe]),
        "moe_attention_and_router": best_ms(functools.partial(layers.moe_attention_and_route, cfg), bases[moe], x,
                                            pos, caches[moe]),  # fmt: skip
        "moe_experts": best_ms(functools.partial(layers.moe_experts, cfg), bases[moe], stacks[moe], slots,
                               routing.weights_scaled, h, stack_ids),  # fmt: skip
        "whole_model_program": best_ms(functools.partial(whole_model_step, cfg), bases, stacks, x, pos, tuple(caches)),
        "head": best_ms(functools.partial(layers.head_logits, cfg), head, x[-1]),
    }


PROMPT = [1, 2, 3, 4]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="auto", help="storage.resident_bytes: auto (default), 0 or a size")
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from peers import MEDIUM, SMOKE, make_checkpoint

    cache = default_cache_dir() / "bench"
    ckpt = make_checkpoint(cache / ("peers-smoke" if args.smoke else "peers-medium"), SMOKE if args.smoke else MEDIUM)
    tokens = 5 if args.smoke else args.tokens
    index = open_checkpoint(ckpt)
    budget = resolve_budget(args.budget if args.budget == "auto" else args.budget if not args.budget.isdigit()
                            else int(args.budget), index, len(PROMPT) + tokens)  # fmt: skip
    totals = timed_stages()
    with Engine(index, "float32", matmul="stored", residency=plan_residency(index, budget)) as engine:
        engine.generate(PROMPT, tokens, kv_cache=True)  # compiles (and fills the budget)
        walls: list[float] = []

        def on_step(record) -> None:
            if record.index < 2:  # the prompt and the first decode step compile; count from the third
                totals.clear()
            else:
                walls.append(record.wall_s)

        steps = engine.generate(PROMPT, tokens, kv_cache=True, on_step=on_step)
        per_step = {name: round(seconds * 1000 / len(walls), 3) for name, seconds in totals.items()}
        record = {"benchmark": "decode_profile", "checkpoint": str(ckpt), "budget_bytes": budget, "machine": machine(),
                  "whole_model_program": engine.source.fused_ready(), "decode_steps": len(walls),
                  "step_ms_median": round(statistics.median(walls) * 1000, 3), "step_ms_mean": round(
                      statistics.mean(walls) * 1000, 3), "stage_ms_per_step": per_step}  # fmt: skip
        if engine.source.fused_ready():
            record["programs_alone_ms"] = programs_alone(engine, steps[-1].caches)
    emit(record)


if __name__ == "__main__":
    main()
