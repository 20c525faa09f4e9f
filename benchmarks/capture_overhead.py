"""Capture overhead: instrumented vs bare wall time of the same run (goal: under 5% extra).

Both runs execute the same compiled programs; the instrumented one also fetches the capture
values to the host and builds the ledger entries. Runs alternate (bare, instrumented, ...) after a
warm-up so compilation and page-cache state do not favour either side; figures are medians.

    python benchmarks/capture_overhead.py [--preset tiny|small] [--repeats 5] [--budget auto] [--matmul stored] [--smoke]

With ``--budget`` (storage.resident_bytes) the weights stay in memory from the first step on, so the
capture's cost is measured against a faster step than streaming gives.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from kimi_jax.ledger.ledger import step_entry
from kimi_jax.model.engine import Engine
from kimi_jax.storage.checkpoint import open_checkpoint
from kimi_jax.settings import parse_size
from kimi_jax.storage.residency import plan_residency, resolve_budget
from kimi_jax.storage.synth import ensure_synthetic


def one_run(index, keep: bool, prompt, steps: int, kv_cache: bool, engine_args: dict) -> float:
    started = time.perf_counter()
    with Engine(index, keep_capture=keep, **engine_args) as engine:
        records = engine.generate(prompt, steps, kv_cache=kv_cache)
    if keep:
        [step_entry(r, ["norms", "routing", "logits"], True) for r in records]
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--kv-cache", action="store_true")
    parser.add_argument("--budget", default="0", help="storage.resident_bytes: a size, 0 (default) or auto")
    parser.add_argument("--matmul", default="widened", choices=["stored", "widened"], help="compute.matmul")
    parser.add_argument("--smoke", action="store_true", help="one repeat, two steps: checks the script runs")
    args = parser.parse_args()
    if args.smoke:
        args.repeats, args.steps = 1, 2
    index = open_checkpoint(ensure_synthetic(args.preset))
    prompt = [index.config.bos_token_id]
    budget = resolve_budget(args.budget if args.budget == "auto" else parse_size(args.budget), index,
                            len(prompt) + args.steps)  # fmt: skip
    engine_args = {"matmul": args.matmul, "residency": plan_residency(index, budget)}
    one_run(index, True, prompt, args.steps, args.kv_cache, engine_args)  # warm-up: compile everything once
    bare, inst = [], []
    for _ in range(args.repeats):
        bare.append(one_run(index, False, prompt, args.steps, args.kv_cache, engine_args))
        inst.append(one_run(index, True, prompt, args.steps, args.kv_cache, engine_args))
    b, i = statistics.median(bare), statistics.median(inst)
    print(json.dumps({"benchmark": "capture_overhead", "preset": args.preset, "steps": args.steps,
                      "kv_cache": args.kv_cache, "budget_bytes": budget, "matmul": args.matmul,
                      "repeats": args.repeats, "bare_s": round(b, 4),
                      "instrumented_s": round(i, 4), "overhead": round(i / b - 1, 4)}))  # fmt: skip


if __name__ == "__main__":
    main()
