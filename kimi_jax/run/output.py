"""A run's output folder: checked before any compute, and held by one run at a time.

:func:`check_output_dir` refuses, naming the folder, what a bundle may not be written to: the
filesystem root, something that is not a folder, the checkpoint folder (or a folder inside it, or
one holding it), and any non-empty folder that is not provably a kimi-jax bundle.

:func:`hold_output` takes an exclusive ``flock`` on ``.OUT.lock`` beside the folder for the whole
run, ``--resume`` included, so two runs never share a bundle's work and partial folders; a second
run fails at once, naming the folder and the PID holding it. The lock file holds the holder's
record (PID and the token that names and marks what the run puts beside the folder, see
:mod:`kimi_jax.ledger.swap`) and is removed when the run ends; a killed run's record is read by
the next holder, which then recovers exactly that run's leftovers.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

from kimi_jax.errors import OutputError
from kimi_jax.fileio import write_failure
from kimi_jax.ledger.bundle import not_a_bundle
from kimi_jax.ledger.swap import lock_path, new_token, read_record_fd, write_record_fd
from kimi_jax.storage.remote import is_remote


def check_output_dir(out: Path, checkpoint: Path | str | None) -> None:
    """Raise :class:`OutputError` unless a bundle may be written to (or replace) ``out``.
    ``checkpoint``: the checkpoint folder (a remote checkpoint's local mirror), or its URL, which no
    output folder can be inside of."""
    out = Path(os.path.abspath(out))
    if out.parent == out:
        raise OutputError(f"{out}: output.dir is the filesystem root; choose a folder for the bundle")
    if checkpoint is not None and not is_remote(checkpoint):
        real, ckpt = Path(os.path.realpath(out)), Path(os.path.realpath(checkpoint))
        if real == ckpt or ckpt in real.parents:
            raise OutputError(f"{out}: output.dir is inside the checkpoint folder {ckpt}; a bundle is written beside "
                              "what it reads, never into it")  # fmt: skip
        if real in ckpt.parents:
            raise OutputError(f"{out}: output.dir holds the checkpoint {ckpt}; choose a folder of its own for the "
                              "bundle")
    if out.exists() or out.is_symlink():
        problem = not_a_bundle(out)
        if problem is not None:
            raise OutputError(f"{out}: refusing to write the bundle there: {problem}. Choose another output.dir "
                              "(--out), or move that folder away yourself")  # fmt: skip


@contextlib.contextmanager
def hold_output(out: Path) -> Iterator[None]:
    """Hold the exclusive lock on ``out`` for the duration of the ``with`` block (see the module doc)."""
    out = Path(os.path.abspath(out))
    path = lock_path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd = _acquire(path, out)
    except OSError as e:
        raise OutputError(f"{out}: cannot create the lock {path.name} beside the output folder: "
                          f"{write_failure(e) or e}") from None  # fmt: skip
    try:
        previous = read_record_fd(fd)  # a killed holder's record: its leftovers are to recover
        pending = sorted({*previous.get("pending", []), *([previous["token"]] if previous.get("token") else [])})
        write_record_fd(fd, {"pid": os.getpid(), "token": new_token(), "pending": pending})
    except OSError as e:
        os.close(fd)  # the file keeps the killed run's record for the next try
        raise OutputError(f"{out}: cannot write the lock {path.name} beside the output folder: "
                          f"{write_failure(e) or e}") from None  # fmt: skip
    try:
        yield
    finally:
        if not read_record_fd(fd).get("pending"):  # else kept: a killed run's leftovers are still to recover
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # while still holding it: a waiting run then finds a fresh file (see _acquire)
        os.close(fd)


def _acquire(path: Path, out: Path) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = read_record_fd(fd).get("pid") or "unknown"
            os.close(fd)
            raise OutputError(f"{out}: another kimi-jax run (PID {holder}) is writing this output folder; wait for it "
                              f"to finish, or choose another output.dir (lock: {path})") from None  # fmt: skip
        # The previous holder unlinks the file as it lets go; a lock on an unlinked file guards nothing.
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
