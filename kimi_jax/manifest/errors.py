"""Schema errors as people read them: ``FILE:LINE: FIELD: what was wrong and what was expected``.

pydantic's errors are translated one by one (a missing section gets a hint of what to set, an
unknown key the closest allowed one, a wrong type the type expected) and sorted by where they
are in the file; every problem of a manifest is reported at once, in one
:class:`~kimi_jax.errors.ManifestError`.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

from kimi_jax.errors import ManifestError
from kimi_jax.manifest.fields import model_in
from kimi_jax.manifest.origins import MANIFEST_VERSION, Origins, describe_value
from kimi_jax.manifest.schema import Manifest
from kimi_jax.settings import SYNTH_PRESETS

__all__ = ["format_errors"]

# Most problems reported for one manifest; the rest are summarised in one line.
_MAX_REPORTED = 50


_MISSING_HINTS = {
    ("version",): f"required; expected version: {MANIFEST_VERSION}",
    ("model",): "required; set model.checkpoint (a checkpoint directory) or model.synthetic",
    ("output",): "required; set output.dir (or pass --out)",
    ("output", "dir"): "required; set output.dir (or pass --out)",
    ("model", "synthetic", "preset"): "required; expected one of " + ", ".join(repr(p) for p in SYNTH_PRESETS),
}

_TYPE_NAMES = {
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "a boolean (true or false)",
    "string_type": "a string",
    "list_type": "a list",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "dict_type": "a mapping",
}


def _section_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model class validating the mapping at ``loc`` (for listing its allowed keys)."""
    cls: type[BaseModel] = Manifest
    for part in loc:
        info = cls.model_fields.get(str(part))
        if info is None:
            return None
        sub = model_in(info.annotation)
        if sub is None:
            return None
        cls = sub
    return cls



def _error_message(err: Mapping[str, Any]) -> str:
    kind = err.get("type", "")
    ctx = err.get("ctx") or {}
    value = err.get("input")
    loc = tuple(str(x) for x in err.get("loc", ()))
    if kind == "manifest":
        return str(ctx.get("message", err.get("msg", "")))
    if kind == "missing":
        return _MISSING_HINTS.get(loc, "required field is missing")
    if kind == "extra_forbidden":
        cls = _section_at(loc[:-1])
        if cls is None:
            return "unknown key"
        allowed = list(cls.model_fields)
        close = difflib.get_close_matches(loc[-1], allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown key{hint}; expected one of: {', '.join(allowed)}"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected', '?')}, got {describe_value(value)}"
    if kind == "finite_number":
        return f"must be a finite number, got {describe_value(value)}"
    if kind in _TYPE_NAMES:
        return f"expected {_TYPE_NAMES[kind]}, got {describe_value(value)}"
    if kind == "greater_than_equal":
        return f"must be >= {ctx.get('ge')}, got {describe_value(value).split(' ', 1)[-1]}"
    if kind == "less_than_equal":
        return f"must be <= {ctx.get('le')}, got {describe_value(value).split(' ', 1)[-1]}"
    if kind == "greater_than":
        return f"must be > {ctx.get('gt')}, got {describe_value(value).split(' ', 1)[-1]}"
    if kind == "less_than":
        return f"must be < {ctx.get('lt')}, got {describe_value(value).split(' ', 1)[-1]}"
    if kind == "too_short":
        return "must be a non-empty list"
    if kind == "string_too_short":
        return "must be a non-empty string"
    if kind == "value_error":
        return str(ctx.get("error", err.get("msg", "")))
    return str(err.get("msg", "invalid value"))


def format_errors(exc: ValidationError, origins: Origins,
                  more: list[tuple[tuple[int, int], str]] = ()) -> ManifestError:  # fmt: skip
    """Every problem as ``FILE:LINE: FIELD: message``, in file order; ``more``: problems found
    outside the schema, as (sort key, line)."""
    entries: list[tuple[tuple[int, int], int, str]] = [(order, -1, text) for order, text in more]
    for n, err in enumerate(exc.errors(include_url=False)):
        loc = tuple(str(x) for x in err.get("loc", ()))
        kind = {"extra_forbidden": "key", "missing": "missing"}.get(err.get("type", ""), "value")
        where, order = origins.locate(loc, kind)
        field = ".".join(loc) or "<manifest>"
        entries.append((order, n, f"{where}: {field}: {_error_message(err)}"))
    entries.sort()
    lines = [text for _, _, text in entries[:_MAX_REPORTED]]
    if len(entries) > _MAX_REPORTED:
        lines.append(f"... and {len(entries) - _MAX_REPORTED} more problems")
    error = ManifestError("\n".join(lines))
    error.problems = tuple(text for _, _, text in entries)  # type: ignore[attr-defined]
    return error
