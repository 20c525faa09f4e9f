"""The manifest's optional ``vindex`` section: defaults, strict validation with FILE:LINE errors,
paths, JSON Schema, and no change to the identity of manifests that do not use it."""

from __future__ import annotations

import textwrap
from pathlib import Path

import jsonschema
import pytest
import yaml

from kimi_jax.errors import ManifestError
from kimi_jax.manifest import VindexSection, load_manifest, manifest_json_schema

BASE = """\
version: 1
model:
  synthetic: {preset: tiny}
prompt:
  tokens: [1792, 7]
output:
  dir: ../runs/x
"""


def write(tmp_path: Path, text: str, name: str = "m.yaml") -> Path:
    folder = tmp_path / "cfg"
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def test_absent_section_is_none_and_leaves_the_digest_alone(tmp_path):
    m = load_manifest(write(tmp_path, BASE))
    assert m.vindex is None
    assert "vindex" not in m.resolved_dict()  # so the digest is what it was before the section existed
    with_section = load_manifest(write(tmp_path, BASE + "vindex: {}\n", "v.yaml"))
    assert with_section.digest() != m.digest()


def test_defaults_and_paths(tmp_path):
    m = load_manifest(write(tmp_path, BASE + "vindex:\n  bundles: [../runs/a, /abs/b]\n"))
    v = m.vindex
    assert isinstance(v, VindexSection)
    assert (v.phases, v.layers, v.experts, v.top_singular_values, v.prompts, v.max_new_tokens) == (
        [1, 2, 3], None, None, 16, None, None)
    assert v.bundles == [(tmp_path / "runs" / "a").resolve(), Path("/abs/b")]


def test_full_section(tmp_path):
    text = BASE + textwrap.dedent("""\
        vindex:
          phases: [1, 3]
          layers: [0, 5]
          experts: [0, 383]
          top_singular_values: 32
          prompts: [[1, 2, 3], [4]]
          max_new_tokens: 2
        """)
    v = load_manifest(write(tmp_path, text)).vindex
    assert (v.phases, v.layers, v.experts, v.top_singular_values, v.prompts, v.max_new_tokens) == (
        [1, 3], [0, 5], [0, 383], 32, [[1, 2, 3], [4]], 2)


@pytest.mark.parametrize("body, field, fragment", [
    ("  phases: [1, 1]\n", "vindex.phases", "duplicate phase 1"),
    ("  phases: [4]\n", "vindex.phases.0", "must be <= 3"),
    ("  phases: [true]\n", "vindex.phases.0", "expected an integer, got boolean true"),
    ("  phases: []\n", "vindex.phases", "must be a non-empty list"),
    ("  layers: [2, -1]\n", "vindex.layers.1", "must be >= 0"),
    ("  layers: [3, 3]\n", "vindex.layers", "duplicate layer 3"),
    ("  experts: [\"5\"]\n", "vindex.experts.0", "expected an integer, got string '5'"),
    ("  top_singular_values: 0\n", "vindex.top_singular_values", "must be >= 1"),
    ("  prompts: [[]]\n", "vindex.prompts.0", "must be a non-empty list"),
    ("  max_new_tokens: 0\n", "vindex.max_new_tokens", "must be >= 1"),
    ("  bundles: [3]\n", "vindex.bundles.0", "expected a path string"),
    ("  phase: [1]\n", "vindex.phase", "unknown key (did you mean 'phases'?)"),
])  # fmt: skip
def test_bad_values_name_file_line_field(tmp_path, body, field, fragment):
    path = write(tmp_path, BASE + "vindex:\n" + body)
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    assert f"{path}:9: {field}: " in str(err.value) and fragment in str(err.value)


def test_overrides_reach_the_section(tmp_path):
    path = write(tmp_path, BASE)
    m = load_manifest(path, ["vindex.layers=[1, 2]", "vindex.phases=[2]"])
    assert m.vindex.layers == [1, 2] and m.vindex.phases == [2]
    with pytest.raises(ManifestError, match=r"--set vindex.experts=\[1, 1\]: vindex.experts: duplicate expert id 1"):
        load_manifest(path, ["vindex.experts=[1, 1]"])
    # Later stages name the field by its line through manifest.error.
    m = load_manifest(write(tmp_path, BASE + "vindex:\n  layers: [9]\n", "e.yaml"))
    assert str(m.error("vindex.layers.0", "out of range")) == f"{m.source}:9: vindex.layers.0: out of range"


def test_json_schema_knows_the_section(tmp_path):
    validator = jsonschema.Draft202012Validator(manifest_json_schema())
    good = yaml.safe_load(BASE + "vindex: {phases: [1, 2], layers: null, top_singular_values: 8}\n")
    validator.validate(good)
    validator.validate(load_manifest(write(tmp_path, BASE + "vindex: {}\n")).resolved_dict())
    for bad in ({"phases": [1, 1]}, {"phases": [0]}, {"top_singular_values": 0}, {"bogus": 1}, {"prompts": [[]]}):
        with pytest.raises(jsonschema.ValidationError):
            validator.validate({**good, "vindex": bad})
