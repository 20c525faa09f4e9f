"""More tokens per pass over the weights: batched decoding and verified drafts, side by side.

    python benchmarks/batch.py --model medium [--batches 1,8] [--tokens 16]    # fits in memory
    python benchmarks/batch.py --model full-shape-routed --batches 1,8,32 --tokens 2 --together
    python benchmarks/batch.py --model full-shape-routed --batches "" --drafts 0,4 --wrong-drafts --budget 0
    python benchmarks/batch.py --drafts 0,1,2,4,8 ...                          # verification passes
    python benchmarks/batch.py --model small --mtp --batches "" --drafts 0,1,2,4 --tokens 24   # MTP drafts
    python benchmarks/batch.py --smoke

For each batch size B, B prompts (distinct single tokens among the routed preset's active ids)
decode together with the KV cache; after each prompt's own step 0, each pass decodes one token of
every sequence. Reported per B: aggregate decoded tokens per second over the decode passes, bytes
from storage and bytes used per generated token, and, beside them, what uniform routing predicts
(``384 * (1 - (1 - 8/384)^B)`` experts per layer for Kimi K2.5) for the same model. For drafts:
the wall time and bytes of a verification pass of n drafted tokens (drafts that are always right,
so every pass verifies n), and the break-even acceptance rate: the fraction of drafts that must be
accepted for a pass of n drafts to cost no more per token than plain decoding. With ``--mtp`` (a
synthetic preset in the DeepSeek-V3 layout, which ships a multi-token-prediction layer) the drafts
come from that layer, and what drafting costs (its passes' seconds and bytes) is measured and added
to each verification pass's cost in the break-even; on random weights its drafts are rarely right,
so the acceptance measured says nothing about a trained model's.

Every figure comes from one invocation; quote them with the machine's state (other processes on
the cores double the times).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from common import emit, machine, peak_rss_bytes

from kimi_jax.fileio import default_cache_dir
from kimi_jax.model.batch import Batch, generate_batch
from kimi_jax.model.drafts import generate_with_drafts
from kimi_jax.model.engine import Engine
from kimi_jax.model.jax_setup import enable_compilation_cache
from kimi_jax.model.mtp import MTPDrafter
from kimi_jax.run import compile_clock
from kimi_jax.storage.checkpoint import open_checkpoint
from kimi_jax.storage.residency import budget_plan
from kimi_jax.storage.synth import ensure_synthetic


def checkpoint(model: str, smoke: bool, mtp: bool = False) -> Path:
    if mtp:  # the DeepSeek-V3 layout: synth writes its multi-token-prediction layer
        return ensure_synthetic("tiny" if smoke else model, "deepseek-v3")
    if smoke:
        sys.path.insert(0, str(Path(__file__).parent))
        from peers import SMOKE, make_checkpoint

        return make_checkpoint(default_cache_dir() / "bench" / "peers-smoke", SMOKE)
    if model == "medium":
        sys.path.insert(0, str(Path(__file__).parent))
        from peers import MEDIUM, make_checkpoint

        return make_checkpoint(default_cache_dir() / "bench" / "peers-medium", MEDIUM)
    return ensure_synthetic(model)


def uniform_experts(n_routed: int, k: int, batch: int) -> float:
    """Distinct experts B sequences touch per layer when each picks k of n uniformly at random."""
    return n_routed * (1 - (1 - k / n_routed) ** batch)


def batch_run(index, batch: int, tokens: int, budget: str, matmul: str = "kernels", together: bool = False) -> dict:
    prompts = [[3 + 37 * i] for i in range(batch)]
    residency = budget_plan(index, budget, "auto", 1 + tokens, rows=batch, sequences=batch)
    compile_clock.start()
    decode_compile = []  # seconds each decode pass spent making programs (a MoE layer's union size is a shape)
    with Engine(index, residency=residency, matmul=matmul) as engine:
        started = time.perf_counter()
        if together:  # the prompts' step 0 as one pass (at full shape, B lone step-0 passes take B x 40 s)
            batch_of = Batch(engine)
            batch_of.add_together([p[0] for p in prompts], tokens)
            while batch_of.live:
                began = compile_clock.now()
                batch_of.step()
                decode_compile.append(round(compile_clock.compile_seconds(began, compile_clock.now()), 3))
            passes = batch_of.passes
        else:
            steps, passes = generate_batch(engine, prompts, tokens)
        total_s = time.perf_counter() - started
    decode = passes[1 if together else batch :]  # after the prompts' step 0
    made = sum(len(p.sequences) for p in decode)
    cfg = index.config
    moe = [lm for lm in index.layers if lm.kind == "moe"]
    expert = moe[0].expert_bytes(0) if moe else 0
    non_expert = sum(lm.base_bytes for lm in index.layers) + sum(w.nbytes for w in index.head.values())
    uniform = (non_expert + len(moe) * uniform_experts(cfg.n_routed_experts, cfg.num_experts_per_tok, batch) * expert) / batch
    return {"run": "batch", "batch": batch, "decode_passes": len(decode), "decoded_tokens": made,
            "decode_s": round(sum(p.wall_s for p in decode), 3), "total_s": round(total_s, 3),
            "tokens_per_s": round(made / sum(p.wall_s for p in decode), 4) if decode else None,
            "pass_s_median": round(statistics.median(p.wall_s for p in decode), 3) if decode else None,
            # the first decode passes compile (each batch size its own programs): the median pass is the steady state
            "tokens_per_s_median_pass": round(batch / statistics.median(p.wall_s for p in decode), 2) if decode else None,
            "matmul": matmul, "decode_compile_s": decode_compile or None,
            "pass_s": [round(p.wall_s, 3) for p in decode],
            "storage_bytes_per_token": round(sum(p.io.from_storage + p.io.from_speculation for p in decode) / made) if made else None,
            "used_bytes_per_token": round(sum(p.io.used for p in decode) / made) if made else None,
            "experts_per_moe_layer": round(sum(p.io.experts_used for p in decode) / (len(decode) * len(moe)), 2) if decode and moe else None,
            "uniform_routing_bytes_per_token": round(uniform), "budget_bytes": residency.budget,
            "peak_rss_bytes": peak_rss_bytes()}  # fmt: skip


def drafts_run(index, drafts: int, budget: str, matmul: str = "kernels", right: bool = True) -> dict:
    """Two passes that verify ``drafts`` tokens each: drafts that are always right (a reference run's),
    or, without ``right``, fixed tokens the model will not choose (a pass costs the same whether its
    drafts are accepted or not; at full shape the reference run alone would take minutes)."""
    prompt = [3]
    tokens = 1 + 2 * (drafts + 1) if right else 3 + drafts
    residency = budget_plan(index, budget, "auto", 1 + tokens, rows=1 + drafts)
    with Engine(index, residency=residency, matmul=matmul) as engine:
        if right:
            want = [s.token for s in engine.generate(prompt, tokens, kv_cache=True)]
            propose = lambda ctx, n: want[len(ctx) - 1 :][:n]  # noqa: E731
        else:
            propose = lambda ctx, n: [3 + 37 * (len(ctx) + k) for k in range(n)]  # noqa: E731
        steps, passes = generate_with_drafts(engine, prompt, tokens, drafts, draft=propose, max_passes=2)
    full = [p for p in passes if len(p.drafted) == drafts]
    full = full[1:] or full  # the first such pass compiles the programs of its row count
    return {"run": "drafts", "drafts": drafts, "passes": len(full),
            "pass_s_median": round(statistics.median(p.wall_s for p in full), 3) if full else None,
            "pass_used_bytes": full[0].io.used if full else None,
            "pass_storage_bytes": full[0].io.from_storage if full else None, "budget_bytes": residency.budget}  # fmt: skip


def mtp_run(index, drafts: int, tokens: int, budget: str, matmul: str = "kernels") -> dict:
    """A run of ``tokens`` tokens whose drafts come from the checkpoint's MTP layer: each verification
    pass of ``drafts`` drafts, and what drafting them cost (the first such pass left out: it compiles)."""
    prompt = [3, 5, 7, 11]
    residency = budget_plan(index, budget, "auto", len(prompt) + tokens, rows=1 + drafts)
    with Engine(index, residency=residency, matmul=matmul) as engine:
        drafter = MTPDrafter(engine, len(prompt) + tokens + drafts + 1)
        try:
            steps, passes = generate_with_drafts(engine, prompt, tokens, max(drafts, 1) if drafts else 0,
                                                 draft=drafter if drafts else (lambda ctx, n: []))  # fmt: skip
        finally:
            drafter.close()
    full = [p for p in passes if len(p.drafted) == drafts][1:]
    cost = [p.draft_cost for p in full if p.draft_cost is not None]
    return {"run": "mtp", "drafts": drafts, "tokens": len(steps), "passes": len(full),
            "pass_s_median": round(statistics.median(p.wall_s for p in full), 3) if full else None,
            "draft_s_median": round(statistics.median(c.wall_s for c in cost), 3) if cost else 0.0,
            "pass_used_bytes": full[0].io.used if full else None,
            "draft_used_bytes": cost[0].io.used if cost else 0,
            "draft_storage_bytes": cost[0].io.from_storage if cost else 0,
            "drafted": sum(len(p.drafted) for p in passes), "accepted": sum(p.accepted for p in passes),
            "budget_bytes": residency.budget}  # fmt: skip


def break_even(records: list[dict]) -> list[dict]:
    """Acceptance rate at which a pass of n drafts costs as much per token as plain decoding: a pass
    yields 1 + a*n tokens for acceptance a, plain decoding one token per ``pass_s(0)``; a pass's cost
    includes drafting (``draft_s_median``, MTP drafts) where there is any."""
    plain = next((r["pass_s_median"] for r in records if r["drafts"] == 0), None)
    out = []
    for r in records:
        if r["drafts"] and plain and r["pass_s_median"]:
            cost = r["pass_s_median"] + r.get("draft_s_median", 0.0)
            out.append({"run": "break-even", "drafts": r["drafts"],
                        "acceptance": round(max(0.0, (cost / plain - 1) / r["drafts"]), 4)})  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="medium", help="medium, or a synthetic preset (full-shape-routed)")
    parser.add_argument("--batches", default="1,8", help="batch sizes, comma separated")
    parser.add_argument("--tokens", type=int, default=8, help="tokens per sequence (step 0 included)")
    parser.add_argument("--drafts", default="", help="draft counts of verification passes, comma separated")
    parser.add_argument("--budget", default="auto", help="storage.resident_bytes: auto, 0 or a size")
    parser.add_argument("--matmul", default="kernels", help="compute.matmul: kernels (the default), stored or widened")
    parser.add_argument("--together", action="store_true",
                        help="run the prompts' step 0 as one pass (not each alone): for full shape")
    parser.add_argument("--wrong-drafts", action="store_true",
                        help="verification passes of drafts that are rejected (no reference run): for full shape")
    parser.add_argument("--mtp", action="store_true",
                        help="drafts from the MTP layer of the preset written in the DeepSeek-V3 layout")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.batches, args.tokens, args.drafts = ("", 8, "0,2") if args.mtp else ("1,3", 3, "0,2")
    enable_compilation_cache()
    index = open_checkpoint(checkpoint(args.model, args.smoke, args.mtp))
    emit({"benchmark": "batch", "model": "smoke" if args.smoke else args.model, "machine": machine(),
          "budget": args.budget, "tokens": args.tokens})  # fmt: skip
    budget = args.budget if args.budget == "auto" else int(args.budget) if args.budget.isdigit() else args.budget
    for batch in (int(b) for b in args.batches.split(",") if b):
        emit(batch_run(index, batch, args.tokens, budget, args.matmul, args.together))
    draft_records = [mtp_run(index, int(d), args.tokens, budget, args.matmul) if args.mtp else
                     drafts_run(index, int(d), budget, args.matmul, not args.wrong_drafts)
                     for d in args.drafts.split(",") if d]  # fmt: skip
    for record in draft_records + break_even(draft_records):
        emit(record)


if __name__ == "__main__":
    main()
