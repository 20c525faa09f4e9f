"""Bundle archives: one deterministic ``.tar.gz`` per bundle, and extraction that trusts nothing.

:func:`archive_bundle` packs a bundle directory under a single top-level folder named after the
bundle, and refuses one holding anything outside the bundle layout (verify would refuse the
archive). The archive depends only on the bundle's relative paths and bytes: entries are sorted,
every mtime is 0, uid/gid are 0 with no user or group names, modes are normalised (0755 folders,
0644 files) and the gzip header carries mtime 0 and no file name. The same bundle therefore always
packs to a byte-identical archive, wherever it lies and whenever it was written.

:func:`safe_extract` refuses, before writing anything, an archive holding an absolute path, a
``..`` component, a symbolic or hard link, a device, a fifo, a sparse file, any other non-regular
member, a duplicate name, or a name that would resolve outside the destination; the error names
the member. It first streams through the archive once, reading no member data into memory, and
refuses one that expands past what a bundle can legitimately hold (:data:`MAX_MEMBER_BYTES`,
:data:`MAX_TOTAL_BYTES`, :data:`MAX_EXPANSION` times its own size, :data:`MAX_MEMBERS` members);
a disk that fills during extraction is named, and what was extracted is removed.

:func:`open_bundle` resolves what a user may point at (a bundle directory, an archive, or a
bundle's ``receipt.json``) to a bundle directory, extracting archives into a temporary folder.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import lzma
import os
import shutil
import stat
import tarfile
import tempfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Iterator

from kimi_jax.errors import KimiJaxError
from kimi_jax.fileio import atomic_writer, open_regular, write_failure
from kimi_jax.ledger.bundle import ARRAYS, MAX_JSON_BYTES, TOKENIZER, in_bundle_layout

__all__ = ["ArchiveError", "UnsafeArchive", "archive_bundle", "safe_extract", "open_bundle", "is_archive",
           "default_archive_path"]  # fmt: skip

_BLOCK = 1 << 20

# What a bundle archive may expand to, from what a bundle holds (kimi_jax.ledger.bundle): JSON
# files of at most MAX_JSON_BYTES, explorer.html (the ledger once more, compact, plus ~0.3 MB of
# page), the orbax arrays (float32, 0.7 MB per step at Kimi K2.5's size) and a few small files.
MAX_MEMBER_BYTES = 2 * MAX_JSON_BYTES
MAX_TOTAL_BYTES = 4 * MAX_JSON_BYTES
# gzip shrinks a bundle about 3x (float32 arrays hardly at all, the JSON ledger at most ~10x);
# an archive that expands much further holds something other than a bundle.
MAX_EXPANSION = 40
MAX_MEMBERS = 10_000
# pax and GNU long-name headers carry a path and a few attributes; no bundle needs more.
_MAX_META_BYTES = 1 << 20
_META_TYPES = (b"x", b"g", b"L", b"K")
# A bundle's longest path is arrays/ocdbt.process_N/d/<32 hex digits> under the bundle's folder.
_MAX_NAME = 1024


class ArchiveError(KimiJaxError):
    """A bundle cannot be packed, or an archive cannot be read or does not hold one bundle."""


class UnsafeArchive(ArchiveError):
    """An archive member would write outside the destination or is not a plain file or folder."""


# -- packing ------------------------------------------------------------------------------------


def _bundle_entries(bundle: Path) -> list[tuple[str, Path]]:
    """``(relative posix path, path)`` of every folder and regular file, parents first, sorted."""
    entries: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(bundle):
        base = Path(dirpath)
        for name in sorted(dirnames + filenames):
            path = base / name
            rel = path.relative_to(bundle).as_posix()
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                raise ArchiveError(f"{path}: is a symbolic link; a bundle to archive may hold only regular files "
                                   "and folders")  # fmt: skip
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                raise ArchiveError(f"{path}: is not a regular file or folder; a bundle to archive may hold only "
                                   "regular files and folders")  # fmt: skip
            part = rel in (ARRAYS, TOKENIZER) or rel.startswith(ARRAYS + "/") if stat.S_ISDIR(mode) else \
                in_bundle_layout(rel)  # fmt: skip
            if not part:
                raise ArchiveError(f"{path}: not part of the bundle layout, so verify would refuse the archive; move "
                                   "it out of the bundle folder before archiving")  # fmt: skip
            entries.append((rel, path))
    entries.sort(key=lambda e: e[0].split("/"))
    return entries


def default_archive_path(bundle: str | os.PathLike) -> Path:
    """``<bundle>.tar.gz`` beside the bundle directory."""
    bundle = Path(bundle).resolve()
    return bundle.parent / f"{bundle.name}.tar.gz"


def archive_bundle(bundle: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Pack ``bundle`` into a deterministic ``.tar.gz`` (default ``<bundle>.tar.gz`` beside it); returns its path."""
    from kimi_jax.ledger.bundle import CHECKSUMS

    src = Path(bundle)
    if not src.is_dir():
        raise ArchiveError(f"{src}: not a directory; expected a run bundle directory (holding ledger.json and "
                           f"{CHECKSUMS})")  # fmt: skip
    src = src.resolve()
    if not (src / "ledger.json").is_file() or not (src / CHECKSUMS).is_file():
        missing = [n for n in ("ledger.json", CHECKSUMS) if not (src / n).is_file()]
        raise ArchiveError(f"{src}: not a run bundle: {', '.join(missing)} missing")
    target = Path(out) if out is not None else default_archive_path(src)
    target = Path(os.path.abspath(target))
    if target.resolve() == src or src in target.resolve().parents:
        raise ArchiveError(f"{target}: the archive may not be written inside the bundle it packs ({src})")
    if target.is_dir():
        raise ArchiveError(f"{target}: is a directory; expected an archive file path such as {src.name}.tar.gz")
    top = src.name
    entries = _bundle_entries(src)

    with atomic_writer(target) as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz:
            with tarfile.open(fileobj=gz, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                tar.addfile(_info(top, tarfile.DIRTYPE, 0))
                for rel, path in entries:
                    name = f"{top}/{rel}"
                    if path.is_dir():
                        tar.addfile(_info(name, tarfile.DIRTYPE, 0))
                    else:
                        size = path.stat().st_size
                        with open(path, "rb") as f:  # tarfile raises if the file shrinks meanwhile
                            tar.addfile(_info(name, tarfile.REGTYPE, size), f)
    return target


def _info(name: str, kind: bytes, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size
    info.mtime = 0
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


# -- extracting ---------------------------------------------------------------------------------


_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")


def is_archive(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a regular file that starts like a (gzip, bzip2, xz or plain) tar archive.
    Only the first bytes are read: tarfile itself would already read hostile headers."""
    p = Path(path)
    if not p.is_file():
        return False
    try:
        with open(open_regular(p, "archive", ArchiveError), "rb") as f:
            head = f.read(263)
    except (KimiJaxError, OSError):
        return False
    return head.startswith(_MAGIC) or head[257:262] == b"ustar"


def _check_member(member: tarfile.TarInfo, archive: Path, root: Path) -> PurePosixPath:
    name = member.name
    where = f"{archive}: member {name!r}"
    if not name or "\x00" in name:
        raise UnsafeArchive(f"{where}: empty or malformed name; expected a relative path")
    if name.startswith(("/", "\\")) or PurePosixPath(name).is_absolute() or (name[:1].isalpha() and name[1:2] == ":"):
        raise UnsafeArchive(f"{where}: absolute path; expected a path relative to the extraction folder")
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if ".." in parts:
        raise UnsafeArchive(f"{where}: has a '..' component; expected a path inside the extraction folder")
    if member.issym():
        raise UnsafeArchive(f"{where}: symbolic link (to {member.linkname!r}); a bundle archive holds only regular "
                            "files and folders")  # fmt: skip
    if member.islnk():
        raise UnsafeArchive(f"{where}: hard link (to {member.linkname!r}); a bundle archive holds only regular "
                            "files and folders")  # fmt: skip
    if member.ischr() or member.isblk():
        raise UnsafeArchive(f"{where}: device file; a bundle archive holds only regular files and folders")
    if member.isfifo():
        raise UnsafeArchive(f"{where}: fifo; a bundle archive holds only regular files and folders")
    if not (member.isreg() or member.isdir()) or member.issparse():
        raise UnsafeArchive(f"{where}: member type {member.type!r} is not a regular file or folder")
    target = Path(os.path.realpath(root.joinpath(*parts)))
    if target != root and root not in target.parents:
        raise UnsafeArchive(f"{where}: resolves to {target}, outside the extraction folder {root}")
    kept = [p for p in parts if p not in ("", ".")]
    if any(len(p.encode("utf-8", "surrogateescape")) > 255 for p in kept) or len(name) > _MAX_NAME:
        raise UnsafeArchive(f"{where[:200]}...: a name longer than a bundle's ({_MAX_NAME} characters, 255 bytes "
                            "per component)")  # fmt: skip
    if not kept and not member.isdir():
        raise UnsafeArchive(f"{where}: a file whose path names the extraction folder itself")
    return PurePosixPath(*kept)


def _open_stream(archive: Path, fd: int):
    """The archive's decompressed bytes as a stream (gzip, bzip2, xz or plain tar, by magic number)."""
    raw = os.fdopen(fd, "rb")
    magic = raw.read(6)
    raw.seek(0)
    for prefix, opener in ((b"\x1f\x8b", gzip.GzipFile), (b"BZh", bz2.BZ2File), (b"\xfd7zXZ\x00", lzma.LZMAFile)):
        if magic.startswith(prefix):
            return opener(fileobj=raw, mode="rb")
    return raw


def _header_size(block: bytes) -> int:
    field = block[124:136]
    if field[0] & 0x80:  # base-256, for sizes past 8 GiB
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip() or b"0"
    return int(digits, 8)


def _pax_records(data: bytes) -> dict[bytes, bytes]:
    """``length key=value\\n`` records (POSIX pax extended headers); malformed ones end the scan."""
    out, pos = {}, 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        length = int(data[pos:space]) if data[pos:space].isdigit() else 0
        if length <= space - pos:
            break
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        out[key], pos = value, pos + length
    return out


def scan_archive(archive: Path) -> None:
    """Stream through the archive's tar headers, reading and discarding member data, and refuse it
    as soon as it exceeds what a bundle can hold; nothing is written and memory stays bounded."""
    fd = open_regular(archive, "archive", ArchiveError)
    compressed = os.fstat(fd).st_size
    budget = min(MAX_TOTAL_BYTES, MAX_EXPANSION * compressed + _BLOCK)
    total = members = 0
    size_override = None
    try:
        with _open_stream(archive, fd) as stream:
            while True:
                block = stream.read(512)
                if len(block) < 512 or block == bytes(512):
                    # end of archive (a truncated one is reported by tarfile afterwards); read on to the
                    # end of the compressed stream, so its checksum (gzip's CRC-32) is checked too
                    while total <= budget and (chunk := stream.read(_BLOCK)):
                        total += len(chunk)
                    return
                size = _header_size(block)
                kind = block[156:157]
                if kind in _META_TYPES:
                    if size > _MAX_META_BYTES:
                        raise UnsafeArchive(f"{archive}: a {kind.decode()!r} header of {size:,} bytes; a bundle "
                                            f"archive's headers are at most {_MAX_META_BYTES:,}")  # fmt: skip
                    data = stream.read(size + (-size % 512))[:size]
                    records = _pax_records(data) if kind == b"x" else {}
                    if any(k.startswith(b"GNU.sparse") for k in records):
                        raise UnsafeArchive(f"{archive}: a sparse file (pax GNU.sparse records); a bundle archive "
                                            "holds only regular files and folders")  # fmt: skip
                    if records.get(b"size", b"").isdigit():
                        size_override = int(records[b"size"])
                    continue
                if kind == b"S":
                    raise UnsafeArchive(f"{archive}: a GNU sparse file; a bundle archive holds only regular files and "
                                        "folders")  # fmt: skip
                if size_override is not None:
                    size, size_override = size_override, None
                members += 1
                total += size
                if size > MAX_MEMBER_BYTES or total > budget or members > MAX_MEMBERS:
                    raise ArchiveError(
                        f"{archive}: expands past what a bundle can hold ({members:,} members, {total:,} bytes so "
                        f"far, the last {size:,}); a bundle archive holds at most {MAX_MEMBERS:,} members, "
                        f"{MAX_MEMBER_BYTES:,} bytes per member and {MAX_TOTAL_BYTES:,} in all, and expands at most "
                        f"{MAX_EXPANSION}x its {compressed:,} compressed bytes")  # fmt: skip
                left = size + (-size % 512)
                while left:
                    chunk = stream.read(min(left, _BLOCK))
                    if not chunk:
                        return
                    left -= len(chunk)
    except (OSError, EOFError, ValueError, lzma.LZMAError, zlib.error) as e:
        raise ArchiveError(f"{archive}: not a readable tar archive ({e}); expected a .tar.gz made by "
                           "`kimi-jax archive`") from None  # fmt: skip


def safe_extract(archive: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Extract a tar(.gz) archive into ``dest`` (absent or an empty folder) after checking every member.

    Nothing is written unless every member passes; returns ``dest``."""
    archive = Path(archive)
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ArchiveError(f"{dest}: extraction folder must be absent or an empty folder")
    if not archive.exists():
        raise ArchiveError(f"{archive}: archive does not exist")
    scan_archive(archive)
    with open(open_regular(archive, "archive", ArchiveError), "rb") as raw:
        try:
            tar = tarfile.open(fileobj=raw, mode="r:*")
            members = tar.getmembers()
        except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError) as e:
            raise ArchiveError(f"{archive}: not a readable tar archive ({e}); expected a .tar.gz made by "
                               "`kimi-jax archive`") from None  # fmt: skip
        with tar:
            dest.mkdir(parents=True, exist_ok=True)
            root = Path(os.path.realpath(dest))
            plan = _plan_members(members, archive, root)
            try:
                _write_members(tar, plan, root, archive)
            except BaseException as e:
                for child in root.iterdir():  # leave dest as it was given: absent or empty
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
                reason = write_failure(e) or (f"{e.strerror or e}" if isinstance(e, OSError) else None)
                if reason is None:
                    raise
                raise ArchiveError(f"{archive}: extracting into {dest} failed: {reason}; what was extracted was "
                                   "removed") from None  # fmt: skip
    return dest


def _plan_members(members: list[tarfile.TarInfo], archive: Path,
                  root: Path) -> list[tuple[tarfile.TarInfo, PurePosixPath]]:  # fmt: skip
    """Every member checked (see :func:`_check_member`), each path once, no file where a folder must be."""
    plan: list[tuple[tarfile.TarInfo, PurePosixPath]] = []
    seen: dict[PurePosixPath, str] = {}
    for member in members:
        rel = _check_member(member, archive, root)
        if rel in seen:
            raise UnsafeArchive(f"{archive}: member {member.name!r}: appears twice (also as {seen[rel]!r}); "
                                "expected each path once")  # fmt: skip
        seen[rel] = member.name
        plan.append((member, rel))
    files = {rel for member, rel in plan if member.isreg()}
    for member, rel in plan:  # a file may not sit where another member needs a folder
        for parent in rel.parents:
            if parent in files:
                raise UnsafeArchive(f"{archive}: member {member.name!r}: its parent {parent.as_posix()!r} is a "
                                    "file in the archive")  # fmt: skip
    return plan


def _write_members(tar: tarfile.TarFile, plan: list[tuple[tarfile.TarInfo, PurePosixPath]], root: Path,
                   archive: Path) -> None:  # fmt: skip
    for member, rel in plan:
        target = root.joinpath(*rel.parts)
        if member.isdir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        source = tar.extractfile(member)
        if source is None:
            raise UnsafeArchive(f"{archive}: member {member.name!r}: has no file data")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(target, flags, 0o666)
        with os.fdopen(fd, "wb") as out, source:
            written = 0
            while chunk := source.read(_BLOCK):
                written += len(chunk)
                if written > member.size:  # the scan bounded member.size; the data may not exceed it
                    raise UnsafeArchive(f"{archive}: member {member.name!r}: more data than its declared size")
                out.write(chunk)


# -- locating a bundle ----------------------------------------------------------------------------


@contextlib.contextmanager
def open_bundle(path: str | os.PathLike) -> Iterator[Path]:
    """Yield the bundle directory for ``path``: a bundle directory, a bundle's ``receipt.json``,
    or an archive (extracted safely into a temporary folder removed afterwards)."""
    from kimi_jax.ledger.bundle import RECEIPT

    p = Path(path)
    if p.is_dir():
        yield p
        return
    if not p.exists():
        raise ArchiveError(f"{p}: does not exist; expected a bundle directory, a bundle archive (.tar.gz) or a "
                           f"bundle's {RECEIPT}")  # fmt: skip
    if p.name == RECEIPT or p.suffix == ".json":
        if p.name != RECEIPT:
            raise ArchiveError(f"{p}: a JSON file other than {RECEIPT}; expected a bundle directory, archive or "
                               f"{RECEIPT}")  # fmt: skip
        yield p.resolve().parent
        return
    if not is_archive(p):
        raise ArchiveError(f"{p}: neither a folder, a {RECEIPT} nor a tar archive; expected a bundle directory, a "
                           f"bundle archive (.tar.gz) or a bundle's {RECEIPT}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="kimi-jax-bundle-") as tmp:
        dest = Path(tmp) / "x"
        safe_extract(p, dest)
        tops = sorted(dest.iterdir())
        if len(tops) != 1 or not tops[0].is_dir():
            names = ", ".join(t.name for t in tops) or "nothing"
            raise ArchiveError(f"{p}: expected one top-level bundle folder in the archive, found {names}")
        yield tops[0]
