"""Scale-out: 1, 2 and 4 local processes streaming one checkpoint over a mesh (jax.distributed, CPU).

    python benchmarks/scaleout.py             # small preset, 4 tokens with the KV cache, 1/2/4 processes
    python benchmarks/scaleout.py --smoke     # tiny preset, 2 tokens, 1/2 processes, one mesh (CI)

Each process has one CPU device and reads only its devices' share of every layer. For each
process count N the script starts N ``kimi-jax run`` processes on localhost and reads process 0's
ledger: wall per token, bytes per process per token, and the largest process's share of the bytes
against the ideal 1/N. The expert share isolates the expert imbalance: a layer's non-expert rows
split evenly (to within one row per tensor), so a process's expert bytes are its layer bytes minus
1/N of the layer's non-expert bytes. Two meshes are measured at each N > 1: ``model: N`` (every
non-expert matrix split by rows) and ``expert: N`` (non-expert weights replicated, read once and
gathered); N = 1 is the ordinary one-device run. Every bundle is checked with ``kimi-jax verify``.
On a machine with fewer cores than processes the processes share cores: compare bytes, not walls.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(manifest: Path, out: Path, processes: int, mesh: str | None, timeout_s: float) -> dict:
    """Run the manifest with ``processes`` processes; process 0's ledger and every process's wall."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("XLA_FLAGS", None)  # one CPU device per process
    sets = ["--set", f"compute.mesh={mesh}"] if mesh else []
    if processes > 1:
        env.update(KIMI_JAX_COORDINATOR=f"127.0.0.1:{free_port()}", KIMI_JAX_NUM_PROCESSES=str(processes))
        sets += ["--set", f"distributed.timeout_s={timeout_s:g}"]
    started = time.perf_counter()
    procs = []
    for pid in range(processes):
        penv = dict(env, KIMI_JAX_PROCESS_ID=str(pid)) if processes > 1 else env
        # proved (bare, then instrumented): the bundle verifies, and the timed run is past compilation
        cmd = [sys.executable, "-m", "kimi_jax.cli", "run", str(manifest), "--out", str(out), *sets]
        procs.append(subprocess.Popen(cmd, env=penv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=timeout_s * 4) for p in procs]
    wall = time.perf_counter() - started
    for pid, (p, (_, err)) in enumerate(zip(procs, outputs)):
        if p.returncode != 0:
            raise RuntimeError(f"process {pid} of {processes} exited {p.returncode}:\n{err[-3000:]}")
    verify = subprocess.run([sys.executable, "-m", "kimi_jax.cli", "verify", str(out)], env=env, capture_output=True,
                            text=True)  # fmt: skip
    return {"ledger": json.loads((out / "ledger.json").read_text()), "wall_s": wall, "verified": verify.returncode == 0}


def expert_bytes(index, ledger: dict) -> list[int]:
    """Bytes of the distinct experts each step's MoE layers picked (from the ledger's routing)."""
    totals = []
    for step in ledger["steps"]:
        total = 0
        for layer in step["layers"]:
            if layer.get("experts"):
                picked = {e for row in layer["experts"] for e in row}
                total += sum(index.layers[layer["layer"]].expert_bytes(e) for e in picked)
        totals.append(total)
    return totals


def measure(index, run: dict, processes: int) -> dict:
    ledger = run["ledger"]
    steps = ledger["steps"]
    experts = expert_bytes(index, ledger)
    shares, expert_shares = [], []
    for step, expert_total in zip(steps, experts):
        per = step["bytes_per_process"]
        shares.append(max(per) / step["bytes_read"])
        others = step["bytes_read"] - expert_total
        if expert_total:
            expert_shares.append(max(b - others / processes for b in per) / expert_total)
    decode = steps[1:] or steps
    return {
        "tokens": [s["token"] for s in steps],
        "wall_per_token_s": round(statistics.median(s["wall_s"] for s in decode), 4),
        "bytes_per_token": round(statistics.mean(s["bytes_read"] for s in steps)),
        "bytes_per_process_per_token": [round(statistics.mean(s["bytes_per_process"][p] for s in steps))
                                        for p in range(processes)],  # fmt: skip
        "largest_share": round(max(shares), 4), "expert_largest_share": round(max(expert_shares), 4),
        "ideal_share": round(1 / processes, 4), "total_bytes": ledger["totals"]["bytes_read"],
        "launch_wall_s": round(run["wall_s"], 1), "verified": run["verified"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--preset", default=None)
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--processes", type=int, nargs="+", default=None)
    p.add_argument("--timeout-s", type=float, default=300.0)
    args = p.parse_args()
    preset = args.preset or ("tiny" if args.smoke else "small")
    tokens = args.tokens or (2 if args.smoke else 4)
    counts = args.processes or ([1, 2] if args.smoke else [1, 2, 4])

    from kimi_jax.storage.checkpoint import open_checkpoint
    from kimi_jax.storage.synth import ensure_synthetic

    checkpoint = ensure_synthetic(preset, "kimi-k2.5", 0)
    index = open_checkpoint(checkpoint)
    with tempfile.TemporaryDirectory(prefix="kimi-jax-scaleout-") as tmp:
        tmp = Path(tmp)
        manifest = tmp / "scaleout.yaml"
        manifest.write_text(f"version: 1\nmodel:\n  checkpoint: {checkpoint}\nprompt:\n  tokens: [1, 2, 3]\n"
                            f"generate: {{max_new_tokens: {tokens}, kv_cache: true}}\noutput:\n  dir: out\n")  # fmt: skip
        single = None
        for n in counts:
            # model: N splits every non-expert matrix by rows; expert: N replicates them (read once,
            # gathered): the comparison behind the default. --smoke measures only the first.
            meshes = [None] if n == 1 else [f"{{expert: 1, model: {n}}}", f"{{expert: {n}, model: 1}}"][: 1 if args.smoke else 2]
            for mesh in meshes:
                out = tmp / f"n{n}-{'single' if mesh is None else mesh.replace(' ', '')}"
                record = measure(index, launch(manifest, out, n, mesh, args.timeout_s), n)
                single = single or record
                emit({"benchmark": "scaleout", "preset": preset, "processes": n, "mesh": mesh or "one device",
                      **record, "same_tokens_as_one_device": record["tokens"] == single["tokens"],
                      "total_bytes_equal_one_device": record["total_bytes"] == single["total_bytes"]})  # fmt: skip
    emit({"benchmark": "scaleout", "machine": machine(), "loaded_machine_note": "processes share the machine's cores"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
