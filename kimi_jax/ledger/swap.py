"""Replacing a bundle folder without losing it, and cleaning up only what is provably ours.

A run holds its output folder ``OUT`` through the lock file ``.OUT.lock`` beside it
(:func:`kimi_jax.run.output.hold_output`), which records the holder's PID and a random *token*
(JSON, written in place: the lock's inode must not change). Everything a run puts beside ``OUT``
carries that token in its name and a *marker* file inside it holding the token:

* ``.OUT.partial-TOKEN``: the new bundle being assembled (the marker is removed once the folder
  has been renamed to ``OUT``);
* ``.OUT.old-TOKEN``: the previous bundle, moved aside while the new one takes its place (the
  marker is written into ``OUT`` before the move, and removed again if it is put back).

A run killed part-way leaves its lock file, with its token, behind. The next holder reads that
record before writing its own, keeps the token as *pending*, and :func:`recover` then deals
with exactly the folders named with a pending token whose marker holds that token: it puts the
previous bundle back when ``OUT`` is missing, else removes it, and removes a partial bundle. A
folder is removed marker last, so a kill during removal leaves it still marked. Nothing else
is ever moved or deleted: a folder that merely looks like a leftover (``.OUT.old-mybackup``, a
``.OUT.partial`` of one's own) is only mentioned.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import secrets
from pathlib import Path

MARKER = ".kimi-jax-owner"
_TOKEN = re.compile(r"[0-9a-f]{16}")
_RECORD_LIMIT = 1 << 16


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


def partial_dir(out: Path, token: str) -> Path:
    return out.parent / f".{out.name}.partial-{token}"


def old_dir(out: Path, token: str) -> Path:
    return out.parent / f".{out.name}.old-{token}"


def new_token() -> str:
    return secrets.token_hex(8)


# -- the lock record --------------------------------------------------------------------------------


def parse_record(raw: bytes) -> dict:
    """A lock file's record ({} when it holds none: an older kimi-jax's bare PID, a torn write)."""
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return {}
    if not isinstance(record, dict):
        return {}
    tokens = [t for t in record.get("pending") or [] if isinstance(t, str) and _TOKEN.fullmatch(t)]
    token = record.get("token")
    return {"pid": record.get("pid"), "token": token if isinstance(token, str) and _TOKEN.fullmatch(token) else None,
            "pending": tokens}  # fmt: skip


def read_record_fd(fd: int) -> dict:
    return parse_record(os.pread(fd, _RECORD_LIMIT, 0))


def write_record_fd(fd: int, record: dict) -> None:
    data = json.dumps(record).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def held_record(out: Path) -> dict:
    """The record of the lock on ``out`` when this process holds it ({} otherwise)."""
    try:
        with open(lock_path(out), "rb") as f:
            record = parse_record(f.read(_RECORD_LIMIT))
    except OSError:
        return {}
    return record if record.get("pid") == os.getpid() else {}


def current_token(out: Path) -> str:
    """This run's token: the held lock's, or a fresh one when no lock is held (its leftovers are
    then never recovered automatically, and nothing of anyone else's is touched)."""
    return held_record(out).get("token") or new_token()


def _set_pending(out: Path, pending: list[str]) -> None:
    try:
        fd = os.open(lock_path(out), os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return
    try:
        record = read_record_fd(fd)
        if record.get("pid") == os.getpid():
            write_record_fd(fd, {**record, "pending": pending})
    finally:
        os.close(fd)


# -- markers --------------------------------------------------------------------------------------


def mark(folder: Path, token: str) -> None:
    fd = os.open(folder / MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        os.write(fd, token.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def unmark(folder: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(folder / MARKER)


def is_marked(folder: Path, token: str) -> bool:
    """Whether ``folder`` is a real folder (not a link) holding our marker with ``token``."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    marker = folder / MARKER
    if marker.is_symlink() or not marker.is_file():
        return False
    try:
        return marker.read_bytes()[:64] == token.encode()
    except OSError:
        return False


def remove_marked(folder: Path) -> None:
    """Remove a marked folder, its marker last (a kill part-way leaves it marked, to finish later)."""
    for dirpath, dirnames, filenames in os.walk(folder, topdown=False):
        for name in filenames:
            if not (dirpath == str(folder) and name == MARKER):
                os.unlink(os.path.join(dirpath, name))
        for name in dirnames:
            path = os.path.join(dirpath, name)
            os.unlink(path) if os.path.islink(path) else os.rmdir(path)
    unmark(folder)
    os.rmdir(folder)


# -- swapping and recovering --------------------------------------------------------------------


def replace(work: Path, out: Path, token: str) -> None:
    """Move the marked ``work`` folder to ``out``, moving an existing ``out`` aside first and
    removing it once the new one is in place (the caller has checked it may be replaced)."""
    if not out.exists() and not out.is_symlink():
        os.rename(work, out)  # killed now: recover() removes the marker the new bundle still holds
        unmark(out)
        return
    old = old_dir(out, token)
    mark(out, token)  # killed now: recover() removes the marker again
    os.rename(out, old)  # killed now: recover() puts it back
    os.rename(work, out)  # killed now: recover() removes the new bundle's marker and the old one
    unmark(out)
    remove_marked(old)


def recover(out: Path) -> list[str]:
    """Finish what runs killed while writing ``out`` left beside it (see the module doc); call only
    while holding the lock. Returns one line per thing done or left alone."""
    notes = []
    pending = held_record(out).get("pending") or []
    for token in pending:
        old, partial = old_dir(out, token), partial_dir(out, token)
        if is_marked(out, token):
            unmark(out)
            notes.append(f"removed the marker a run killed while writing {out} left inside it")
        if is_marked(old, token):
            if not out.exists() and not out.is_symlink():
                unmark(old)
                os.rename(old, out)
                notes.append(f"restored {out} from {old.name}, left by a run killed while replacing it")
            else:
                remove_marked(old)
                notes.append(f"removed {old}, left by a run killed after replacing {out}")
        if is_marked(partial, token):
            remove_marked(partial)
            notes.append(f"removed {partial}, left by a run killed while writing its bundle")
    _set_pending(out, [])
    pattern = f".{glob.escape(out.name)}."
    for path in sorted(out.parent.glob(pattern + "old-*")) + sorted(out.parent.glob(pattern + "partial*")):
        notes.append(f"left {path} alone: it looks like a leftover of a kimi-jax run, but holds no marker of one "
                     "this lock recorded; move or remove it yourself")  # fmt: skip
    return notes
