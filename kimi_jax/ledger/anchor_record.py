"""The anchor file's format: a frozen step 0 and the conditions it was frozen under.

An anchor is a record like the ledger: ``run`` writes and checks it (:mod:`kimi_jax.run.anchor`),
``verify`` reads the one a bundle carries, without the model.

The dequantization mode of quantized weights is one of the conditions (anchor version 2). An anchor
without one (kimi-jax 0.1.0 wrote none: it always rounded to bfloat16) is read as bf16-rounded,
and every message about it says so.
"""

from __future__ import annotations

from typing import Any

from kimi_jax.ledger.ledger import f32, step_identity
from kimi_jax.storage.codecs import describe_dequant, recorded_dequant

__all__ = ["ANCHOR_VERSION", "MAX_ANCHOR_BYTES", "ANCHORED", "anchor_values", "condition_differences"]

ANCHOR_VERSION = 2  # 2: checkpoint.config_digest is BLAKE3, as in ledger version 2, and the dequant condition
# An anchor is a few kilobytes (the platform fingerprint is the largest part).
MAX_ANCHOR_BYTES = 1024 * 1024
# The values of step 0 an anchor freezes.
ANCHORED = ("token", "logit", "hidden_digest", "logits_digest", "bytes_read")


def anchor_values(step) -> dict[str, Any]:
    """The :data:`ANCHORED` values of a step record."""
    ident = step_identity(step)
    return {"token": ident["token"], "logit": f32(step.logit), "hidden_digest": ident["hidden_digest"],
            "logits_digest": ident["logits_digest"], "bytes_read": ident["bytes_read"]}  # fmt: skip


def condition_differences(anchor: dict[str, Any], want: dict[str, Any]) -> list[str]:
    """``key: anchor X, this run Y`` for each condition but the checkpoint that differs. An anchor
    without a ``dequant`` condition is read as bf16-rounded, and the line says why."""
    diffs = []
    for key, value in want.items():
        if key == "dequant":
            if recorded_dequant(anchor.get(key)) != value:
                diffs.append(f"dequant (dequantization mode of quantized weights): anchor "
                             f"{describe_dequant(anchor.get(key))}, this run {value}")  # fmt: skip
        elif key != "checkpoint" and anchor.get(key) != value:
            diffs.append(f"{key}: anchor {anchor.get(key)!r}, this run {value!r}")
    return diffs
