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

__all__ = ["Effect", "result", "neutral", "added_later", "effect_in", "model_in", "with_recorded_defaults",
           "UNDECLARED"]  # fmt: skip


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


@dataclasses.dataclass(frozen=True)
class Recorded:
    """What a field's absence means in a recorded manifest: the value runs had before the field existed."""

    value: Any


_SAME = object()


def added_later(default: Any, was: Any = _SAME, **field_kwargs: Any) -> Any:
    """A field added after manifests were first written: left out of ``resolved_dict()`` (and so of
    the manifest's digest) while it holds the value runs had before it existed, so manifests written
    then keep their identity.

    That value is ``default``, unless the default has changed since (``was``: the old behaviour).
    Then a manifest that says nothing gets the new default and a new identity (it computes something
    else), and a recorded manifest that leaves the field out still means ``was``
    (:func:`with_recorded_defaults`)."""
    original = default if was is _SAME else was
    info = Field(default=default, exclude_if=lambda value: value == original, **field_kwargs)
    info.metadata.append(Recorded(original))
    return info


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


def with_recorded_defaults(root: type[BaseModel], data: Any) -> Any:
    """A recorded resolved manifest (a bundle's ``manifest.json``) with every field it leaves out at
    its recorded value filled in, section by section, so it validates as the run it records even
    where a default has changed since."""
    if not isinstance(data, dict):
        return data
    out = dict(data)
    for name, info in root.model_fields.items():
        recorded = next((m for m in info.metadata if isinstance(m, Recorded)), None)
        sub = model_in(info.annotation)
        if name not in out and recorded is not None:
            out[name] = recorded.value
        elif sub is not None and isinstance(out.get(name), dict):
            out[name] = with_recorded_defaults(sub, out[name])
    return out
