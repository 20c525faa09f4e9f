"""Floats as the ledger writes them: the shortest decimal that reads back to the identical float32.

Its own module so that the ledger and the modules that derive its fields can both use it without
importing each other."""

from __future__ import annotations

from typing import Any

import numpy as np


def f32(x: Any) -> float:
    """A Python float whose JSON repr is the shortest decimal that reads back to float32(x)."""
    value = np.float32(x)
    if not np.isfinite(value):
        raise ValueError(f"non-finite value {value} cannot be written to the ledger")
    short = float(np.format_float_positional(value, unique=True, trim="-"))
    return short if np.float32(short) == value else float(value)


def f32_list(a: Any) -> Any:
    arr = np.asarray(a, dtype=np.float32)
    return [f32_list(row) for row in arr] if arr.ndim > 1 else [f32(v) for v in arr]
