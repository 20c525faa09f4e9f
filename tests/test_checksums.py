"""CHECKSUMS.b3: the b3sum --check format, streaming BLAKE3, and every kind of tampering named."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import blake3
import pytest

from kimi_jax.ledger.checksums import (
    CHECKSUMS_NAME,
    hash_file,
    verify_checksums,
    write_checksums,
)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "bundle"
    (root / "phase1").mkdir(parents=True)
    (root / "summary.json").write_text('{"a": 1}\n')
    (root / "phase1" / "layer-000.json").write_text("{}\n")
    (root / "big.bin").write_bytes(os.urandom(3 * (1 << 20) + 17))  # several streaming blocks
    (root / "with space.txt").write_text("s")
    (root / "back\\slash.txt").write_text("b")
    return root


def test_format_is_sorted_hex_two_spaces_relative_forward_slashes(tree):
    path = write_checksums(tree)
    assert path == tree / CHECKSUMS_NAME
    lines = path.read_text().splitlines()
    names = ["back\\\\slash.txt", "big.bin", "phase1/layer-000.json", "summary.json", "with space.txt"]
    assert [line.split("  ", 1)[1] for line in lines] == names
    assert lines[0].startswith("\\")  # escaped name, as b3sum writes it
    for line in lines[1:]:
        digest, rel = line.split("  ", 1)
        assert len(digest) == 64 and int(digest, 16) >= 0
        assert digest == blake3.blake3((tree / rel).read_bytes()).hexdigest()
    assert hash_file(tree / "big.bin") == blake3.blake3((tree / "big.bin").read_bytes()).hexdigest()
    assert not list(tree.glob(f".{CHECKSUMS_NAME}.tmp-*"))
    assert verify_checksums(tree) == []
    # Rewriting is stable and does not list itself.
    assert write_checksums(tree).read_text() == "\n".join(lines) + "\n"


@pytest.mark.skipif(shutil.which("b3sum") is None, reason="b3sum not installed")
def test_b3sum_check_accepts_it(tree):
    write_checksums(tree)
    proc = subprocess.run(["b3sum", "--check", CHECKSUMS_NAME], cwd=tree, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_flipped_byte_missing_and_extra_files_are_named(tree):
    write_checksums(tree)
    raw = bytearray((tree / "big.bin").read_bytes())
    raw[2 * (1 << 20) + 5] ^= 0x40  # in the third block
    (tree / "big.bin").write_bytes(bytes(raw))
    (tree / "phase1" / "layer-000.json").unlink()
    (tree / "phase1" / "layer-001.json").write_text("{}\n")
    problems = verify_checksums(tree)
    assert len(problems) == 3
    assert "big.bin: BLAKE3 mismatch" in problems[0]
    assert problems[1].endswith("phase1/layer-000.json: listed in CHECKSUMS.b3 but missing")
    assert problems[2].endswith("phase1/layer-001.json: present but not listed in CHECKSUMS.b3")


def test_malformed_lines_and_missing_listing(tree):
    assert "missing; nothing to verify against" in verify_checksums(tree)[0]
    write_checksums(tree)
    listing = tree / CHECKSUMS_NAME
    good = listing.read_text()
    listing.write_text(good + "not a checksum line\n" + "a" * 64 + "  ../escape\n" + "A" * 64 + "  summary.json\n")
    problems = verify_checksums(tree)
    assert any(":6: malformed line 'not a checksum line'" in p for p in problems)
    assert any(":7: '../escape': not a plain relative path" in p for p in problems)
    assert any(":8: malformed line" in p for p in problems)  # uppercase hex is not what b3sum writes
    listing.write_text(good + good.splitlines()[-1] + "\n")
    assert any("summary.json: listed twice" in p or "with space.txt: listed twice" in p for p in verify_checksums(tree))


def test_exclude_patterns(tree):
    (tree / "run.lock").write_text("")
    write_checksums(tree, exclude=("*.lock",))
    assert "run.lock" not in (tree / CHECKSUMS_NAME).read_text()
    assert verify_checksums(tree, exclude=("*.lock",)) == []
    assert any("run.lock: present but not listed" in p for p in verify_checksums(tree))
