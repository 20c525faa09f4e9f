"""The declarative YAML run manifest (schema version 1).

A manifest says which checkpoint to stream (a real one on disk, or a synthetic one generated
on first use), how to compute and read it, which prompt to run, what to capture and where to
write the results::

    version: 1
    model:
      checkpoint: ../ckpt/kimi-k2.5      # or: synthetic: {preset: tiny, layout: kimi-k2.5, seed: 0}
    prompt:
      tokens: [163584]
    generate:
      max_new_tokens: 5
    output:
      dir: ../runs/demo

The schema is strict: unknown keys anywhere are errors, and types are not coerced (``"5"`` is
not an integer, ``1`` is not a boolean, ``5.0`` is not an integer). Every problem is reported
as ``FILE:LINE: FIELD: what was wrong and what was expected`` (or ``--set KEY=VALUE: FIELD: ...``
for a value that came from a command-line override), all problems of a manifest at once, in a
single :class:`~kimi_jax.errors.ManifestError`.

Relative paths in the file resolve against the manifest's own folder, ``~`` is expanded, and
the validated :class:`Manifest` holds absolute :class:`pathlib.Path` objects. ``--out``
replaces ``output.dir`` and resolves against the current working directory instead.

YAML is only ever read with PyYAML's ``SafeLoader``: tags such as ``!!python/object`` are
rejected, never executed.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import blake3
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from kimi_jax.errors import ManifestError

__all__ = [
    "MANIFEST_VERSION",
    "MANIFEST_SCHEMA_ID",
    "CAPTURE_KINDS",
    "Manifest",
    "ModelSection",
    "SyntheticSection",
    "ComputeSection",
    "StorageSection",
    "PromptSection",
    "GenerateSection",
    "OutputSection",
    "VindexSection",
    "load_manifest",
    "parse_manifest_dict",
    "manifest_json_schema",
    "default_cache_dir",
]

MANIFEST_VERSION = 1
MANIFEST_SCHEMA_ID = "urn:kimi-jax:schema:manifest:v1"
_JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"

Preset = Literal["tiny", "small", "full-shape"]
Layout = Literal["kimi-k2.5", "kimi-k2-fp8", "deepseek-v3", "hf-bf16"]
DType = Literal["float32", "bfloat16"]
CaptureKind = Literal["norms", "routing", "logits"]
CAPTURE_KINDS: tuple[str, ...] = ("norms", "routing", "logits")

# Most problems reported for one manifest; the rest are summarised in one line.
_MAX_REPORTED = 50
# Most YAML node references walked when recording line numbers (guards alias bombs).
_MAX_NODES = 200_000


def default_cache_dir() -> Path:
    """Where synthetic checkpoints are generated when ``model.cache_dir`` is not set:
    ``$KIMI_JAX_CACHE`` (relative to the working directory) or ``~/.cache/kimi-jax``."""
    env = os.environ.get("KIMI_JAX_CACHE")
    if env:
        return Path(env).expanduser().resolve()
    return (Path.home() / ".cache" / "kimi-jax").resolve()


# ---------------------------------------------------------------------------------------------
# Validators shared by the models.


def _fail(message: str) -> PydanticCustomError:
    # The message goes in through the context so braces in user text are never interpreted.
    return PydanticCustomError("manifest", "{message}", {"message": message})


def _describe(value: Any) -> str:
    """A short description of a YAML value for error messages: ``string '5'``, ``integer 1``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {'true' if value else 'false'}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"float {value!r}"
    if isinstance(value, str):
        text = value if len(value) <= 60 else value[:57] + "..."
        return f"string {text!r}"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return f"a {type(value).__name__} ({str(value)[:40]})"


def _base_dir(info: ValidationInfo) -> Path:
    ctx = info.context if isinstance(info.context, Mapping) else {}
    base = ctx.get("base_dir")
    return Path(base) if base is not None else Path.cwd()


def _check_paths(info: ValidationInfo) -> bool:
    ctx = info.context if isinstance(info.context, Mapping) else {}
    return bool(ctx.get("check_paths", True))


def _resolve_path(value: Any, info: ValidationInfo) -> Path:
    if isinstance(value, Path):  # programmatic use (parse_manifest_dict)
        path = value
    elif isinstance(value, str):
        if not value.strip():
            raise _fail("must be a non-empty path string")
        path = Path(value)
    else:
        raise _fail(f"expected a path string, got {_describe(value)}")
    try:
        path = path.expanduser()
    except RuntimeError as exc:  # ~user that does not exist, or no home directory
        raise _fail(f"cannot expand '~' in {str(value)!r}: {exc}") from None
    if not path.is_absolute():
        path = _base_dir(info) / path
    return path.resolve()


def _check_checkpoint_dir(path: Path, info: ValidationInfo) -> Path:
    if not _check_paths(info):
        return path
    if not path.exists():
        raise _fail(f"checkpoint directory {path} does not exist")
    if not path.is_dir():
        raise _fail(f"checkpoint path {path} is not a directory")
    if not (path / "config.json").is_file():
        raise _fail(
            f"checkpoint directory {path} has no config.json "
            "(expected a checkpoint directory in Hugging Face layout)"
        )
    return path


def _check_version(value: Any) -> Any:
    # Literal[1] alone would accept true and 1.0; the version must be the integer 1.
    if type(value) is not int or value != MANIFEST_VERSION:
        raise _fail(
            f"unsupported manifest version {_describe(value)}; "
            f"this kimi-jax reads manifest version {MANIFEST_VERSION}"
        )
    return value


ManifestPath = Annotated[Path, BeforeValidator(_resolve_path)]
CheckpointPath = Annotated[Path, BeforeValidator(_resolve_path), AfterValidator(_check_checkpoint_dir)]
TokenId = Annotated[int, Field(ge=0)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


# ---------------------------------------------------------------------------------------------
# The schema.


class SyntheticSection(_Section):
    """A synthetic checkpoint, generated on first use into ``model.cache_dir``."""

    preset: Preset = Field(description="Model size: tiny | small | full-shape.")
    layout: Layout = Field(
        default="kimi-k2.5",
        description="Tensor naming and quantization layout of the generated checkpoint.",
    )
    seed: int = Field(default=0, ge=0, description="Seed of the generated weights.")


class ModelSection(_Section):
    """Exactly one of ``checkpoint`` / ``synthetic``."""

    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [
                {"required": ["checkpoint"], "properties": {"checkpoint": {"type": "string"}}},
                {"required": ["synthetic"], "properties": {"synthetic": {"type": "object"}}},
            ]
        }
    )

    checkpoint: CheckpointPath | None = Field(
        default=None,
        description="Checkpoint directory in Hugging Face layout (must contain config.json); "
        "relative to the manifest's folder, '~' expanded.",
    )
    synthetic: SyntheticSection | None = Field(
        default=None, description="Generate a synthetic checkpoint instead of reading one."
    )
    cache_dir: ManifestPath | None = Field(
        default=None,
        validate_default=True,
        description="Directory for generated synthetic checkpoints; "
        "default $KIMI_JAX_CACHE or ~/.cache/kimi-jax.",
    )

    @field_validator("cache_dir", mode="after")
    @classmethod
    def _default_cache_dir(cls, value: Path | None) -> Path:
        return default_cache_dir() if value is None else value

    @model_validator(mode="after")
    def _exactly_one_source(self) -> ModelSection:
        if self.checkpoint is not None and self.synthetic is not None:
            raise _fail("exactly one of model.checkpoint / model.synthetic may be set, got both")
        if self.checkpoint is None and self.synthetic is None:
            raise _fail("exactly one of model.checkpoint / model.synthetic must be set, got neither")
        return self


class ComputeSection(_Section):
    dtype: DType = Field(default="float32", description="Activation dtype: float32 | bfloat16.")


class StorageSection(_Section):
    evict_page_cache: bool = Field(
        default=False,
        description="Drop the shards from the OS page cache before the run (cold measurement).",
    )
    prefetch: bool = Field(
        default=True,
        description="Read the next layer's non-expert tensors on a background thread.",
    )
    io_retries: int = Field(
        default=3, ge=0, le=10, description="Retries of transient I/O errors (0..10)."
    )


class PromptSection(_Section):
    """Exactly one of ``tokens`` / ``text``."""

    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [
                {"required": ["tokens"], "properties": {"tokens": {"type": "array"}}},
                {"required": ["text"], "properties": {"text": {"type": "string"}}},
            ]
        }
    )

    tokens: list[TokenId] | None = Field(
        default=None, min_length=1, description="Prompt token ids (non-empty, each >= 0)."
    )
    text: str | None = Field(
        default=None,
        min_length=1,
        description="Prompt text; needs a checkpoint that ships a tokenizer.",
    )

    @model_validator(mode="after")
    def _exactly_one_prompt(self) -> PromptSection:
        if self.tokens is not None and self.text is not None:
            raise _fail("exactly one of prompt.tokens / prompt.text may be set, got both")
        if self.tokens is None and self.text is None:
            raise _fail("exactly one of prompt.tokens / prompt.text must be set, got neither")
        return self


class GenerateSection(_Section):
    max_new_tokens: int = Field(default=5, ge=1, description="Tokens to generate (>= 1).")
    kv_cache: bool = Field(default=False, description="Use a KV cache while decoding.")


class OutputSection(_Section):
    dir: ManifestPath = Field(
        description="Run output directory (need not exist); relative to the manifest's folder."
    )


VINDEX_PHASES: tuple[int, ...] = (1, 2, 3)


def _unique_items(value: list[Any] | None, what: str) -> list[Any] | None:
    if value is None:
        return None
    seen: dict[Any, int] = {}
    for i, item in enumerate(value):
        if item in seen:
            raise _fail(f"duplicate {what} {item!r} at index {i} (first at index {seen[item]}); "
                        f"each {what} may appear at most once")
        seen[item] = i
    return value


class VindexSection(_Section):
    """``kimi-jax vindex``: singular-value statistics of the experts (phase 1), the routers
    (phase 2) and routing statistics (phase 3). Ranges are checked against the checkpoint
    before any compute."""

    phases: list[Annotated[int, Field(ge=1, le=3)]] = Field(
        default_factory=lambda: list(VINDEX_PHASES),
        min_length=1,
        json_schema_extra={"uniqueItems": True},
        description="Which phases to run (unique, subset of 1, 2, 3): 1 expert down_proj "
        "spectra, 2 router spectra, 3 routing statistics.",
    )
    layers: list[Annotated[int, Field(ge=0)]] | None = Field(
        default=None,
        min_length=1,
        json_schema_extra={"uniqueItems": True},
        description="Layer indices to analyse (unique); null = every layer.",
    )
    experts: list[Annotated[int, Field(ge=0)]] | None = Field(
        default=None,
        min_length=1,
        json_schema_extra={"uniqueItems": True},
        description="Routed expert ids analysed in phase 1 (unique); null = every expert.",
    )
    top_singular_values: int = Field(
        default=16, ge=1, description="How many of the largest singular values to keep per matrix."
    )
    prompts: list[Annotated[list[TokenId], Field(min_length=1)]] | None = Field(
        default=None,
        min_length=1,
        description="Token-id prompts the engine runs for phase 3; default the manifest's "
        "prompt (or none when bundles are given).",
    )
    max_new_tokens: int | None = Field(
        default=None, ge=1, description="Tokens generated per phase-3 prompt; default generate.max_new_tokens."
    )
    bundles: list[ManifestPath] = Field(
        default_factory=list,
        description="Run-bundle directories whose ledger.json routing records phase 3 also "
        "reads; relative to the manifest's folder.",
    )

    @field_validator("phases", mode="after")
    @classmethod
    def _unique_phases(cls, value: list[int]) -> list[int]:
        return _unique_items(value, "phase")

    @field_validator("layers", mode="after")
    @classmethod
    def _unique_layers(cls, value: list[int] | None) -> list[int] | None:
        return _unique_items(value, "layer")

    @field_validator("experts", mode="after")
    @classmethod
    def _unique_experts(cls, value: list[int] | None) -> list[int] | None:
        return _unique_items(value, "expert id")


class Manifest(_Section):
    """A validated run manifest. Paths are absolute; see :func:`load_manifest`."""

    version: Annotated[Literal[1], BeforeValidator(_check_version)] = Field(
        description="Manifest schema version; must be 1."
    )
    model: ModelSection
    compute: ComputeSection = Field(default_factory=ComputeSection)
    storage: StorageSection = Field(default_factory=StorageSection)
    prompt: PromptSection
    generate: GenerateSection = Field(default_factory=GenerateSection)
    capture: list[CaptureKind] = Field(
        default_factory=lambda: list(CAPTURE_KINDS),
        json_schema_extra={"uniqueItems": True},
        description="What to record: norms | routing | logits (unique); [] = bare run.",
    )
    anchor: ManifestPath | None = Field(
        default=None,
        description="Anchor JSON file (need not exist yet); relative to the manifest's folder.",
    )
    output: OutputSection
    vindex: VindexSection | None = Field(
        default=None,
        # Left out of resolved_dict() (and so of the digest) when absent: a manifest without
        # a vindex section keeps the identity it had before the section existed.
        exclude_if=lambda value: value is None,
        description="Settings of `kimi-jax vindex` (optional).",
    )

    _source: Path | None = PrivateAttr(default=None)
    _origins: _Origins | None = PrivateAttr(default=None)

    @field_validator("capture", mode="after")
    @classmethod
    def _unique_capture(cls, value: list[str]) -> list[str]:
        seen: set[str] = set()
        for i, item in enumerate(value):
            if item in seen:
                raise _fail(
                    f"duplicate entry {item!r} at index {i}; "
                    f"each of {', '.join(CAPTURE_KINDS)} may appear at most once"
                )
            seen.add(item)
        return value

    # -- provenance ----------------------------------------------------------------------------

    @property
    def source(self) -> Path | None:
        """The manifest file this was loaded from (absolute), or None for a dict."""
        return self._source

    def locate(self, field: str) -> str:
        """``FILE:LINE`` of a dotted field (``prompt.tokens.2``), or the ``--set``/``--out``
        text it came from. A field that is not written in the file (a default) gets the line
        of its nearest written ancestor."""
        origins = self._origins
        if origins is None:
            return "<manifest>"
        return origins.locate(_split_field(field))[0]

    def error(self, field: str, message: str) -> ManifestError:
        """A :class:`ManifestError` ``FILE:LINE: FIELD: message`` for later stages to raise,
        e.g. ``manifest.error("prompt.tokens.2", "token id 999 is outside the vocabulary
        (vocab_size 512)")``."""
        return ManifestError(f"{self.locate(field)}: {field}: {message}")

    # -- identity ------------------------------------------------------------------------------

    def resolved_dict(self) -> dict[str, Any]:
        """The full manifest with defaults filled and absolute paths as strings (JSON-ready)."""
        return self.model_dump(mode="json")

    def identity_dict(self) -> dict[str, Any]:
        """:meth:`resolved_dict` without the fields that only say where things are written
        (``output.dir``, ``model.cache_dir``): the same run written elsewhere, or resumed into
        another folder, keeps its identity."""
        data = self.resolved_dict()
        data.pop("output", None)
        data["model"].pop("cache_dir", None)
        return data

    def digest(self) -> str:
        """BLAKE3 hex digest of :meth:`identity_dict` as canonical JSON (sorted keys, compact
        separators): the run's manifest identity."""
        text = json.dumps(self.identity_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return blake3.blake3(text.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------
# Where each value came from.


@dataclass
class _Pos:
    key_line: int | None  # line of the mapping key, None for sequence items and the root
    value_line: int  # line where the value node starts
    collection: bool  # the value is a mapping or a sequence


class _Origins:
    """Maps dotted paths to the file line or the command-line text they came from."""

    def __init__(self, display: str, has_lines: bool) -> None:
        self.display = display
        self.has_lines = has_lines
        self.file: dict[tuple[str, ...], _Pos] = {}
        self.cli: dict[tuple[str, ...], str] = {}

    def set_cli(self, path: tuple[str, ...], label: str) -> None:
        """Record that ``path`` (and everything under it) now comes from ``label``."""
        n = len(path)
        for table in (self.file, self.cli):
            for key in [k for k in table if k[:n] == path]:
                del table[key]
        self.cli[path] = label

    def locate(self, parts: tuple[str, ...], kind: str = "value") -> tuple[str, tuple[int, int]]:
        """(text, sort key) for a path. ``kind``: ``value`` (the value node), ``key`` (the key
        itself: unknown keys) or ``missing`` (a missing key: its parent mapping)."""
        if kind == "missing":
            parts, kind = parts[:-1], "value"
        for i in range(len(parts), -1, -1):
            prefix = parts[:i]
            if prefix in self.cli:
                return self.cli[prefix], (1, 0)
            pos = self.file.get(prefix)
            if pos is None:
                continue
            exact = i == len(parts)
            if pos.key_line is not None and (not exact or kind == "key" or pos.collection):
                line = pos.key_line
            else:
                line = pos.value_line
            return f"{self.display}:{line}", (0, line)
        return self.display, (0, 0)


def _split_field(field: str) -> tuple[str, ...]:
    return tuple(part for part in str(field).split(".") if part != "") if field else ()


# ---------------------------------------------------------------------------------------------
# Reading YAML.

_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"


def _check_keys(root: yaml.Node, display: str) -> list[str]:
    """Mapping keys must be unique strings (safe_load would silently keep the last one)."""
    problems: list[str] = []
    seen: set[int] = set()
    stack: list[tuple[yaml.Node, tuple[str, ...]]] = [(root, ())]
    walked = 0
    while stack:
        node, path = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        walked += 1
        if walked > _MAX_NODES:
            break
        if isinstance(node, yaml.MappingNode):
            keys: dict[str, int] = {}
            for key_node, value_node in node.value:
                line = key_node.start_mark.line + 1
                if key_node.tag == _MERGE_TAG:
                    stack.append((value_node, path))
                    continue
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != _STR_TAG:
                    shown = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
                    field = ".".join((*path, str(shown)))
                    problems.append(
                        f"{display}:{line}: {field}: mapping keys must be strings, "
                        f"got {shown!r} (quote it if it is meant as a key)"
                    )
                    continue
                name = key_node.value
                field = ".".join((*path, name))
                if name in keys:
                    problems.append(
                        f"{display}:{line}: {field}: duplicate key "
                        f"(first given on line {keys[name]})"
                    )
                else:
                    keys[name] = line
                stack.append((value_node, (*path, name)))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                stack.append((item, (*path, str(i))))
    problems.sort(key=lambda text: int(text[len(display) + 1 :].split(":", 1)[0]))
    return problems


def _record_lines(root: yaml.Node, origins: _Origins) -> None:
    """Record each path's key and value lines. A node reached a second time through an alias
    is recorded at its new path but not walked again (its children fall back to it)."""
    walked: set[int] = set()
    count = 0
    stack: list[tuple[yaml.Node, tuple[str, ...], int | None]] = [(root, (), None)]
    while stack:
        node, path, key_line = stack.pop()
        count += 1
        if count > _MAX_NODES:
            break
        collection = isinstance(node, (yaml.MappingNode, yaml.SequenceNode))
        origins.file[path] = _Pos(key_line, node.start_mark.line + 1, collection)
        if id(node) in walked:
            continue
        walked.add(id(node))
        if isinstance(node, yaml.MappingNode):
            # After construction merge keys are flattened in place: merged pairs come first,
            # explicit keys later win. Push in reverse so earlier pairs are recorded first.
            for key_node, value_node in reversed(node.value):
                if isinstance(key_node, yaml.ScalarNode):
                    stack.append((value_node, (*path, key_node.value), key_node.start_mark.line + 1))
        elif isinstance(node, yaml.SequenceNode):
            for i in range(len(node.value) - 1, -1, -1):
                stack.append((node.value[i], (*path, str(i)), None))


def _yaml_error(display: str, exc: yaml.YAMLError) -> ManifestError:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"{display}:{mark.line + 1}" if mark is not None else display
    if isinstance(exc, yaml.constructor.ConstructorError):
        problem = exc.problem or str(exc)
        if "could not determine a constructor" in problem:
            problem += (
                "; manifests are read with safe YAML loading, which allows plain "
                "mappings, lists, strings, numbers, booleans and null only"
            )
        return ManifestError(f"{where}: YAML error: {problem}")
    if isinstance(exc, yaml.MarkedYAMLError):
        problem = exc.problem or "invalid YAML"
        if exc.context:
            problem = f"{exc.context}: {problem}"
        return ManifestError(f"{where}: YAML syntax error: {problem}")
    return ManifestError(f"{where}: YAML error: {exc}")


def _parse_yaml(text: str, display: str) -> tuple[dict[str, Any], _Origins]:
    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except yaml.YAMLError as exc:
            raise _yaml_error(display, exc) from None
        if node is None:
            raise ManifestError(
                f"{display}: manifest is empty; expected a mapping with version: "
                f"{MANIFEST_VERSION}, model, prompt and output"
            )
        if not isinstance(node, yaml.MappingNode):
            kind = "a list" if isinstance(node, yaml.SequenceNode) else "a scalar"
            raise ManifestError(
                f"{display}:{node.start_mark.line + 1}: the top level must be a mapping "
                f"(version, model, prompt, output, ...), got {kind}"
            )
        key_problems = _check_keys(node, display)
        try:
            data = loader.construct_document(node)
        except yaml.YAMLError as exc:
            raise _yaml_error(display, exc) from None
        if key_problems:
            raise ManifestError("\n".join(key_problems))
    finally:
        loader.dispose()
    origins = _Origins(display, has_lines=True)
    _record_lines(node, origins)
    return data, origins


# ---------------------------------------------------------------------------------------------
# Overrides.


class _OverrideError(Exception):
    pass


def _parse_override_value(raw: str) -> Any:
    loader = yaml.SafeLoader(raw)
    try:
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)) and not node.flow_style:
                raise _OverrideError(
                    f"value {raw!r} is not a YAML scalar or flow value ([...] or {{...}}); "
                    "quote text that contains ': ' or starts with '- '"
                )
            return loader.construct_document(node)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc)
            raise _OverrideError(f"value {raw!r} is not valid YAML: {problem}") from None
    finally:
        loader.dispose()


def _set_path(
    data: dict[str, Any], parts: tuple[str, ...], value: Any, origins: _Origins, label: str
) -> None:
    cur = data
    for i, part in enumerate(parts[:-1]):
        prefix = parts[: i + 1]
        child = cur.get(part)
        if child is None:
            cur[part] = {}
            origins.set_cli(prefix, label)
        elif isinstance(child, dict):
            # YAML aliases share objects: copy along the path so only this place changes.
            cur[part] = dict(child)
        else:
            raise _OverrideError(
                f"cannot set {'.'.join(parts)}: {'.'.join(prefix)} is {_describe(child)}, "
                "not a mapping"
            )
        cur = cur[part]
    cur[parts[-1]] = value
    origins.set_cli(parts, label)


def _apply_overrides(
    data: dict[str, Any], origins: _Origins, overrides: Iterable[str], out_dir: str | os.PathLike | None
) -> dict[str, Any]:
    data = dict(data)
    problems: list[str] = []
    if overrides is None:
        overrides = ()
    elif isinstance(overrides, str):  # a lone string would otherwise be split into characters
        overrides = [overrides]
    for text in overrides:
        if not isinstance(text, str):
            problems.append(f"--set {text!r}: an override must be a KEY=VALUE string")
            continue
        label = f"--set {text}"
        key, sep, raw = text.partition("=")
        if not sep:
            problems.append(
                f"{label}: malformed override, expected KEY=VALUE with a dotted KEY "
                "(e.g. generate.max_new_tokens=8)"
            )
            continue
        key = key.strip()
        if not key:
            problems.append(f"{label}: malformed override, the key before '=' is empty")
            continue
        parts = tuple(part.strip() for part in key.split("."))
        if any(not part for part in parts):
            problems.append(f"{label}: malformed override, key {key!r} has an empty segment")
            continue
        try:
            _set_path(data, parts, _parse_override_value(raw), origins, label)
        except _OverrideError as exc:
            problems.append(f"{label}: {exc}")
    if out_dir is not None:
        label = f"--out {os.fspath(out_dir)}"
        try:
            resolved = str((Path.cwd() / Path(os.fspath(out_dir)).expanduser()).resolve())
            _set_path(data, ("output", "dir"), resolved, origins, label)
        except (_OverrideError, RuntimeError) as exc:
            problems.append(f"{label}: {exc}")
    if problems:
        raise ManifestError("\n".join(problems))
    return data


# ---------------------------------------------------------------------------------------------
# Validation and error messages.

_MISSING_HINTS = {
    ("version",): f"required; expected version: {MANIFEST_VERSION}",
    ("model",): "required; set model.checkpoint (a checkpoint directory) or model.synthetic",
    ("prompt",): "required; set prompt.tokens (a list of token ids) or prompt.text",
    ("output",): "required; set output.dir (or pass --out)",
    ("output", "dir"): "required; set output.dir (or pass --out)",
    ("model", "synthetic", "preset"): "required; expected one of 'tiny', 'small', 'full-shape'",
}

_TYPE_NAMES = {
    "int_type": "an integer",
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
        sub = _model_in(info.annotation)
        if sub is None:
            return None
        cls = sub
    return cls


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


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
        return f"must be one of {ctx.get('expected', '?')}, got {_describe(value)}"
    if kind in _TYPE_NAMES:
        return f"expected {_TYPE_NAMES[kind]}, got {_describe(value)}"
    if kind == "greater_than_equal":
        return f"must be >= {ctx.get('ge')}, got {_describe(value).split(' ', 1)[-1]}"
    if kind == "less_than_equal":
        return f"must be <= {ctx.get('le')}, got {_describe(value).split(' ', 1)[-1]}"
    if kind == "too_short":
        return "must be a non-empty list"
    if kind == "string_too_short":
        return "must be a non-empty string"
    if kind == "value_error":
        return str(ctx.get("error", err.get("msg", "")))
    return str(err.get("msg", "invalid value"))


def _format_errors(exc: ValidationError, origins: _Origins) -> ManifestError:
    entries: list[tuple[tuple[int, int], int, str]] = []
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


def _validate(
    data: Any, origins: _Origins, base_dir: Path, source: Path | None, check_paths: bool = True
) -> Manifest:
    if not isinstance(data, Mapping):
        raise ManifestError(f"{origins.display}: the manifest must be a mapping, got {_describe(data)}")
    context = {"base_dir": base_dir, "check_paths": check_paths}
    try:
        manifest = Manifest.model_validate(dict(data), context=context)
    except ValidationError as exc:
        raise _format_errors(exc, origins) from None
    manifest._source = source
    manifest._origins = origins
    return manifest


# ---------------------------------------------------------------------------------------------
# Public entry points.


def load_manifest(
    path: str | os.PathLike[str],
    overrides: Iterable[str] = (),
    out_dir: str | os.PathLike[str] | None = None,
) -> Manifest:
    """Load, override, validate and resolve a YAML run manifest.

    ``overrides`` are ``dotted.key=VALUE`` strings (the CLI's repeatable ``--set``), VALUE
    parsed as a YAML scalar or flow value; ``out_dir`` (the CLI's ``--out``) replaces
    ``output.dir`` and resolves against the current working directory. Raises
    :class:`ManifestError` listing every problem as ``FILE:LINE: FIELD: message``.
    """
    display = os.fspath(path)
    file = Path(display).expanduser()
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        raise ManifestError(f"{display}: manifest file not found") from None
    except IsADirectoryError:
        raise ManifestError(f"{display}: is a directory, expected a YAML manifest file") from None
    except OSError as exc:
        raise ManifestError(f"{display}: cannot read manifest: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ManifestError(
            f"{display}: manifest is not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None
    data, origins = _parse_yaml(text, display)
    data = _apply_overrides(data, origins, overrides, out_dir)
    absolute = Path(os.path.abspath(file))
    return _validate(data, origins, absolute.parent, absolute)


def parse_manifest_dict(
    data: dict[str, Any], source: str = "<dict>", *, base_dir: str | os.PathLike[str] | None = None
) -> Manifest:
    """Validate a manifest given as a dict (tests, other tools). Relative paths resolve
    against ``base_dir`` (default: the working directory); errors read ``SOURCE: FIELD: ...``."""
    origins = _Origins(str(source), has_lines=False)
    base = Path(os.path.abspath(Path(base_dir).expanduser())) if base_dir is not None else Path.cwd()
    return _validate(data, origins, base, None)


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
