"""Shared helpers for the benchmark scripts: machine facts and result records."""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import sys
from importlib import metadata


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    versions = {}
    for pkg in ("kimi-jax", "jax", "jaxlib", "numpy", "torch", "transformers", "accelerate"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem / 2**30, 1), "python": sys.version.split()[0],
            "versions": versions, "date": datetime.date.today().isoformat()}  # fmt: skip


def peak_rss_bytes() -> int:
    """Peak RSS of this process's own address space (VmHWM). ``ru_maxrss`` is not used: after
    fork and exec it still carries the parent's high-water mark."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)
