"""Process-wide JAX settings: the persistent compilation cache."""

from __future__ import annotations

from pathlib import Path

import jax

from kimi_jax.errors import OutputError
from kimi_jax.fileio import default_cache_dir, write_failure

_enabled: Path | None = None


def enable_compilation_cache(cache_dir: Path | None = None) -> Path:
    """Turn on JAX's persistent compilation cache under ``cache_dir/jax`` (once per process)."""
    global _enabled
    if _enabled is None:
        path = Path(cache_dir or default_cache_dir()) / "jax"
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"{path}: cannot create the JAX compilation cache: {write_failure(e) or e}; set "
                              "model.cache_dir or $KIMI_JAX_CACHE to a writable folder") from None  # fmt: skip
        jax.config.update("jax_compilation_cache_dir", str(path))
        # Our per-layer programs are small; cache them all, not only slow compiles.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        _enabled = path
    return _enabled
