"""``CHECKSUMS.b3``: BLAKE3 digests of every file under a directory, as ``b3sum --check`` reads them.

One line per file, sorted by path::

    <64 lowercase hex>  <relative/path/with/forward/slashes>

exactly what ``cd ROOT && b3sum $(find . -type f | sort)`` prints (without the ``./``), so
``cd ROOT && b3sum --check CHECKSUMS.b3`` verifies a tree without kimi-jax installed. As in
b3sum and sha256sum, a path holding a backslash or a newline is written escaped (``\\\\``,
``\\n``) on a line that starts with a backslash.

Files are hashed streaming, in 1 MiB blocks. Symbolic links to files are hashed by content (as
b3sum does); symbolic links to directories are not followed. The file is written atomically
(a temporary file in the same directory, fsynced, then renamed over the old one).
"""

from __future__ import annotations

import fnmatch
import os
import re
from pathlib import Path
from typing import Iterable

import blake3

from kimi_jax.errors import InputError
from kimi_jax.fileio import open_regular, read_regular, write_bytes_atomic

__all__ = ["CHECKSUMS_NAME", "hash_file", "list_files", "write_checksums", "verify_checksums", "parse_checksums"]

CHECKSUMS_NAME = "CHECKSUMS.b3"
# One line of about 100 bytes per file: 64 MiB lists far more files than any bundle holds.
MAX_LISTING_BYTES = 64 * 1024 * 1024
_BLOCK = 1 << 20
_LINE = re.compile(r"^([0-9a-f]{64})  (.+)$")


def hash_file(path: Path) -> str:
    """BLAKE3 hex digest of a regular file, read in 1 MiB blocks."""
    hasher = blake3.blake3()
    buf = bytearray(_BLOCK)
    view = memoryview(buf)
    with open(open_regular(path), "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            hasher.update(view[:n])
    return hasher.hexdigest()


def _excluded(rel: str, exclude: Iterable[str]) -> bool:
    return any(rel == pattern or fnmatch.fnmatchcase(rel, pattern) for pattern in exclude)


def list_files(root: Path, exclude: Iterable[str] = (CHECKSUMS_NAME,)) -> list[str]:
    """Relative paths (forward slashes, sorted) of the regular files under ``root``.

    ``exclude`` holds relative paths or ``fnmatch`` patterns matched against the relative path."""
    root = Path(root)
    exclude = tuple(exclude)
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):  # does not descend into linked directories
        dirnames.sort()
        base = Path(dirpath)
        for name in filenames:
            path = base / name
            if not path.is_file():  # sockets, fifos, dangling or directory links
                continue
            rel = path.relative_to(root).as_posix()
            if not _excluded(rel, exclude):
                found.append(rel)
    return sorted(found)


def _escape(rel: str) -> tuple[str, bool]:
    if "\\" in rel or "\n" in rel or "\r" in rel:
        return rel.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r"), True
    return rel, False


def _unescape(text: str) -> str | None:
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            if i + 1 >= len(text):
                return None
            nxt = text[i + 1]
            if nxt == "\\":
                out.append("\\")
            elif nxt == "n":
                out.append("\n")
            elif nxt == "r":
                out.append("\r")
            else:
                return None
            i += 2
            continue
        out.append(c)
        i += 1
    return "".join(out)


def format_line(digest: str, rel: str) -> str:
    shown, escaped = _escape(rel)
    return ("\\" if escaped else "") + f"{digest}  {shown}\n"


def write_checksums(root: Path, exclude: Iterable[str] = (CHECKSUMS_NAME,)) -> Path:
    """Hash every file under ``root`` (but ``exclude``) into ``root/CHECKSUMS.b3``; returns its path."""
    root = Path(root)
    exclude = tuple(exclude)
    if CHECKSUMS_NAME not in exclude:
        exclude = (*exclude, CHECKSUMS_NAME)
    lines = [format_line(hash_file(root / rel), rel) for rel in list_files(root, exclude)]
    return write_bytes_atomic(root / CHECKSUMS_NAME, "".join(lines).encode("utf-8"))


def parse_checksums(text: str, source: str = CHECKSUMS_NAME) -> tuple[dict[str, str], list[str]]:
    """``{relative path: digest}`` and the problems (malformed, unsafe or duplicate lines)."""
    entries: dict[str, str] = {}
    problems: list[str] = []
    for number, raw in enumerate(text.split("\n"), start=1):
        if raw == "":
            continue
        line = raw[:-1] if raw.endswith("\r") else raw
        escaped = line.startswith("\\")
        m = _LINE.match(line[1:] if escaped else line)
        rel = _unescape(m.group(2)) if (m and escaped) else (m.group(2) if m else None)
        if m is None or rel is None:
            problems.append(f"{source}:{number}: malformed line {raw[:120]!r}; expected '<64 lowercase hex>  <relative path>'")
            continue
        parts = rel.split("/")
        if rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
            problems.append(f"{source}:{number}: {rel!r}: not a plain relative path below the checksummed folder")
            continue
        if rel in entries:
            problems.append(f"{source}:{number}: {rel}: listed twice")
            continue
        entries[rel] = m.group(1)
    return entries, problems


def verify_checksums(root: Path, exclude: Iterable[str] = (CHECKSUMS_NAME,)) -> list[str]:
    """Check ``root`` against its ``CHECKSUMS.b3``; returns the problems (empty: all good).

    Reports malformed lines, files whose content changed, listed files that are missing and
    files present but not listed (``exclude`` as in :func:`write_checksums`). Each problem
    names the file."""
    root = Path(root)
    listing = root / CHECKSUMS_NAME
    if not listing.exists() and not listing.is_symlink():
        return [f"{listing}: missing; nothing to verify against"]
    try:
        text = read_regular(listing, MAX_LISTING_BYTES, CHECKSUMS_NAME).decode("utf-8")
    except (InputError, UnicodeDecodeError) as e:
        return [f"{listing}: cannot read ({e})"]
    entries, problems = parse_checksums(text, str(listing))
    exclude = tuple(exclude)
    if CHECKSUMS_NAME not in exclude:
        exclude = (*exclude, CHECKSUMS_NAME)
    for rel, digest in sorted(entries.items()):
        path = root / rel
        if not path.is_file():
            problems.append(f"{path}: listed in {CHECKSUMS_NAME} but missing")
            continue
        try:
            actual = hash_file(path)
        except InputError as e:
            problems.append(str(e))
            continue
        if actual != digest:
            problems.append(f"{path}: BLAKE3 mismatch (listed {digest[:16]}..., file has {actual[:16]}...)")
    for rel in list_files(root, exclude):
        if rel not in entries:
            problems.append(f"{root / rel}: present but not listed in {CHECKSUMS_NAME}")
    return problems
