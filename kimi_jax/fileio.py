"""Writes that never leave a half-written file: temp file in the same folder, fsync, rename."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator


def default_cache_dir() -> Path:
    """Where synthetic checkpoints and the JAX compilation cache go when ``model.cache_dir`` is not
    set: ``$KIMI_JAX_CACHE`` (relative to the working directory) or ``~/.cache/kimi-jax``."""
    env = os.environ.get("KIMI_JAX_CACHE")
    if env:
        return Path(env).expanduser().resolve()
    return (Path.home() / ".cache" / "kimi-jax").resolve()


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


def canonical_json(value: Any) -> bytes:
    """Sorted keys, compact separators: the bytes that digests of JSON values are taken over."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
