"""bfloat16 compute against float32: relative logit error and greedy-token agreement, measured.

For each synthetic checkpoint (preset x layout x seed) and cache mode, the engine decodes greedily
with ``compute.dtype: bfloat16``. At every step the float32 engine (exact dequantization; itself
within 1e-4 of transformers, see tests/test_engine_parity.py) computes the logits of the *same*
context, so each step is compared on identical input even after the tokens part ways. Per step:

* ``rel_err = max|l_bf16 - l_f32| / max|l_f32|`` over the vocabulary;
* ``margin_rel = (top1 - top2 of l_f32) / max|l_f32|``: the float32 top-1 margin on the same scale.

If ``rel_err <= R`` then the bfloat16 argmax equals the float32 one wherever ``margin_rel > 2R``
(a logit moves by at most ``R * max|l_f32|``), so one measured R states both tolerances.

    python benchmarks/bf16_tolerance.py [--presets tiny small] [--seeds 0 1 2] [--steps 16] [--smoke]
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from common import machine
from kimi_jax.model.engine import Engine
from kimi_jax.model.jax_setup import enable_compilation_cache
from kimi_jax.storage.checkpoint import open_checkpoint
from kimi_jax.settings import SYNTH_LAYOUTS
from kimi_jax.storage.synth import ensure_synthetic


def step_figures(bf16: np.ndarray, f32: np.ndarray) -> dict:
    scale = float(np.abs(f32).max())
    top2 = np.sort(f32)[-2:]
    return {"rel_err": float(np.abs(bf16 - f32).max()) / scale, "margin_rel": float(top2[1] - top2[0]) / scale,
            "same_token": int(np.argmax(bf16)) == int(np.argmax(f32)), "max_abs_logit": scale}  # fmt: skip


def _routes(step, positions: slice) -> list:
    """Selected expert sets of every MoE layer at ``positions`` (order within a set ignored)."""
    return [[sorted(row) for row in layer.experts[positions]] for layer in step.layers if layer.experts is not None]


def measure(index, prompt: list[int], steps: int, kv_cache: bool) -> list[dict]:
    """Per step: the figures above, and whether every position of the step's context went to the
    same experts in bfloat16 as in float32. A routing flip is a discontinuity: a near-tie between
    two experts' router scores resolved the other way changes a position's output by a whole
    expert. With the KV cache a position is routed once, when it is computed, and stays in the cache."""
    with Engine(index, "bfloat16") as engine:
        records = engine.generate(prompt, steps, kv_cache=kv_cache)
    figures, cached_same = [], True
    with Engine(index, "float32") as reference:
        for r in records:
            ref = reference.generate(r.context, 1, kv_cache=False)[0]
            if kv_cache:
                new = slice(-1, None) if r.index > 0 else slice(None)  # the positions this step computed
                same_routes = cached_same = cached_same and _routes(r, new) == _routes(ref, new)
            else:
                same_routes = _routes(r, slice(None)) == _routes(ref, slice(None))
            figures.append({**step_figures(r.logits, ref.logits), "same_routes": same_routes})
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny"], choices=["tiny", "small"])
    parser.add_argument("--layouts", nargs="+", default=list(SYNTH_LAYOUTS), choices=list(SYNTH_LAYOUTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--smoke", action="store_true", help="one tiny checkpoint, 2 steps: checks the script runs")
    args = parser.parse_args()
    if args.smoke:
        args.presets, args.layouts, args.seeds, args.steps = ["tiny"], ["kimi-k2.5"], [0], 2
    enable_compilation_cache()
    every: list[dict] = []
    flips: list[dict] = []
    for preset in args.presets:
        for layout in args.layouts:
            for seed in args.seeds:
                index = open_checkpoint(ensure_synthetic(preset, layout, seed))
                for kv_cache in (False, True):
                    figures = measure(index, [index.config.bos_token_id], args.steps, kv_cache)
                    run = {"preset": preset, "layout": layout, "seed": seed, "kv_cache": kv_cache}
                    print(json.dumps({**run, "steps": figures}), flush=True)
                    every.extend(figures)
                    flips += [{**run, "step": i, "margin_rel": f["margin_rel"], "same_routes": f["same_routes"]}
                              for i, f in enumerate(figures) if not f["same_token"]]  # fmt: skip
    routed = [f["rel_err"] for f in every if f["same_routes"]]
    print(json.dumps({
        "benchmark": "bf16_tolerance", "steps_compared": len(every),
        "max_rel_err": max(f["rel_err"] for f in every),
        "steps_with_identical_routing": len(routed), "max_rel_err_identical_routing": max(routed, default=None),
        "rel_err_percentiles": dict(zip(("p50", "p90", "p99"), np.percentile([f["rel_err"] for f in every],
                                                                            [50, 90, 99]).tolist())),
        "token_flips": flips, "largest_flip_margin_rel": max((f["margin_rel"] for f in flips), default=None),
        "machine": machine()}))  # fmt: skip


if __name__ == "__main__":
    main()
