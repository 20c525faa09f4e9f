"""``kimi-jax serve`` under a bounded load: requests/s and tokens/s at several concurrencies.

    python benchmarks/serve.py [--concurrency 1,4,8] [--requests 16] [--tokens 16] [--smoke]

The server runs the medium model (benchmarks/peers.py's checkpoint) in its own process on
127.0.0.1; C client threads each send a completion request, wait for the whole answer, and send
the next, until the round's requests are answered (a closed loop: at most C requests in flight).
Prompts are token ids (the medium checkpoint ships no tokenizer), each request a different first
token, greedy, exactly ``--tokens`` tokens (``ignore_eos``). Every round runs once untimed first:
each new batch size compiles its programs once, which a long-running server pays once.

Per concurrency: requests/s and generated tokens/s over the round's wall time, the mean and
largest latency of a request, and the mean time from a request's arrival to its last token (its
ledger's ``totals.run_wall_s``): the rest of its latency is its bundle's writing and HTTP. Every
request writes its bundle (without the note, the server's default): that is part of what is
measured.

llama.cpp's server (``llama-cpp-python[server]``) is not run: PyPI has no binary wheel of it for
this platform, and building it from the sdist takes about 7 minutes of both cores.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import emit, machine

from kimi_jax.fileio import default_cache_dir

ROOT = Path(__file__).resolve().parents[1]


def start_server(checkpoint: Path, folder: Path, tokens: int, max_batch: int) -> tuple[subprocess.Popen, int]:
    manifest = folder / "serve.yaml"
    manifest.write_text(json.dumps({"version": 1, "model": {"checkpoint": str(checkpoint)}, "prompt": {"tokens": [1]},
                                    "generate": {"max_new_tokens": tokens, "ignore_eos": True},
                                    "output": {"dir": str(folder / "runs")}}))  # fmt: skip
    log = open(folder / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "kimi_jax.cli", "serve", str(manifest), "--port", "0",
                             "--max-batch", str(max_batch), "--keep", "10000"], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        found = re.search(r"http://127\.0\.0\.1:(\d+)/v1", (folder / "server.log").read_text())
        if found:
            return proc, int(found.group(1))
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError((folder / "server.log").read_text()[-2000:])


def complete(port: int, first: int, tokens: int) -> tuple[int, float, float]:
    """One request: (tokens generated, seconds, seconds from arrival to its last token: the rest is
    the bundle's writing and HTTP)."""
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = {"prompt": [first, 2, 3, 4], "max_tokens": tokens, "temperature": 0}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    reply = json.loads(response.read())
    conn.close()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {reply}")
    seconds = time.perf_counter() - started
    ledger = json.loads((Path(reply["kimi_jax"]["bundle"]) / "ledger.json").read_text())
    return reply["usage"]["completion_tokens"], seconds, ledger["totals"]["run_wall_s"]


def load_round(port: int, concurrency: int, requests: int, tokens: int) -> dict:
    """``requests`` requests from ``concurrency`` clients, each sending its next when answered."""
    next_first = iter(range(5, 5 + requests))
    lock = threading.Lock()
    done: list[tuple[int, float, float]] = []
    failures: list[str] = []

    def client() -> None:
        while True:
            with lock:
                first = next(next_first, None)
            if first is None:
                return
            try:
                result = complete(port, first, tokens)
            except Exception as e:  # noqa: BLE001 - reported in the record
                failures.append(str(e))
                return
            with lock:
                done.append(result)

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    latencies = [s for _, s, _ in done]
    record = {"concurrency": concurrency, "requests": len(done), "tokens": sum(n for n, _, _ in done),
              "wall_s": round(wall, 3), "requests_per_s": round(len(done) / wall, 3),
              "tokens_per_s": round(sum(n for n, _, _ in done) / wall, 2),
              "latency_mean_s": round(statistics.mean(latencies), 3) if latencies else None,
              "latency_max_s": round(max(latencies), 3) if latencies else None,
              "to_last_token_mean_s": round(statistics.mean(w for _, _, w in done), 3) if done else None}  # fmt: skip
    if failures:
        record["error"] = failures[0]
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,4,8")
    parser.add_argument("--requests", type=int, default=16, help="requests per round")
    parser.add_argument("--tokens", type=int, default=16, help="tokens per request")
    parser.add_argument("--smoke", action="store_true", help="a tiny model, two small rounds")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from peers import MEDIUM, SMOKE, make_checkpoint

    levels = [1, 2] if args.smoke else [int(c) for c in args.concurrency.split(",")]
    requests, tokens = (2, 2) if args.smoke else (args.requests, args.tokens)
    name = "peers-smoke" if args.smoke else "peers-medium"
    checkpoint = make_checkpoint(default_cache_dir() / "bench" / name, SMOKE if args.smoke else MEDIUM)
    emit({"run": "machine", **machine(), "model": name, "tokens_per_request": tokens, "requests_per_round": requests})
    with tempfile.TemporaryDirectory(prefix="kimi-jax-serve-bench-") as tmp:
        proc, port = start_server(checkpoint, Path(tmp), tokens, max(levels))
        try:
            for c in levels:
                load_round(port, c, c, tokens)  # untimed: this batch size's programs compile
                emit({"run": "serve", **load_round(port, c, requests, tokens)})
        finally:
            proc.terminate()
            proc.wait(60)


if __name__ == "__main__":
    main()
