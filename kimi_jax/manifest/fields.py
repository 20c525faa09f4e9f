"""How a manifest field is declared: what it does to results, and how a field added later keeps
older manifests' identity.

Each field says where it is declared whether a different value can change what a run computes
(:func:`result`) or cannot (:func:`neutral`), and why. ``compare`` reads those declarations
(:func:`effect_in`) instead of keeping tables of its own, and a test requires every field of the
manifest to carry one, so a new field cannot be forgotten there. A whole section may declare one
effect for all its fields (a class attribute ``EFFECT``); a field inside it may declare its own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, Field

__all__ = ["Effect", "result", "neutral", "added_later", "effect_in", "model_in", "UNDECLARED"]


@dataclasses.dataclass(frozen=True)
class Effect:
    """What a different value of a field does to a run's tokens, digests and bytes read."""

    kind: Literal["result", "neutral"]
    why: str


def result(why: str) -> Effect:
    """A field whose value can change what the run computes."""
    return Effect("result", why)


def neutral(why: str) -> Effect:
    """A field whose value cannot change the tokens, digests or bytes read."""
    return Effect("neutral", why)


# What compare says of a field that declares nothing (the schema test keeps this from happening).
UNDECLARED = result("not known to leave results unchanged")


def added_later(default: Any, **field_kwargs: Any) -> Any:
    """A field added after manifests were first written: left out of ``resolved_dict()`` (and so of
    the manifest's digest) while it holds ``default``, so manifests written before the field
    existed keep their identity."""
    return Field(default=default, exclude_if=lambda value: value == default, **field_kwargs)


def model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model class inside a field's annotation (``Section | None`` -> ``Section``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = model_in(arg)
        if found is not None:
            return found
    return None


def effect_in(root: type[BaseModel], path: Sequence[str]) -> Effect | None:
    """The effect declared for the dotted field ``path`` under the model ``root``: the deepest
    declaration on the way down (a field's own, or its section's ``EFFECT``); None when nothing on
    the path declares one. Parts below the last model (list items, mapping keys) inherit."""
    found: Effect | None = None
    cls: type[BaseModel] | None = root
    for part in path:
        info = cls.model_fields.get(str(part)) if cls is not None else None
        if info is None:
            break
        sub = model_in(info.annotation)
        section = getattr(sub, "EFFECT", None) if sub is not None else None
        found = section if isinstance(section, Effect) else found
        found = next((m for m in info.metadata if isinstance(m, Effect)), found)
        cls = sub
    return found
