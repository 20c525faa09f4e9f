"""The platform fingerprint recorded beside every digest: what can change bits on the same input."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from typing import Any

import blake3

from kimi_jax.fileio import canonical_json


def _cpu() -> tuple[str, str]:
    model, flags = platform.processor() or "unknown", ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("unknown", "", platform.machine()):
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = " ".join(sorted(value.split()))
    except OSError:
        pass
    return model, flags


def package_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def platform_fingerprint(mesh: str | None = None, kernels: str | None = None) -> dict[str, Any]:
    """What can change bits on the same input. ``mesh`` (e.g. ``"2x4 streamed"``) is given for a run
    on a device mesh: where a sum is split across devices changes its rounding, so the mesh and
    the number of processes sharing it are part of the platform (absent for one device).
    ``kernels`` (e.g. ``"kimi-jax-cpu/1 avx512"``) names the CPU kernels a run multiplied with: another
    kernel set or instruction set sums in another order (absent when none ran)."""
    import jax

    model, flags = _cpu()
    device = jax.devices()[0]
    fingerprint = {
        "jax": jax.__version__,
        "jaxlib": package_version("jaxlib"),
        "numpy": package_version("numpy"),
        "ml_dtypes": package_version("ml_dtypes"),
        "kimi_jax": package_version("kimi-jax"),
        "python": sys.version.split()[0],
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "cpu_flags": flags,
        "machine": platform.machine(),
        "os": f"{platform.system()} {platform.release()}",
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "jax_enable_x64": bool(jax.config.jax_enable_x64),
    }
    if mesh is not None:
        fingerprint.update(mesh=mesh, process_count=jax.process_count())
    if kernels is not None:
        fingerprint["kernels"] = kernels
    return fingerprint


def mesh_label(expert: int, model: int, placement: str) -> str:
    """How a mesh is named in platform fingerprints and anchors: ``"2x4 streamed"``."""
    return f"{expert}x{model} {placement}"


def fingerprint_digest(fp: dict[str, Any]) -> str:
    return blake3.blake3(canonical_json(fp)).hexdigest()


def platform_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
