"""The values a run's settings can take, named once.

The manifest (stage 0) validates a run's settings against these names, and the stages that act on
them (storage, model) import them from here, so a new mode is added in one place and the manifest
depends on no later stage.
"""

from __future__ import annotations

import re
from typing import Literal, get_args

__all__ = [
    "EXACT", "BF16_ROUNDED", "DEQUANT_MODES", "MATMUL_MODES", "SynthPreset", "SYNTH_PRESETS", "SynthLayout",
    "SYNTH_LAYOUTS", "AUTO",
    "ExpertPolicy", "EXPERT_POLICIES", "PageCacheMode", "PAGE_CACHE_MODES", "PROOF_SCOPES", "PROVE_FIRST",
    "PROVE_ALL", "parse_size",
]

# How int4/FP8 weights are dequantized (kimi_jax.storage.codecs).
EXACT, BF16_ROUNDED = "exact", "bf16-rounded"
DEQUANT_MODES: tuple[str, ...] = (EXACT, BF16_ROUNDED)

# How weights enter matmuls (kimi_jax.model.weights): the CPU kernels, XLA's products on the stored
# precision, or the weight widened whole (the reference).
MATMUL_MODES: tuple[str, ...] = ("kernels", "stored", "widened")

# Synthetic checkpoints (kimi_jax.storage.synth): the model's size, and which real release it imitates.
SynthPreset = Literal["tiny", "small", "full-shape", "full-shape-routed"]
SYNTH_PRESETS: tuple[str, ...] = get_args(SynthPreset)
SynthLayout = Literal["kimi-k2.5", "kimi-k2-fp8", "deepseek-v3", "hf-bf16"]
SYNTH_LAYOUTS: tuple[str, ...] = get_args(SynthLayout)

# The residency budget (kimi_jax.storage.residency): a size, or measured at the start.
AUTO = "auto"
ExpertPolicy = Literal["lru", "lfu"]
EXPERT_POLICIES: tuple[str, ...] = get_args(ExpertPolicy)
PageCacheMode = Literal["auto", "keep", "drop"]
PAGE_CACHE_MODES: tuple[str, ...] = get_args(PageCacheMode)

# Which steps the non-perturbation proof runs bare as well (kimi_jax.run.runner, the ledger's
# non_perturbation.scope): step 0, the anchor step (run's default), or every step (kimi-jax prove).
PROVE_FIRST, PROVE_ALL = "first", "all"
PROOF_SCOPES: tuple[str, ...] = (PROVE_FIRST, PROVE_ALL)

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | str) -> int:
    """``8GiB``, ``512 MiB``, ``1.5GB``, ``4096`` or an int -> bytes. Raises ValueError saying what is expected."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size such as 8GiB, 512MiB or a byte count, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"expected a size >= 0, got {value}")
        return value
    match = _SIZE.match(str(value))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"expected a size such as 8GiB, 512MiB, 1.5GB or a byte count, or 'auto'; got {value!r}")
    return int(float(match.group(1)) * _UNITS[unit])
