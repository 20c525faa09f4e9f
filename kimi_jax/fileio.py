"""Files in and out. Writes never leave a half-written file (temp file in the same folder, fsync,
rename). Reads of files strangers hand us open only regular files and never read more than a
stated limit.

File modes: everything kimi-jax creates gets the mode any program gives a new file, 0666 (files)
or 0777 (folders) minus the umask, so 0644/0755 with the usual umask 022 and 0600/0700 with 077.
Bundles are meant to be handed to others for verification; a stricter umask keeps them private.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

from kimi_jax.errors import InputError, KimiJaxError

# Deeper JSON than any file of ours (a ledger is 7 levels deep) is a hostile file, not data.
MAX_JSON_DEPTH = 32

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))  # fmt: skip


def default_cache_dir() -> Path:
    """Where synthetic checkpoints and the JAX compilation cache go when ``model.cache_dir`` is not
    set: ``$KIMI_JAX_CACHE`` (relative to the working directory) or ``~/.cache/kimi-jax``."""
    env = os.environ.get("KIMI_JAX_CACHE")
    if env:
        return Path(env).expanduser().resolve()
    return (Path.home() / ".cache" / "kimi-jax").resolve()


def current_umask() -> int:
    """The process umask, read without changing it where Linux reports it (/proc/self/status)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_writer(path: Path) -> Iterator[IO[bytes]]:
    """A binary file that appears at ``path`` only when the ``with`` block completes: written to
    a temp file beside it, fsynced, then renamed over ``path``. On any exception the temp file is
    removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # ".NAME.tmp-XXXX": one pattern for every temp file, so leftovers of a killed run are findable
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp creates 0600; give the usual mode (module doc)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    with atomic_writer(path) as f:
        f.write(data)
    return Path(path)


def write_json_atomic(path: Path, value: Any) -> Path:
    """``value`` as indented UTF-8 JSON. Strict JSON: NaN and infinities are refused (JSON has no
    spelling for them), naming the file, rather than written as tokens other readers reject."""
    try:
        text = json.dumps(value, indent=1, ensure_ascii=False, allow_nan=False)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return write_bytes_atomic(path, (text + "\n").encode())


# Failures of a write that are the machine's, not ours: named in one line instead of a traceback.
_WRITE_FAILURES = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                   errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                   errno.EPERM: "operation not permitted", errno.EFBIG: "file too large",
                   errno.EIO: "I/O error"}  # fmt: skip


def write_failure(exc: BaseException) -> str | None:
    """What went wrong, when ``exc`` is a write failing for a reason of the machine's (disk full,
    read-only, no permission), including as orbax and tensorstore report it; else None."""
    if isinstance(exc, OSError) and exc.errno in _WRITE_FAILURES:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{_WRITE_FAILURES[exc.errno]} [{errno.errorcode[exc.errno]}]{where}"
    text = str(exc)
    for code, name in _WRITE_FAILURES.items():
        if os.strerror(code) in text:
            return f"{name} [{errno.errorcode[code]}] (reported as {type(exc).__name__}: {text[:160]})"
    if "RESOURCE_EXHAUSTED" in text:  # tensorstore's status for a full disk
        return f"{_WRITE_FAILURES[errno.ENOSPC]} (reported as {type(exc).__name__}: {text[:160]})"
    return None


def canonical_json(value: Any) -> bytes:
    """Sorted keys, compact separators: the bytes that digests of JSON values are taken over."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


# -- reading what strangers hand us ---------------------------------------------------------------


def _kind(mode: int) -> str | None:
    return next((name for test, name in _KINDS if test(mode)), None)


def open_regular(path: str | os.PathLike, what: str = "file", error: type[KimiJaxError] = InputError) -> int:
    """A read-only descriptor of ``path``, which must be a regular file (a symbolic link is followed
    only to one). Checked with ``stat`` before opening, so no FIFO or device is ever opened, and
    with ``fstat`` after (opened non-blocking), so what was checked is what is read."""
    try:
        kind = _kind(os.stat(path).st_mode)
        if kind is None:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            kind = _kind(os.fstat(fd).st_mode)
            if kind is not None:
                os.close(fd)
    except FileNotFoundError:
        raise error(f"{path}: {what} does not exist") from None
    except OSError as e:
        raise error(f"{path}: cannot open {what} ({e.strerror or e})") from None
    if kind is not None:
        raise error(f"{path}: {what} is {kind}; expected a regular file")
    os.set_blocking(fd, True)
    return fd


def read_regular(path: str | os.PathLike, limit: int, what: str = "file",
                 error: type[KimiJaxError] = InputError) -> bytes:  # fmt: skip
    """The bytes of a regular file of at most ``limit`` bytes (see :func:`open_regular`)."""
    fd = open_regular(path, what, error)
    try:
        with os.fdopen(fd, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            data = f.read(limit + 1) if size <= limit else b""
    except OSError as e:
        raise error(f"{path}: cannot read {what} ({e.strerror or e})") from None
    if size > limit or len(data) > limit:
        raise error(f"{path}: {what} is {max(size, len(data)):,} bytes, more than the {limit:,} such a file can "
                    "legitimately hold")  # fmt: skip
    return data


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(data: bytes, where: str, error: type[KimiJaxError] = InputError, max_depth: int = MAX_JSON_DEPTH,
               object_pairs_hook=None, allow_nan: bool = False) -> Any:  # fmt: skip
    """Strict JSON from UTF-8 bytes: at most ``max_depth`` levels of nesting, and no NaN or Infinity
    unless ``allow_nan`` (for a reader that checks every number it uses and names the field)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        value = json.loads(text, parse_constant=None if allow_nan else _reject_constant,
                           object_pairs_hook=object_pairs_hook)  # fmt: skip
    except RecursionError:
        raise error(f"{where}: JSON nested too deeply (more than {max_depth} levels)") from None
    except ValueError as e:  # JSONDecodeError, NaN/Infinity, and whatever the pairs hook rejects
        raise error(f"{where}: not valid JSON ({e})") from None
    depth_of_deepest = json_depth(value, max_depth)
    if depth_of_deepest > max_depth:
        raise error(f"{where}: JSON nested too deeply (more than {max_depth} levels)")
    return value


def json_depth(value: Any, stop_after: int) -> int:
    """Nesting depth of a JSON value (a scalar is 0), counted without recursion; stops counting past ``stop_after``."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            depth += 1
            deepest = max(deepest, depth)
            if deepest > stop_after:
                return deepest
            stack.extend((child, depth) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def read_json(path: str | os.PathLike, limit: int, what: str = "JSON file", error: type[KimiJaxError] = InputError,
              allow_nan: bool = False) -> Any:  # fmt: skip
    """A JSON file through a size limit: regular files only, UTF-8, strict JSON, bounded nesting."""
    return parse_json(read_regular(path, limit, what, error), str(path), error, allow_nan=allow_nan)
