"""Peers on the same checkpoint and machine: transformers in memory, transformers with accelerate
disk offload, and kimi-jax streaming (with and without KV cache).

The checkpoint is a "medium" DeepSeek-V3 (about 0.45B parameters, 8 layers, 64 experts top-8)
written by transformers' own ``save_pretrained`` (BF16) from a random init. Every system runs in
its own process (so peak RSS is its own), computes in float32, and decodes greedily from the
same prompt. Ratios are taken between figures measured in the same invocation.

    python benchmarks/peers.py [--tokens 8] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import emit, machine, peak_rss_bytes

MEDIUM = dict(vocab_size=32768, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=256,
              num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8, q_lora_rank=384, kv_lora_rank=256,
              qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=64, num_experts_per_tok=8,
              n_group=1, topk_group=1, first_k_dense_replace=1, max_position_embeddings=4096)  # fmt: skip
SMOKE = dict(MEDIUM, vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
             num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=32, kv_lora_rank=32,
             qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2)  # fmt: skip
PROMPT = [1, 2, 3, 4]


def make_checkpoint(path: Path, dims: dict) -> Path:
    if (path / "config.json").exists():
        return path
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**dims)).to(torch.bfloat16)
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    os.rename(tmp, path)
    return path


def _io_read_bytes() -> int:
    with open("/proc/self/io") as f:
        return int(next(l for l in f if l.startswith("rchar")).split()[1])


def worker_transformers(ckpt: Path, tokens: int, offload: bool) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count())
    kwargs: dict = {"dtype": torch.float32}
    if offload:
        kwargs.update(device_map="auto", max_memory={"cpu": "64MiB"}, offload_folder=tempfile.mkdtemp(prefix="offload-"))
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(ckpt, **kwargs).eval()
    load_s = time.perf_counter() - started
    ids = torch.tensor([PROMPT])
    times, read, out, past = [], [], [], None
    with torch.no_grad():
        for _ in range(tokens):
            r0, t0 = _io_read_bytes(), time.perf_counter()
            result = model(input_ids=ids, past_key_values=past, use_cache=True)
            past = result.past_key_values
            token = int(result.logits[0, -1].argmax())
            times.append(time.perf_counter() - t0)
            read.append(_io_read_bytes() - r0)
            out.append(token)
            ids = torch.tensor([[token]])
    return {"load_s": load_s, "step_s": times, "bytes_per_step": read, "tokens_out": out}


def worker_kimi(ckpt: Path, tokens: int, kv_cache: bool) -> dict:
    from kimi_jax.model.engine import Engine
    from kimi_jax.model.jax_setup import enable_compilation_cache
    from kimi_jax.storage.checkpoint import open_checkpoint

    enable_compilation_cache()
    index = open_checkpoint(ckpt)
    with Engine(index) as engine:  # warm-up: compile once (cached across runs), then measure
        engine.generate(PROMPT, min(tokens, 3), kv_cache=kv_cache)
    with Engine(index) as engine:
        steps = engine.generate(PROMPT, tokens, kv_cache=kv_cache)
    return {"load_s": 0.0, "step_s": [s.wall_s for s in steps], "bytes_per_step": [s.bytes_read for s in steps],
            "tokens_out": [s.token for s in steps]}  # fmt: skip


SYSTEMS = {
    "transformers-memory": lambda c, n: worker_transformers(c, n, offload=False),
    "transformers-disk-offload": lambda c, n: worker_transformers(c, n, offload=True),
    "kimi-jax-kv": lambda c, n: worker_kimi(c, n, kv_cache=True),
    "kimi-jax-no-kv": lambda c, n: worker_kimi(c, n, kv_cache=False),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--worker", choices=list(SYSTEMS), help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--make", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make:
        make_checkpoint(args.make, SMOKE if args.smoke else MEDIUM)
        return
    if args.worker:
        result = SYSTEMS[args.worker](args.checkpoint, args.tokens)
        print(json.dumps({**result, "peak_rss": peak_rss_bytes()}))
        return
    tokens = 3 if args.smoke else args.tokens
    cache = Path(os.environ.get("KIMI_JAX_CACHE", Path.home() / ".cache" / "kimi-jax")) / "bench"
    cache.mkdir(parents=True, exist_ok=True)
    ckpt = cache / ("peers-smoke" if args.smoke else "peers-medium")
    # Built in a child process, so this parent stays small for the workers it starts.
    subprocess.run([sys.executable, __file__, "--make", str(ckpt)] + (["--smoke"] if args.smoke else []), check=True)
    emit({"benchmark": "peers", "checkpoint": str(ckpt), "tokens": tokens, "machine": machine()})
    results = {}
    for name in SYSTEMS:
        proc = subprocess.run([sys.executable, __file__, "--worker", name, "--checkpoint", str(ckpt),
                               "--tokens", str(tokens)], capture_output=True, text=True)  # fmt: skip
        if proc.returncode != 0:
            emit({"system": name, "error": proc.stderr[-2000:]})
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        decode = r["step_s"][1:] or r["step_s"]  # the first step is the prompt's prefill
        results[name] = {"per_token_s": statistics.median(decode), "first_step_s": r["step_s"][0],
                         "peak_rss_mib": r["peak_rss"] / 2**20, "bytes_per_token": statistics.median(r["bytes_per_step"][1:] or r["bytes_per_step"]),
                         "load_s": r["load_s"], "tokens_out": r["tokens_out"]}  # fmt: skip
        emit({"system": name, **results[name]})
    if {"transformers-memory", "transformers-disk-offload", "kimi-jax-kv"} <= results.keys():
        mem, off, kv = results["transformers-memory"], results["transformers-disk-offload"], results["kimi-jax-kv"]
        emit({"ratios": {
            "latency_vs_memory": kv["per_token_s"] / mem["per_token_s"],
            "latency_vs_offload": kv["per_token_s"] / off["per_token_s"],
            "rss_vs_memory": kv["peak_rss_mib"] / mem["peak_rss_mib"],
            "same_tokens_as_transformers": kv["tokens_out"] == mem["tokens_out"],
        }, "targets": {"latency_vs_memory": "<= 0.5", "latency_vs_offload": "<= 0.1", "rss_vs_memory": "<= 0.25"}})  # fmt: skip


if __name__ == "__main__":
    main()
