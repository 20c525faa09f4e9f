"""Chunked prefill: time to first token of a long prompt by chunk size, side by side in one process.

    python benchmarks/prefill.py [--model medium] [--prompt 512] [--chunks 0,64,128,256]
    python benchmarks/prefill.py --smoke

For each chunk size (0: the whole prompt in one pass) the prompt's step 0 runs twice with the KV
cache; the second run is reported, so compilation is left out (each chunk size and prompt length
compiles its own programs). Reported per chunk size: seconds to the first token, bytes used (each
chunk reads each layer's union of experts once, so smaller chunks read more) and the largest
activation block a pass holds ([chunk, hidden] float32 per layer input). The prompt is the
sequence 1..N of token ids modulo the vocabulary, so the routing varies by position.
"""

from __future__ import annotations

import argparse
import time

from batch import checkpoint
from common import emit, machine, peak_rss_bytes

from kimi_jax.model.engine import Engine
from kimi_jax.run import compile_clock
from kimi_jax.model.jax_setup import enable_compilation_cache
from kimi_jax.storage.checkpoint import open_checkpoint
from kimi_jax.storage.residency import plan_residency, resolve_budget


def first_token(index, prompt: list[int], chunk: int | None, residency, runs: int = 2) -> dict:
    walls, compiles = [], []
    compile_clock.start()
    for _ in range(runs):  # the first run compiles
        with Engine(index, matmul="kernels", residency=residency, prefill_chunk=chunk) as engine:
            started, clock = time.perf_counter(), compile_clock.now()
            (step,) = engine.generate(prompt, 1, kv_cache=True)
            walls.append(time.perf_counter() - started)
            compiles.append(compile_clock.compile_seconds(clock, compile_clock.now()))
    hidden = index.config.hidden_size
    return {"chunk": chunk or len(prompt), "ttft_s": round(walls[-1], 3), "first_run_s": round(walls[0], 3),
            # with one run (full shape: minutes a run), the time spent compiling is measured and left out here
            "compile_s": round(compiles[-1], 3), "ttft_less_compile_s": round(walls[-1] - compiles[-1], 3),
            "bytes_used": step.bytes_read, "bytes_from_storage": step.io.from_storage,
            "activation_block_bytes": (chunk or len(prompt)) * hidden * 4, "token": step.token}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="medium", help="medium (the peers' model), or a synthetic preset")
    parser.add_argument("--prompt", type=int, default=512, help="prompt length in tokens")
    parser.add_argument("--chunks", default="0,64,128,256", help="chunk sizes, comma separated (0: one pass)")
    parser.add_argument("--budget", default="auto", help="storage.resident_bytes: auto, 0 or a size")
    parser.add_argument("--runs", type=int, default=2, help="runs per chunk size, the last reported (1 at full shape)")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    length, chunks = (24, [0, 8]) if args.smoke else (args.prompt, [int(c) for c in args.chunks.split(",")])
    enable_compilation_cache()
    index = open_checkpoint(checkpoint(args.model, args.smoke))
    vocab = index.config.vocab_size
    prompt = [1 + (i * 7919) % (vocab - 1) for i in range(length)]
    residency = plan_residency(index, resolve_budget(args.budget if args.budget == "auto" else int(args.budget), index,
                                                     length + 1))  # fmt: skip
    emit({"benchmark": "prefill", "model": "smoke" if args.smoke else args.model, "prompt_tokens": length, "machine": machine()})
    results = [first_token(index, prompt, chunk or None, residency, args.runs) for chunk in chunks]
    for r in results:
        emit(r)
    emit({"same_token_every_chunk": len({r["token"] for r in results}) == 1,
          "peak_rss_gib": round(peak_rss_bytes() / 2**30, 2)})


if __name__ == "__main__":
    main()
