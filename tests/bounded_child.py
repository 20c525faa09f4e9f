"""Run command lines in one process under an address-space limit, after warming it up.

``python -m tests.bounded_child SPEC.json RESULTS.json``. SPEC holds ``warmup`` (command lines run
first, so the libraries, threads and caches a command needs are in place), ``bound_bytes`` (how
much address space the cases may add to the warmed-up process: RLIMIT_AS is set to the current
size plus this) and ``cases`` (``{"name", "argv"}``). Each case runs through the CLI in-process;
RESULTS gets its exit code, output and wall time. A case that needs more memory than the bound
ends in a MemoryError, which the CLI reports as an internal error. (The worker process that
renders templates and runs tokenizer.json has its own limit, kimi_jax.text.worker.WORKER_MEMORY.)
"""

from __future__ import annotations

import json
import re
import resource
import sys
import time

from click.testing import CliRunner

from kimi_jax.cli import main


def vm_bytes(field: str = "VmSize") -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1)) * 1024


def run(spec_path: str, results_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    runner = CliRunner()
    for argv in spec["warmup"]:
        runner.invoke(main, argv)
    base = vm_bytes()
    limit = base + spec["bound_bytes"]
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    results = []
    for case in spec["cases"]:
        started = time.monotonic()
        result = runner.invoke(main, case["argv"])
        results.append({"name": case["name"], "exit_code": result.exit_code, "output": result.output[-3000:],
                        "output_chars": len(result.output), "vm_peak": vm_bytes("VmPeak"),
                        "seconds": round(time.monotonic() - started, 2)})  # fmt: skip
    with open(results_path, "w") as f:
        json.dump({"base": base, "limit": limit, "results": results}, f)


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2])
