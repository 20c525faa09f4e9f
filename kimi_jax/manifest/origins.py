"""Reading a manifest's YAML: where every value came from, and ``--set`` overrides.

Values are parsed with PyYAML's ``SafeLoader`` only, with two changes (:class:`ManifestLoader`):
a number in exponent form without a dot (``1e-300``, YAML 1.2's spelling, and what JSON writers
produce) is a number, not a string; and an integer of more than :data:`MAX_INT_DIGITS` digits is
a named error rather than Python's digit-limit ValueError. Alongside the data, :class:`Origins` records
the line of every key and value (or the ``--set``/``--out`` text a value came from), so schema
errors can name ``FILE:LINE: field``. Duplicate keys and non-string keys are rejected here, before
validation, since ``safe_load`` would silently keep the last duplicate.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kimi_jax.errors import ManifestError

MANIFEST_VERSION = 1
# Most YAML node references walked when recording line numbers (guards alias bombs).
_MAX_NODES = 200_000
# Deepest nesting accepted; the deepest manifest field (vindex.prompts.N.M) is 4 levels down.
MAX_DEPTH = 16
# Longest integer accepted: no field holds more than a 64-bit count or id.
MAX_INT_DIGITS = 40


class ManifestLoader(yaml.SafeLoader):
    """SafeLoader, with exponent numbers without a dot read as numbers and integers bounded."""


def _bounded_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    digits = sum(ch.isdigit() for ch in node.value)
    if digits > MAX_INT_DIGITS:
        raise yaml.constructor.ConstructorError(None, None, f"an integer of {digits:,} digits; no manifest field holds "
                                                f"more than {MAX_INT_DIGITS}", node.start_mark)  # fmt: skip
    return yaml.SafeLoader.construct_yaml_int(loader, node)


ManifestLoader.add_constructor("tag:yaml.org,2002:int", _bounded_int)
ManifestLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                     re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                     list("-+0123456789"))  # fmt: skip


def describe_value(value: Any) -> str:
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


# ---------------------------------------------------------------------------------------------
# Where each value came from.


@dataclass
class _Pos:
    key_line: int | None  # line of the mapping key, None for sequence items and the root
    value_line: int  # line where the value node starts
    collection: bool  # the value is a mapping or a sequence


class Origins:
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


def split_field(field: str) -> tuple[str, ...]:
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
        if len(path) > MAX_DEPTH:
            return [f"{display}:{node.start_mark.line + 1}: {'.'.join(path[:4])}...: nested more than {MAX_DEPTH} "
                    "levels deep; no manifest field is"]  # fmt: skip
    problems.sort(key=lambda text: int(text[len(display) + 1 :].split(":", 1)[0]))
    return problems


def _record_lines(root: yaml.Node, origins: Origins) -> None:
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


def _unprintable(text: str, exc: yaml.reader.ReaderError) -> str:
    """Where and what: PyYAML refuses control characters before it parses anything."""
    char = exc.character if isinstance(exc.character, int) else 0
    return f"{text[: exc.position].count(chr(10)) + 1}: character U+{char:04X} is not allowed in YAML ({exc.reason})"


def parse_yaml(text: str, display: str) -> tuple[dict[str, Any], Origins]:
    try:
        loader = ManifestLoader(text)
    except yaml.reader.ReaderError as exc:
        raise ManifestError(f"{display}:{_unprintable(text, exc)}") from None
    try:
        try:
            node = loader.get_single_node()
        except yaml.YAMLError as exc:
            raise _yaml_error(display, exc) from None
        except RecursionError:  # PyYAML composes nested collections recursively
            raise ManifestError(f"{display}: YAML nested too deeply (a manifest is at most {MAX_DEPTH} levels "
                                "deep)") from None
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
    origins = Origins(display, has_lines=True)
    _record_lines(node, origins)
    return data, origins


# ---------------------------------------------------------------------------------------------
# Overrides.


class _OverrideError(Exception):
    pass


def _parse_override_value(raw: str) -> Any:
    try:
        loader = ManifestLoader(raw)
    except yaml.reader.ReaderError as exc:
        raise _OverrideError(f"value {raw[:40]!r}: line {_unprintable(raw, exc)}") from None
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
            if _nesting(node) > MAX_DEPTH:
                raise _OverrideError(f"value {raw[:40]!r}... is nested more than {MAX_DEPTH} levels deep")
            return loader.construct_document(node)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc)
            raise _OverrideError(f"value {raw[:80]!r} is not valid YAML: {problem}") from None
        except RecursionError:
            raise _OverrideError(f"value {raw[:40]!r}... is nested too deeply") from None
    finally:
        loader.dispose()


def _nesting(root: yaml.Node) -> int:
    """How deeply collections nest in a node tree, counted without recursion (stops past MAX_DEPTH)."""
    deepest, stack = 0, [(root, 0)]
    while stack and deepest <= MAX_DEPTH:
        node, depth = stack.pop()
        if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
            deepest = max(deepest, depth + 1)
            items = node.value if isinstance(node, yaml.SequenceNode) else [v for pair in node.value for v in pair]
            stack.extend((child, depth + 1) for child in items)
    return deepest


def _set_path(
    data: dict[str, Any], parts: tuple[str, ...], value: Any, origins: Origins, label: str
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
                f"cannot set {'.'.join(parts)}: {'.'.join(prefix)} is {describe_value(child)}, "
                "not a mapping"
            )
        cur = cur[part]
    cur[parts[-1]] = value
    origins.set_cli(parts, label)


def apply_overrides(
    data: dict[str, Any], origins: Origins, overrides: Iterable[str], out_dir: str | os.PathLike | None
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
        label = f"--set {text if len(text) <= 120 else text[:100] + f'... ({len(text):,} characters)'}"
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
