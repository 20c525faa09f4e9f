"""``kimi-jax archive``: deterministic bundle archives, and extraction that refuses hostile members."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from kimi_jax.cli import main
from kimi_jax.ledger.archive import (
    ArchiveError,
    UnsafeArchive,
    archive_bundle,
    safe_extract,
)
from kimi_jax.manifest import parse_manifest_dict
from kimi_jax.run.plan import prepare_run
from kimi_jax.run.runner import execute
from kimi_jax.verify.checklist import verify_bundle


@pytest.fixture(scope="module")
def bundle(tiny_checkpoints, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("archive")
    data = {"version": 1, "model": {"checkpoint": str(tiny_checkpoints["kimi-k2.5"])}, "prompt": {"tokens": [7, 300]},
            "generate": {"max_new_tokens": 2}, "output": {"dir": str(tmp / "run-a")}}  # fmt: skip
    execute(prepare_run(parse_manifest_dict(data, source=str(tmp / "m.yaml"))), echo=lambda *_: None, progress=False)
    return tmp / "run-a"


def test_archive_is_byte_identical_for_the_same_bundle(bundle, tmp_path):
    first = archive_bundle(bundle, tmp_path / "one.tar.gz")
    second = archive_bundle(bundle, tmp_path / "two.tar.gz")
    assert first.read_bytes() == second.read_bytes()
    # the same bundle elsewhere, with other times and permissions, packs to the same bytes
    other = Path(shutil.copytree(bundle, tmp_path / "elsewhere" / bundle.name))
    for path in [other, *other.rglob("*")]:
        os.utime(path, (1_000_000, 1_000_000))
        path.chmod(0o700 if path.is_dir() else 0o600)
    assert archive_bundle(other, tmp_path / "three.tar.gz").read_bytes() == first.read_bytes()

    raw = first.read_bytes()
    assert raw[:2] == b"\x1f\x8b" and raw[4:8] == b"\0\0\0\0"  # gzip header mtime 0
    assert not raw[3] & 0x08  # no file name in the gzip header
    with tarfile.open(first) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names[0] == bundle.name and all(n == bundle.name or n.startswith(bundle.name + "/") for n in names)
    assert names == sorted(names, key=lambda n: n.split("/"))
    assert {m.name.split("/", 1)[-1] for m in members if m.isfile()} >= {"ledger.json", "CHECKSUMS.b3", "receipt.json"}
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" and m.gname == "" for m in members)
    assert all(m.isfile() or m.isdir() for m in members)


def test_archive_verifies_at_another_path(bundle, tmp_path):
    made = archive_bundle(bundle, tmp_path / "made.tar.gz")
    moved = tmp_path / "far" / "away" / "copy.tar.gz"
    moved.parent.mkdir(parents=True)
    made.rename(moved)
    report = verify_bundle(moved)
    assert report.ok, report.format()
    assert "copy.tar.gz (bundle folder run-a)" in report.summary()

    dest = safe_extract(moved, tmp_path / "extracted")
    assert (dest / "run-a" / "ledger.json").read_bytes() == (bundle / "ledger.json").read_bytes()
    assert verify_bundle(dest / "run-a").ok


def test_cli_archive_default_and_explicit_output(bundle, tmp_path):
    copy = Path(shutil.copytree(bundle, tmp_path / "b"))
    result = CliRunner().invoke(main, ["archive", str(copy)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "b.tar.gz").is_file() and "wrote" in result.output
    result = CliRunner().invoke(main, ["archive", str(copy), "-o", str(tmp_path / "x" / "named.tar.gz")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "x" / "named.tar.gz").is_file()
    result = CliRunner().invoke(main, ["archive", str(copy), "-o", str(copy / "inside.tar.gz")])
    assert result.exit_code == 2 and "inside the bundle" in result.output


def test_archive_refuses_links_and_non_bundles(bundle, tmp_path):
    copy = Path(shutil.copytree(bundle, tmp_path / "b"))
    (copy / "sneaky").symlink_to("/etc/passwd")
    with pytest.raises(ArchiveError, match=r"sneaky: is a symbolic link"):
        archive_bundle(copy, tmp_path / "out.tar.gz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArchiveError, match=r"not a run bundle: ledger.json, CHECKSUMS.b3 missing"):
        archive_bundle(tmp_path / "empty")
    assert not (tmp_path / "out.tar.gz").exists()


def test_archive_refuses_files_that_are_not_part_of_the_bundle(bundle, tmp_path):
    """Main packed them, making an archive that verify then refused."""
    copy = Path(shutil.copytree(bundle, tmp_path / "b"))
    (copy / "notes.txt").write_text("kept beside the bundle's files")
    with pytest.raises(ArchiveError, match=r"notes.txt: not part of the bundle layout, so verify would refuse"):
        archive_bundle(copy, tmp_path / "out.tar.gz")
    (copy / "notes.txt").unlink()
    (copy / "arrays" / "stray").mkdir()
    (copy / "arrays" / "stray" / "x.bin").write_bytes(b"x")
    with pytest.raises(ArchiveError, match=r"x.bin: not part of the bundle layout"):
        archive_bundle(copy, tmp_path / "out.tar.gz")
    assert not (tmp_path / "out.tar.gz").exists()


# -- hostile archives ---------------------------------------------------------------------------


def _hostile(path: Path, evil: tarfile.TarInfo, data: bytes = b"") -> Path:
    with tarfile.open(path, "w:gz") as tar:
        ok = tarfile.TarInfo("bundle/ledger.json")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"{}"))
        tar.addfile(evil, io.BytesIO(data) if evil.isfile() else None)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "", size: int = 4) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.size = size if kind == tarfile.REGTYPE else 0
    return info


@pytest.mark.parametrize("member, message", [
    (_member("/tmp/kimi-jax-evil-abs"), "absolute path"),
    (_member("../evil.txt"), "'..' component"),
    (_member("bundle/../../evil.txt"), "'..' component"),
    (_member("bundle/link", tarfile.SYMTYPE, "../../outside"), "symbolic link"),
    (_member("bundle/hard", tarfile.LNKTYPE, "/etc/passwd"), "hard link"),
    (_member("bundle/dev", tarfile.CHRTYPE), "device file"),
    (_member("bundle/pipe", tarfile.FIFOTYPE), "fifo"),
])  # fmt: skip
def test_hostile_archives_are_refused_naming_the_member(tmp_path, member, message):
    archive = _hostile(tmp_path / "evil.tar.gz", member, b"evil")
    work = tmp_path / "work"
    work.mkdir()
    dest = work / "dest"
    with pytest.raises(UnsafeArchive) as e:
        safe_extract(archive, dest)
    assert f"member {member.name!r}" in str(e.value) and message in str(e.value)
    # nothing was written: not the good member, and nothing outside the destination
    assert [p.name for p in work.iterdir()] == ["dest"] and not any(dest.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.tar.gz", "work"]
    assert not Path("/tmp/kimi-jax-evil-abs").exists()
    with pytest.raises(UnsafeArchive, match=message):
        verify_bundle(archive)


def test_duplicate_members_and_files_under_files_are_refused(tmp_path):
    archive = _hostile(tmp_path / "dup.tar.gz", _member("bundle/ledger.json"), b"evil")
    with pytest.raises(UnsafeArchive, match=r"member 'bundle/ledger.json': appears twice"):
        safe_extract(archive, tmp_path / "d1")
    archive = _hostile(tmp_path / "nest.tar.gz", _member("bundle/ledger.json/x"), b"evil")
    with pytest.raises(UnsafeArchive, match=r"member 'bundle/ledger.json/x': its parent"):
        safe_extract(archive, tmp_path / "d2")


def test_extraction_needs_an_empty_destination_and_a_tar(bundle, tmp_path):
    archive = archive_bundle(bundle, tmp_path / "a.tar.gz")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    with pytest.raises(ArchiveError, match="must be absent or an empty folder"):
        safe_extract(archive, busy)
    (tmp_path / "junk.tar.gz").write_bytes(b"not a tar")
    with pytest.raises(ArchiveError, match="not a readable tar archive"):
        safe_extract(tmp_path / "junk.tar.gz", tmp_path / "d")
