"""Starting ``kimi-jax serve``: the manifest checked for what serving needs, the API key read, the
runs folder made and cleaned of partial bundles, the engine thread started, then the HTTP server."""

from __future__ import annotations

import asyncio
from pathlib import Path

from kimi_jax.errors import KimiJaxError
from kimi_jax.fileio import read_regular
from kimi_jax.manifest import load_manifest
from kimi_jax.model.jax_setup import enable_compilation_cache
from kimi_jax.run.console import to_stderr
from kimi_jax.run.plan import prepare_run
from kimi_jax.serve.app import Server, is_loopback, serve_forever
from kimi_jax.serve.bundles import remove_partials
from kimi_jax.serve.scheduler import Scheduler

MAX_KEY_BYTES = 4096


def read_api_key(path: str) -> str:
    raw = read_regular(Path(path), MAX_KEY_BYTES, "--api-key-file", KimiJaxError)
    try:
        key = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise KimiJaxError(f"--api-key-file {path}: not UTF-8 text") from None
    if len(key) < 16 or any(c.isspace() or not c.isprintable() for c in key):
        raise KimiJaxError(f"--api-key-file {path}: the key must be one line of at least 16 printable characters "
                           "without spaces")  # fmt: skip
    return key


def serve(manifest_path: str, overrides: list[str], host: str, port: int, api_key_file: str | None,
          runs: str | None, keep: int, max_batch: int, max_queue: int, time_limit_s: float, notes: bool = False,
          echo=to_stderr) -> None:  # fmt: skip
    api_key = read_api_key(api_key_file) if api_key_file else None
    if api_key is None and not is_loopback(host):
        raise KimiJaxError(f"--host {host}: serving beyond this machine needs --api-key-file (a bearer token every "
                           "request must send)")  # fmt: skip
    manifest = load_manifest(manifest_path, overrides)
    if not manifest.generate.kv_cache:
        raise manifest.error("generate.kv_cache", "serve decodes requests together through the KV cache: set it true")
    if manifest.compute.mesh is not None or manifest.distributed is not None:
        raise manifest.error("compute.mesh" if manifest.compute.mesh is not None else "distributed",
                             "serve runs on one device in one process")  # fmt: skip
    for field, given in (("prompts", manifest.prompts), ("generate.drafts", manifest.generate.drafts)):
        if given is not None:  # requests bring their own prompt, and a request decodes without drafts
            raise manifest.error(field, "serve answers one prompt per request: remove it (the manifest's prompt is "
                                        "only checked, each request brings its own)")  # fmt: skip
    plan = prepare_run(manifest)
    folder = Path(runs) if runs else Path(manifest.output.dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KimiJaxError(f"--runs {folder}: cannot create the folder: {e.strerror or e}") from None
    for name in remove_partials(folder):
        echo(f"removed the partial bundle {name} a stopped server left")
    enable_compilation_cache(manifest.model.cache_dir)
    model = Path(str(plan.index.root)).name
    scheduler = Scheduler(plan, max_batch, max_queue, keep, echo, notes)
    scheduler.start()
    try:
        asyncio.run(serve_forever(Server(plan, folder.resolve(), scheduler, model, api_key, time_limit_s), host, port,
                                  echo))  # fmt: skip
    finally:
        scheduler.close()
