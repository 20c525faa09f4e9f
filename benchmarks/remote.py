"""Remote checkpoints and digest checks: one token from local disk and over HTTP on localhost.

In one run, side by side, after a warm-up token that compiles every program:

1. local disk, no digest check; local disk with every tensor checked against the digest file
   (the checking cost as a share of the token's wall time);
2. BLAKE3 throughput of one core on an in-memory buffer (bytes/s per core);
3. the same token over HTTP from a Range server on 127.0.0.1 (tests/range_server.py, a Python
   ``http.server``, so the server shares the CPUs) with 1, 4 and 16 requests in flight, digests
   checked: per-token wall, bytes (network), and per layer wall / max(read, compute) (overlap).

    python benchmarks/remote.py [--preset small] [--smoke]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import emit, machine

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/range_server.py

import blake3  # noqa: E402
import numpy as np  # noqa: E402

from kimi_jax.model.engine import Engine  # noqa: E402
from kimi_jax.storage.checkpoint import open_checkpoint  # noqa: E402
from kimi_jax.storage.digests import DIGEST_FILE, compute_digests  # noqa: E402
from kimi_jax.storage.reader import ShardReader  # noqa: E402
from kimi_jax.storage.remote import RemoteSettings  # noqa: E402
from kimi_jax.storage.source import open_source  # noqa: E402
from kimi_jax.storage.synth import ensure_synthetic  # noqa: E402
from tests.range_server import RangeServer  # noqa: E402


def one_token(index, reader, prompt, repeats: int) -> dict:
    """The median of ``repeats`` identical one-token runs after one that compiles, with per-layer timing
    of the median run."""
    runs = []
    with Engine(index, reader=reader) as engine:
        engine.generate(prompt, 1, kv_cache=False)
        for _ in range(repeats):
            ends: list[float] = []
            started = time.perf_counter()
            (step,) = engine.generate(prompt, 1, kv_cache=False,
                                      on_layer=lambda step, layer, b, ends=ends: ends.append(time.perf_counter()))
            runs.append((time.perf_counter() - started, started, ends, step))
    wall, started, ends, step = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
    walls = np.diff([started, *ends])
    # 1.0: a layer took as long as the longer of its reads and its compute (they overlapped fully);
    # (read + compute) / max: no overlap at all
    overlap = [w / max(r.read_s, r.compute_s, 1e-9) for w, r in zip(walls, step.layers)]
    serial = [(r.read_s + r.compute_s) / max(r.read_s, r.compute_s, 1e-9) for r in step.layers]
    return {"token": step.token, "wall_s": round(wall, 4), "bytes": step.bytes_read,
            "bytes_network": step.storage["bytes_network"], "weights_digest": step.storage["weights_digest"],
            "read_s": round(sum(r.read_s for r in step.layers), 4),
            "compute_s": round(sum(r.compute_s for r in step.layers), 4),
            "layer_wall_over_max_median": round(float(statistics.median(overlap)), 3),
            "no_overlap_would_be_median": round(float(statistics.median(serial)), 3)}  # fmt: skip


def blake3_bytes_per_s(nbytes: int) -> float:
    buf = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        blake3.blake3(buf).digest()  # one thread: the reader hashes each tensor on the thread that read it
        best = min(best, time.perf_counter() - started)
    return nbytes / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", choices=["tiny", "small"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    in_flight = (1, 4, 16)
    if args.smoke:
        args.preset, args.repeats, in_flight = "tiny", 1, (1, 4)
    root = ensure_synthetic(args.preset)
    index = open_checkpoint(root)
    prompt = [index.config.bos_token_id]
    with tempfile.TemporaryDirectory(prefix="kimi-jax-remote-bench-") as tmp:
        digest_path, table, _ = compute_digests(index, Path(tmp) / DIGEST_FILE, workers=2)
        plain = one_token(index, ShardReader(), prompt, args.repeats)
        checked = one_token(index, ShardReader(digests=table), prompt, args.repeats)
        per_core = blake3_bytes_per_s(64 << 20 if args.smoke else 256 << 20)

        def resolve(path: str) -> Path | None:
            name = path.removeprefix("/ckpt/")
            return digest_path if name == DIGEST_FILE else (root / name if "/" not in name else None)

        remote = {}
        with RangeServer(resolve) as server:
            for n in in_flight:
                source = open_source(server.base + "/ckpt/", Path(tmp) / "cache",
                                     remote=RemoteSettings(max_in_flight=n))  # fmt: skip
                remote[str(n)] = one_token(source.index, source.reader(), prompt, args.repeats)
                source.close()
    same = {r["weights_digest"] for r in remote.values()} == {checked["weights_digest"]}
    emit({"benchmark": "remote", "preset": args.preset, "machine": machine(),
          "local": plain, "local_checked": checked,
          "check_share_of_token_wall": round((checked["wall_s"] - plain["wall_s"]) / checked["wall_s"], 4),
          "check_seconds_per_token_estimate": round(plain["bytes"] / per_core, 4),
          "blake3_mib_s_per_core": round(per_core / 2**20, 1),
          "http": remote,
          "same_tokens": len({plain["token"], checked["token"], *(r["token"] for r in remote.values())}) == 1,
          "same_weights_digest": same})  # fmt: skip


if __name__ == "__main__":
    main()
