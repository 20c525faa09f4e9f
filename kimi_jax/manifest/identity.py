"""A manifest's identity: what makes two runs the same run, as one BLAKE3 digest.

Both functions take the resolved dict (``Manifest.resolved_dict()`` or a bundle's
``manifest.json``), so a recorded manifest is digested without re-validating paths that may no
longer exist.
"""

from __future__ import annotations

import copy
from typing import Any

import blake3

from kimi_jax.fileio import canonical_json

__all__ = ["identity_of", "manifest_digest"]


def identity_of(resolved: dict[str, Any]) -> dict[str, Any]:
    """A resolved manifest dict without the fields that only say where things are written
    (``output.dir``, ``model.cache_dir``) or how the processes find each other (``distributed``):
    the same run written elsewhere, resumed into another folder, or launched from another host,
    keeps its identity. (The process count is in the platform fingerprint instead.)"""
    data = copy.deepcopy(resolved)
    data.pop("output", None)
    data.pop("distributed", None)
    if isinstance(data.get("model"), dict):
        data["model"].pop("cache_dir", None)
    return data


def manifest_digest(resolved: dict[str, Any]) -> str:
    """The run's manifest identity: BLAKE3 hex of :func:`identity_of` as canonical JSON (sorted keys,
    compact separators). Takes the dict, so a bundle's ``manifest.json`` is digested without
    re-validating paths that may no longer exist."""
    return blake3.blake3(canonical_json(identity_of(resolved))).hexdigest()
