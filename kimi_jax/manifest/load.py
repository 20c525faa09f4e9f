"""Loading a manifest: a YAML file (with ``--set`` overrides and ``--out``), or a dict; and the
published JSON Schema."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from kimi_jax.errors import ManifestError
from kimi_jax.fileio import parse_json, read_regular
from kimi_jax.manifest.errors import format_errors
from kimi_jax.manifest.fields import with_recorded_defaults
from kimi_jax.manifest.origins import MANIFEST_VERSION, Origins, apply_overrides, describe_value, parse_yaml
from kimi_jax.manifest.schema import Manifest

__all__ = ["MANIFEST_SCHEMA_ID", "MAX_MANIFEST_BYTES", "load_manifest", "parse_manifest_dict", "recorded_manifest",
           "load_recorded_manifest", "manifest_json_schema"]  # fmt: skip

MANIFEST_SCHEMA_ID = "urn:kimi-jax:schema:manifest:v1"
_JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
# The shipped manifests are under 2 KB; a megabyte of YAML is not a manifest.
MAX_MANIFEST_BYTES = 1024 * 1024


def _validate(
    data: Any, origins: Origins, base_dir: Path, source: Path | None, check_paths: bool = True
) -> Manifest:
    if not isinstance(data, Mapping):
        raise ManifestError(f"{origins.display}: the manifest must be a mapping, got {describe_value(data)}")
    context = {"base_dir": base_dir, "check_paths": check_paths}
    choice = prompt_choice(data, origins)
    try:
        manifest = Manifest.model_validate(dict(data), context=context)
    except ValidationError as exc:
        raise format_errors(exc, origins, choice) from None
    if choice:
        raise ManifestError("\n".join(text for _, text in choice))
    manifest._source = source
    manifest._origins = origins
    return manifest



def prompt_choice(data: Mapping[str, Any], origins: Origins) -> list[tuple[tuple[int, int], str]]:
    """The problem, if any, with which prompts the manifest gives: exactly one of ``prompt`` and
    ``prompts`` (as ``(sort key, "FILE:LINE: FIELD: message")``, reported with the schema's problems)."""
    given = [key for key in ("prompt", "prompts") if data.get(key) is not None]
    if len(given) == 2:
        where, order = origins.locate(("prompts",), "key")
        return [(order, f"{where}: prompts: exclusive with prompt (at {origins.locate(('prompt',), 'key')[0]}); "
                        "give one prompt as prompt, or every prompt as an entry of prompts")]
    if not given:
        where, order = origins.locate(("prompt",), "missing")
        return [(order, f"{where}: prompt: required; set prompt.tokens (a list of token ids), prompt.text or "
                        "prompt.chat, or prompts (a list of such prompts)")]
    return []


def load_manifest(
    path: str | os.PathLike[str],
    overrides: Iterable[str] = (),
    out_dir: str | os.PathLike[str] | None = None,
    *,
    check_paths: bool = True,
) -> Manifest:
    """Load, override, validate and resolve a YAML run manifest.

    ``overrides`` are ``dotted.key=VALUE`` strings (the CLI's repeatable ``--set``), VALUE
    parsed as a YAML scalar or flow value; ``out_dir`` (the CLI's ``--out``) replaces
    ``output.dir`` and resolves against the current working directory. Raises
    :class:`ManifestError` listing every problem as ``FILE:LINE: FIELD: message``.

    ``check_paths=False`` skips what needs the filesystem (that ``model.checkpoint`` is a folder
    holding config.json): for reading a manifest whose checkpoint is elsewhere or gone, as
    ``compare`` and ``verify`` do. A bundle's ``manifest.json`` loads here too (JSON is YAML).
    """
    display = os.fspath(path)
    file = Path(display).expanduser()
    if file.is_dir():
        raise ManifestError(f"{display}: is a directory, expected a YAML manifest file")
    if not file.exists():
        raise ManifestError(f"{display}: manifest file not found")
    raw = read_regular(file, MAX_MANIFEST_BYTES, "manifest", ManifestError)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ManifestError(
            f"{display}: manifest is not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None
    data, origins = parse_yaml(text, display)
    data = apply_overrides(data, origins, overrides, out_dir)
    absolute = Path(os.path.abspath(file))
    return _validate(data, origins, absolute.parent, absolute, check_paths)


def parse_manifest_dict(
    data: dict[str, Any], source: str = "<dict>", *, base_dir: str | os.PathLike[str] | None = None
) -> Manifest:
    """Validate a manifest given as a dict (tests, other tools). Relative paths resolve
    against ``base_dir`` (default: the working directory); errors read ``SOURCE: FIELD: ...``."""
    origins = Origins(str(source), has_lines=False)
    base = Path(os.path.abspath(Path(base_dir).expanduser())) if base_dir is not None else Path.cwd()
    return _validate(data, origins, base, None)


def recorded_manifest(resolved: Any) -> Any:
    """A recorded resolved manifest (a bundle's ``manifest.json``) as the run it records: the fields
    it leaves out filled with what they meant when it was written (see
    :func:`~kimi_jax.manifest.fields.added_later`), even where a default has changed since."""
    return with_recorded_defaults(Manifest, resolved)


def load_recorded_manifest(path: str | os.PathLike[str]) -> Manifest:
    """A bundle's ``manifest.json`` validated as the run it records (:func:`recorded_manifest`),
    without checking that the checkpoint it names is still there."""
    display = os.fspath(path)
    raw = read_regular(Path(display), MAX_MANIFEST_BYTES, "manifest", ManifestError)
    data = parse_json(raw, display, ManifestError)
    origins = Origins(display, has_lines=False)
    return _validate(recorded_manifest(data), origins, Path(os.path.abspath(display)).parent, None, check_paths=False)


def manifest_json_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of manifest version 1, generated from the pydantic models.

    It checks structure and types and rejects unknown keys; it cannot check what needs the
    filesystem (the checkpoint directory and its config.json)."""
    generated = Manifest.model_json_schema(mode="validation")
    generated.pop("title", None)
    generated.pop("description", None)
    schema: dict[str, Any] = {
        "$schema": _JSON_SCHEMA_DIALECT,
        "$id": MANIFEST_SCHEMA_ID,
        "title": f"kimi-jax run manifest (version {MANIFEST_VERSION})",
        "description": "Declarative run manifest of kimi-jax: checkpoint, compute, storage, "
        "prompt, generation, capture, anchor and output settings.",
    }
    schema.update(generated)
    return schema
