"""Bundle archives: one deterministic ``.tar.gz`` per bundle, and extraction that trusts nothing.

:func:`archive_bundle` packs a bundle directory under a single top-level folder named after the
bundle. The archive depends only on the bundle's relative paths and bytes: entries are sorted,
every mtime is 0, uid/gid are 0 with no user or group names, modes are normalised (0755 folders,
0644 files) and the gzip header carries mtime 0 and no file name. The same bundle therefore always
packs to a byte-identical archive, wherever it lies and whenever it was written.

:func:`safe_extract` refuses, before writing anything, an archive holding an absolute path, a
``..`` component, a symbolic or hard link, a device, a fifo, any other non-regular member, a
duplicate name, or a name that would resolve outside the destination; the error names the member.

:func:`open_bundle` resolves what a user may point at (a bundle directory, an archive, or a
bundle's ``receipt.json``) to a bundle directory, extracting archives into a temporary folder.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import stat
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from typing import Iterator

from kimi_jax.errors import KimiJaxError
from kimi_jax.fileio import atomic_writer

__all__ = ["ArchiveError", "UnsafeArchive", "archive_bundle", "safe_extract", "open_bundle", "is_archive",
           "default_archive_path"]  # fmt: skip

_BLOCK = 1 << 20


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


def is_archive(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_file() and tarfile.is_tarfile(p)


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
    if not (member.isreg() or member.isdir()):
        raise UnsafeArchive(f"{where}: member type {member.type!r} is not a regular file or folder")
    target = Path(os.path.realpath(root.joinpath(*parts)))
    if target != root and root not in target.parents:
        raise UnsafeArchive(f"{where}: resolves to {target}, outside the extraction folder {root}")
    kept = [p for p in parts if p not in ("", ".")]
    if not kept and not member.isdir():
        raise UnsafeArchive(f"{where}: a file whose path names the extraction folder itself")
    return PurePosixPath(*kept)


def safe_extract(archive: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Extract a tar(.gz) archive into ``dest`` (absent or an empty folder) after checking every member.

    Nothing is written unless every member passes; returns ``dest``."""
    archive = Path(archive)
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ArchiveError(f"{dest}: extraction folder must be absent or an empty folder")
    try:
        tar = tarfile.open(archive, mode="r:*")
    except FileNotFoundError:
        raise ArchiveError(f"{archive}: archive does not exist") from None
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ArchiveError(f"{archive}: not a readable tar archive ({e}); expected a .tar.gz made by "
                           "`kimi-jax archive`") from None  # fmt: skip
    with tar:
        try:
            members = tar.getmembers()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise ArchiveError(f"{archive}: corrupt tar archive ({e})") from None
        dest.mkdir(parents=True, exist_ok=True)
        root = Path(os.path.realpath(dest))
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
            fd = os.open(target, flags, 0o644)
            with os.fdopen(fd, "wb") as out, source:
                while True:
                    chunk = source.read(_BLOCK)
                    if not chunk:
                        break
                    out.write(chunk)
    return dest


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
