"""Writes that never leave a half-written file: temp file in the same folder, fsync, rename."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def default_cache_dir() -> Path:
    """Where synthetic checkpoints and the JAX compilation cache go when ``model.cache_dir`` is not
    set: ``$KIMI_JAX_CACHE`` (relative to the working directory) or ``~/.cache/kimi-jax``."""
    env = os.environ.get("KIMI_JAX_CACHE")
    if env:
        return Path(env).expanduser().resolve()
    return (Path.home() / ".cache" / "kimi-jax").resolve()


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # ".NAME.tmp-XXXX": one pattern for every temp file, so leftovers of a killed run are findable
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json_atomic(path: Path, value: Any) -> Path:
    return write_bytes_atomic(path, (json.dumps(value, indent=1, ensure_ascii=False) + "\n").encode())


def canonical_json(value: Any) -> bytes:
    """Sorted keys, compact separators: the bytes that digests of JSON values are taken over."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
