"""Peers on the same checkpoint and machine: transformers in memory, transformers with accelerate
disk offload, llama.cpp (F32 and BF16 GGUF), and kimi-jax: streaming as 0.1.0 did (with and
without KV cache), and with the issue-17 memory model (``resident_bytes: auto``, where the medium
model fits, and ``0``, pure streaming; both with ``compute.matmul: stored``).

The checkpoint is a "medium" DeepSeek-V3 (about 0.45B parameters, 8 layers, 64 experts top-8)
written by transformers' own ``save_pretrained`` (BF16) from a random init. Every system runs in
its own process (so peak RSS is its own), starts with its files in the page cache, decodes greedily from the same prompt, and saves the
logits of its first step; the report gives each system's largest logit difference from
transformers in float32 (a random-init model has near-tied expert scores, so tokens alone are a
weak check). Ratios are taken between figures measured in the same invocation.

llama.cpp runs when ``llama_cpp`` (``pip install llama-cpp-python``, built from the sdist, about
7 minutes on 2 cores) and ``gguf`` are installed. The GGUF files are written by llama.cpp's own
converter (``convert_hf_to_gguf.py`` from the same llama-cpp-python sdist, fetched with pip and
cached), after two fixes to the copy of the checkpoint it reads: ``save_pretrained`` writes no
``scoring_func``/``topk_method`` (without them llama.cpp silently gates with softmax), and the
converter needs a tokenizer (a tiny byte-level BPE; token ids are fed directly, so it is never used
to encode).

    python benchmarks/peers.py [--tokens 8] [--repeats 3] [--smoke] [--only NAME,...]
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


def warm_page_cache(ckpt: Path, name: str) -> None:
    """Read the files ``name`` will read once, so every system starts with its weights in the page
    cache. (llama.cpp maps its GGUF and faults pages in on first use: with a cold cache, later MoE
    steps page in experts the first did not use, which measured it 3x slower than warm.)"""
    files = [ckpt.with_name(f"{ckpt.name}.{name.split('-', 1)[1]}.gguf")] if name.startswith("llama.cpp") \
        else sorted(ckpt.glob("*.safetensors"))  # fmt: skip
    for path in files:
        with open(path, "rb") as f:
            while f.read(16 << 20):
                pass


def worker_transformers(ckpt: Path, tokens: int, offload: bool) -> dict:
    import numpy as np
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
            if not out:
                name = "transformers-disk-offload" if offload else "transformers-memory"
                np.save(_first_logits_path(ckpt, name), result.logits[0, -1].float().numpy())
            read.append(_io_read_bytes() - r0)
            out.append(token)
            ids = torch.tensor([[token]])
    return {"load_s": load_s, "step_s": times, "bytes_per_step": read, "tokens_out": out}


def _first_logits_path(ckpt: Path, name: str) -> Path:
    return ckpt.parent / f"{ckpt.name}.{name}.first-logits.npy"


def llama_source(cache: Path) -> Path:
    """llama.cpp's source tree from the installed llama-cpp-python's sdist (its converter)."""
    from importlib import metadata

    version = metadata.version("llama-cpp-python")
    root = cache / f"llama-cpp-python-{version}-src"
    tree = root / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if not (tree / "convert_hf_to_gguf.py").exists():
        import tarfile

        root.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={version}", "-d", str(root)], check=True)  # fmt: skip
        (sdist,) = root.glob("*.tar.gz")
        with tarfile.open(sdist) as tar:
            tar.extractall(root, filter="data")
    return tree


def make_gguf(ckpt: Path, outtype: str, cache: Path) -> Path:
    out = ckpt.with_name(f"{ckpt.name}.{outtype}.gguf")
    if out.exists():
        return out
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    src = Path(tempfile.mkdtemp(prefix="gguf-src-"))
    for f in ckpt.iterdir():
        if f.suffix == ".safetensors" or f.name.endswith(".index.json"):
            (src / f.name).symlink_to(f)
    config = json.loads((ckpt / "config.json").read_text())
    config.update(scoring_func="sigmoid", topk_method="noaux_tc")
    (src / "config.json").write_text(json.dumps(config))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["a tiny corpus for a converter that needs a tokenizer"] * 4,
                            trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    tree = llama_source(cache)
    # The converter refuses a pre-tokenizer it has no fingerprint for; ours never encodes text.
    script = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[1] + '/gguf-py']; import conversion.base as b; "
              "b.TextModel.get_vocab_base_pre = lambda self, tok: 'gpt-2'; import convert_hf_to_gguf as c; "
              "sys.argv = ['convert', sys.argv[2], '--outtype', sys.argv[3], '--outfile', sys.argv[4]]; c.main()")
    tmp = out.with_name(out.name + ".tmp")
    subprocess.run([sys.executable, "-c", script, str(tree), str(src), outtype, str(tmp)], check=True,
                   capture_output=True)  # fmt: skip
    os.rename(tmp, out)
    return out


def worker_llama(ckpt: Path, tokens: int, outtype: str) -> dict:
    import numpy as np
    from llama_cpp import Llama

    gguf = ckpt.with_name(f"{ckpt.name}.{outtype}.gguf")
    started = time.perf_counter()
    llm = Llama(model_path=str(gguf), n_ctx=64, n_batch=64, n_threads=os.cpu_count(), logits_all=True, verbose=False)
    load_s = time.perf_counter() - started
    times, out, pending = [], [], list(PROMPT)
    for step in range(tokens):
        t0 = time.perf_counter()
        llm.eval(pending)
        logits = np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        token = int(np.argmax(logits))
        times.append(time.perf_counter() - t0)
        if step == 0:
            np.save(_first_logits_path(ckpt, f"llama.cpp-{outtype}"), logits)
        out.append(token)
        pending = [token]
    return {"load_s": load_s, "step_s": times, "bytes_per_step": [0] * tokens, "tokens_out": out}


def worker_kimi(ckpt: Path, tokens: int, kv_cache: bool, dtype: str = "float32", matmul: str = "widened",
                budget: str | int = 0) -> dict:
    """``matmul``/``budget``: the manifest's compute.matmul and storage.resident_bytes (``auto`` keeps the
    whole medium model in memory after its first step; 0 streams every weight every step)."""
    import numpy as np

    from kimi_jax.model.engine import Engine
    from kimi_jax.model.jax_setup import enable_compilation_cache
    from kimi_jax.storage.checkpoint import open_checkpoint
    from kimi_jax.storage.residency import plan_residency, resolve_budget

    enable_compilation_cache()
    index = open_checkpoint(ckpt)
    residency = plan_residency(index, resolve_budget(budget, index, tokens + 8))  # a short prompt
    settings = dict(matmul=matmul, residency=residency)
    with Engine(index, dtype, **settings) as engine:  # warm-up: compile once (cached across runs), then measure
        engine.generate(PROMPT, min(tokens, 3), kv_cache=kv_cache)
    with Engine(index, dtype, **settings) as engine:
        steps = engine.generate(PROMPT, tokens, kv_cache=kv_cache)
    name = next(n for n, (kv, dt, mm, b) in KIMI_SYSTEMS.items() if (kv, dt, mm, b) == (kv_cache, dtype, matmul, budget))
    np.save(_first_logits_path(ckpt, name), steps[0].logits)
    return {"load_s": 0.0, "step_s": [s.wall_s for s in steps], "bytes_per_step": [s.bytes_read for s in steps],
            "storage_bytes_per_step": [s.io.from_storage + s.io.from_speculation for s in steps],
            "tokens_out": [s.token for s in steps]}  # fmt: skip


# name -> (kv_cache, dtype, compute.matmul, storage.resident_bytes); the first three are 0.1.0's behaviour
KIMI_SYSTEMS = {
    "kimi-jax-kv": (True, "float32", "widened", 0),
    "kimi-jax-no-kv": (False, "float32", "widened", 0),
    "kimi-jax-kv-bf16": (True, "bfloat16", "widened", 0),
    "kimi-jax-kv-auto": (True, "float32", "stored", "auto"),  # fits: loaded once, stored-precision matmuls
    "kimi-jax-kv-auto-bf16": (True, "bfloat16", "stored", "auto"),
    "kimi-jax-kv-stream": (True, "float32", "stored", 0),  # pure streaming, stored-precision matmuls
    "kimi-jax-defaults": (True, "float32", "kernels", "auto"),  # 0.2: a manifest that says nothing about speed
    "kimi-jax-defaults-bf16": (True, "bfloat16", "kernels", "auto"),
}


SYSTEMS = {
    "transformers-memory": lambda c, n: worker_transformers(c, n, offload=False),
    "transformers-disk-offload": lambda c, n: worker_transformers(c, n, offload=True),
    "llama.cpp-f32": lambda c, n: worker_llama(c, n, "f32"),
    "llama.cpp-bf16": lambda c, n: worker_llama(c, n, "bf16"),
    **{name: (lambda c, n, spec=spec: worker_kimi(c, n, *spec)) for name, spec in KIMI_SYSTEMS.items()},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--repeats", type=int, default=1, help="rounds over the systems; figures are medians")
    parser.add_argument("--only", help="comma-separated systems to run (default: all)")
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
    names = args.only.split(",") if args.only else list(SYSTEMS)
    try:
        import gguf  # noqa: F401
        import llama_cpp  # noqa: F401
    except ImportError as e:
        skipped = [n for n in names if n.startswith("llama.cpp")]
        names = [n for n in names if n not in skipped]
        if skipped:
            emit({"skipped": skipped, "reason": f"llama.cpp not installed ({e.name}); pip install llama-cpp-python gguf"})
    runs: dict[str, list[dict]] = {}
    for repeat in range(args.repeats):  # rounds over every system: a slow spell of the machine hits them all
        for name in names:
            if name.startswith("llama.cpp"):
                make_gguf(ckpt, name.split("-", 1)[1], cache)
            warm_page_cache(ckpt, name)
            proc = subprocess.run([sys.executable, __file__, "--worker", name, "--checkpoint", str(ckpt),
                                   "--tokens", str(tokens)], capture_output=True, text=True)  # fmt: skip
            if proc.returncode != 0:
                emit({"system": name, "error": proc.stderr[-2000:]})
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            decode = r["step_s"][1:] or r["step_s"]  # the first step is the prompt's prefill
            run = {"per_token_s": statistics.median(decode), "first_step_s": r["step_s"][0],
                   "peak_rss_mib": r["peak_rss"] / 2**20, "bytes_per_token": statistics.median(r["bytes_per_step"][1:] or r["bytes_per_step"]),
                   "load_s": r["load_s"], "tokens_out": r["tokens_out"]}  # fmt: skip
            runs.setdefault(name, []).append(run)
            emit({"system": name, "repeat": repeat, **run})
    for name, done in runs.items():  # each figure: the median over the rounds
        results[name] = {**done[-1], **{k: statistics.median(r[k] for r in done)
                                        for k in ("per_token_s", "first_step_s", "peak_rss_mib", "load_s")},
                         "per_token_s_rounds": [r["per_token_s"] for r in done]}  # fmt: skip
        emit({"system": name, "rounds": len(done), **results[name]})
    import numpy as np

    reference = _first_logits_path(ckpt, "transformers-memory")
    if reference.exists():
        ref = np.load(reference)
        for name in results:
            mine = _first_logits_path(ckpt, name)
            if mine.exists() and name != "transformers-memory":
                diff = float(np.max(np.abs(np.load(mine).astype(np.float32) - ref)))
                results[name]["max_logit_diff_vs_transformers"] = diff
                emit({"system": name, "max_logit_diff_vs_transformers_f32": diff, "logit_scale": float(np.max(np.abs(ref)))})
    if {"transformers-memory", "transformers-disk-offload", "kimi-jax-kv"} <= results.keys():
        mem, off, kv = results["transformers-memory"], results["transformers-disk-offload"], results["kimi-jax-kv"]

        def ratio(a: str, b: str, field: str = "per_token_s") -> dict:
            key = f"{a}/{b}" + ("" if field == "per_token_s" else f" {field}")
            return {key: results[a][field] / results[b][field]} if {a, b} <= results.keys() else {}

        emit({"ratios": {
            "latency_vs_memory": kv["per_token_s"] / mem["per_token_s"],
            "latency_vs_offload": kv["per_token_s"] / off["per_token_s"],
            "rss_vs_memory": kv["peak_rss_mib"] / mem["peak_rss_mib"],
            "same_tokens_as_transformers": kv["tokens_out"] == mem["tokens_out"],
            **({"latency_vs_llama.cpp-f32": kv["per_token_s"] / results["llama.cpp-f32"]["per_token_s"]}
               if "llama.cpp-f32" in results else {}),
            **({"latency_bf16_vs_llama.cpp-bf16": results["kimi-jax-kv-bf16"]["per_token_s"]
                / results["llama.cpp-bf16"]["per_token_s"]}
               if {"kimi-jax-kv-bf16", "llama.cpp-bf16"} <= results.keys() else {}),
            # issue 17: budget auto (the model fits) and budget 0, stored-precision matmuls
            **ratio("kimi-jax-kv-auto", "transformers-memory"), **ratio("kimi-jax-kv-auto", "llama.cpp-f32"),
            **ratio("kimi-jax-kv-auto-bf16", "llama.cpp-bf16"),
            **ratio("kimi-jax-kv-auto", "transformers-memory", "peak_rss_mib"),
            **ratio("kimi-jax-kv-stream", "transformers-disk-offload"), **ratio("kimi-jax-kv-auto", "kimi-jax-kv"),
            # issue 22: the defaults (KV cache, auto, the CPU kernels)
            **ratio("kimi-jax-defaults", "transformers-memory"), **ratio("kimi-jax-defaults", "llama.cpp-f32"),
            **ratio("kimi-jax-defaults-bf16", "llama.cpp-bf16"), **ratio("kimi-jax-defaults", "kimi-jax-kv-auto"),
        }, "targets": {"latency_vs_memory": "<= 0.5", "latency_vs_offload": "<= 0.1", "rss_vs_memory": "<= 0.25",
                     "latency_vs_llama.cpp-f32": "<= 1.0", "kimi-jax-kv-auto/transformers-memory": "<= 0.5",
                     "kimi-jax-kv-auto/llama.cpp-f32": "<= 1.0", "kimi-jax-kv-auto-bf16/llama.cpp-bf16": "<= 1.0",
                     "kimi-jax-kv-auto/transformers-memory peak_rss_mib": "<= 1.0",
                     "kimi-jax-kv-stream/transformers-disk-offload": "<= 0.3"}})  # fmt: skip


if __name__ == "__main__":
    main()
