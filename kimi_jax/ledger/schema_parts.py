"""The building blocks of the ledger schemas (version 2 in :mod:`kimi_jax.ledger.ledger`, version 3
in :mod:`kimi_jax.ledger.sequences`): every leaf is tagged with its provenance (``x-provenance``)."""

from __future__ import annotations

COUNT = {"type": "integer", "minimum": 0}


def measured(schema: dict, doc: str) -> dict:
    """A field read directly off the execution."""
    return {**schema, "x-provenance": "measured", "description": doc}


def derived(schema: dict, doc: str) -> dict:
    """A field computed from measured ones by a function verify re-runs."""
    return {**schema, "x-provenance": "derived", "description": doc}


def schema_object(props: dict, required: list[str] | None = None) -> dict:
    """An object of exactly ``props`` (all required unless ``required`` says otherwise)."""
    return {"type": "object", "additionalProperties": False, "properties": props,
            "required": list(props) if required is None else required}  # fmt: skip


__all__ = ["COUNT", "measured", "derived", "schema_object"]
