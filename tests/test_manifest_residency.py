"""Manifest fields of the memory model: storage.resident_bytes / expert_cache / speculate, compute.matmul."""

from __future__ import annotations

import textwrap

import pytest

from kimi_jax.errors import ManifestError
from kimi_jax.manifest import load_manifest
from kimi_jax.verify.compare_manifests import compare_resolved

BASE = """\
version: 1
model:
  synthetic: {preset: tiny}
prompt: {tokens: [1]}
output: {dir: out}
"""


def _write(tmp_path, text: str, name: str = "m.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_defaults_keep_what_fits_with_the_kernels_and_the_old_settings_keep_their_identity(tmp_path):
    m = load_manifest(_write(tmp_path, BASE))
    assert (m.storage.resident_bytes, m.storage.expert_cache, m.storage.speculate) == ("auto", "lru", False)
    assert m.compute.matmul == "kernels"
    # what every earlier run did (stream everything, widened products) stays out of the identity when
    # spelled out, so manifests written for it keep their digest; the new defaults are recorded
    old = load_manifest(_write(tmp_path, BASE + "storage: {resident_bytes: 0}\ncompute: {matmul: widened}\n", "o.yaml"))
    assert not {"resident_bytes", "expert_cache", "speculate"} & set(old.resolved_dict()["storage"])
    assert "matmul" not in old.resolved_dict()["compute"]
    resolved = m.resolved_dict()
    assert resolved["storage"]["resident_bytes"] == "auto" and resolved["compute"]["matmul"] == "kernels"
    stored = load_manifest(_write(tmp_path, BASE + "compute: {matmul: stored}\n", "stored.yaml"))
    assert stored.resolved_dict()["compute"]["matmul"] == "stored" and stored.digest() != m.digest()


@pytest.mark.parametrize("value,expected", [("8GiB", 8 * 2**30), ("512MiB", 512 * 2**20), ("auto", "auto"),
                                            ("0", 0), ("1000000", 1_000_000)])  # fmt: skip
def test_resident_bytes_sizes(tmp_path, value, expected):
    m = load_manifest(_write(tmp_path, BASE + f"storage: {{resident_bytes: {value}}}\n"))
    assert m.storage.resident_bytes == expected


def test_bad_values_are_reported_with_file_and_line(tmp_path):
    path = _write(tmp_path, BASE + "storage:\n  resident_bytes: 8 gigs\n  expert_cache: fifo\n"
                                   "compute: {matmul: fused}\n")  # fmt: skip
    with pytest.raises(ManifestError) as e:
        load_manifest(path)
    lines = str(e.value).splitlines()
    assert lines[0] == (f"{path}:7: storage.resident_bytes: expected a size such as 8GiB, 512MiB, 1.5GB or a byte "
                        "count, or 'auto'; got '8 gigs'")  # fmt: skip
    assert lines[1].startswith(f"{path}:8: storage.expert_cache: must be one of 'lru' or 'lfu'")
    assert lines[2].startswith(f"{path}:9: compute.matmul: must be one of 'kernels', 'stored' or 'widened'")


@pytest.mark.parametrize("value", ["-1", "true", "1.5", "[1]"])
def test_resident_bytes_rejects_non_sizes(tmp_path, value):
    with pytest.raises(ManifestError, match="storage.resident_bytes"):
        load_manifest(_write(tmp_path, BASE + f"storage: {{resident_bytes: {value}}}\n"))


def test_override_from_the_command_line(tmp_path):
    m = load_manifest(_write(tmp_path, BASE), ["storage.resident_bytes=auto", "storage.expert_cache=lfu"])
    assert (m.storage.resident_bytes, m.storage.expert_cache) == ("auto", "lfu")


def test_compare_budget_is_neutral_matmul_is_not(tmp_path):
    a = load_manifest(_write(tmp_path, BASE, "a.yaml")).resolved_dict()
    b = load_manifest(_write(tmp_path, BASE + "storage: {resident_bytes: 0, speculate: true}\n", "b.yaml"))
    same = compare_resolved(a, b.resolved_dict())
    assert same.identical and {d.field for d in same.neutral_differences} == {"storage.resident_bytes",
                                                                            "storage.speculate"}  # fmt: skip
    c = load_manifest(_write(tmp_path, BASE + "compute: {matmul: stored}\n", "c.yaml"))
    differ = compare_resolved(a, c.resolved_dict())
    assert not differ.identical and [d.field for d in differ.result_differences] == ["compute.matmul"]
