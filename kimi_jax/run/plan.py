"""From a manifest to a validated run plan: everything that can be wrong is found before compute."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from kimi_jax.config import ModelConfig
from kimi_jax.errors import CheckpointError, ManifestError
from kimi_jax.run.manifest import Manifest, load_manifest
from kimi_jax.storage.checkpoint import CheckpointIndex
from kimi_jax.storage.remote import RemoteSettings
from kimi_jax.storage.source import CheckpointSource, open_source
from kimi_jax.storage.synth import ensure_synthetic


@dataclasses.dataclass(frozen=True)
class RunPlan:
    manifest: Manifest
    index: CheckpointIndex
    prompt: tuple[int, ...]
    source: CheckpointSource | None = None  # how the bytes are read: local or remote, digest-checked or not


def resolve_checkpoint(manifest: Manifest) -> Path | str:
    model = manifest.model
    if model.checkpoint is not None:
        return model.checkpoint if isinstance(model.checkpoint, str) else Path(model.checkpoint)
    syn = model.synthetic
    return ensure_synthetic(syn.preset, layout=syn.layout, seed=syn.seed, cache_dir=model.cache_dir)


def prepare_run(manifest: Manifest) -> RunPlan:
    """Open the checkpoint and check the manifest against it; raise before any compute."""
    where = "model.checkpoint" if manifest.model.checkpoint is not None else "model.synthetic"
    storage = manifest.storage
    try:
        source = open_source(resolve_checkpoint(manifest), manifest.model.cache_dir, storage.verify_digests,
                             storage.digest_file, remote_settings(manifest))  # fmt: skip
    except CheckpointError as e:
        raise manifest.error("storage.digest_file" if "digest file" in str(e) else where, str(e)) from None
    index = source.index
    prompt = _prompt_tokens(manifest, index)
    problems = prompt_problems(manifest, index.config, prompt, manifest.generate.max_new_tokens)
    if problems:
        raise ManifestError("\n".join(str(p) for p in problems))
    return RunPlan(manifest, index, tuple(prompt), source)


def remote_settings(manifest: Manifest) -> RemoteSettings:
    r, storage = manifest.storage.remote, manifest.storage
    if r is None:
        return RemoteSettings(retries=storage.io_retries)
    return RemoteSettings(max_in_flight=r.max_in_flight, timeout_s=r.timeout_s, retries=storage.io_retries,
                          request_bytes=r.request_mib << 20, cache_dir=Path(manifest.model.cache_dir) / "ranges",
                          cache_bytes=int(r.cache_gib * 2**30))  # fmt: skip


def prompt_problems(manifest: Manifest, cfg: ModelConfig, prompt: Sequence[int], max_new_tokens: int, *,
                    name: str = "prompt", tokens_field: str = "prompt.tokens",
                    length_field: str = "generate.max_new_tokens") -> list[ManifestError]:  # fmt: skip
    """What stops ``prompt`` from being run for ``max_new_tokens`` steps on a model ``cfg``: token
    ids outside the vocabulary (reported at ``tokens_field.I``) and more positions than
    ``max_position_embeddings`` (reported at ``length_field``)."""
    problems = [manifest.error(f"{tokens_field}.{i}", f"token id {token} is outside the vocabulary "
                                                      f"(vocab_size {cfg.vocab_size})")
                for i, token in enumerate(prompt) if token >= cfg.vocab_size]  # fmt: skip
    total = len(prompt) + max_new_tokens
    if total > cfg.max_position_embeddings:
        problems.append(manifest.error(length_field, f"{name} ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) "
                                                     f"= {total} positions exceeds max_position_embeddings "
                                                     f"{cfg.max_position_embeddings}"))  # fmt: skip
    return problems


def _prompt_tokens(manifest: Manifest, index: CheckpointIndex) -> list[int]:
    if manifest.prompt.tokens is not None:
        return list(manifest.prompt.tokens)
    tokenizer_file = index.root / "tokenizer.json"
    if not tokenizer_file.exists():
        raise manifest.error("prompt.text", f"the checkpoint {index.root} ships no tokenizer.json; "
                                            "give the prompt as prompt.tokens")  # fmt: skip
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise manifest.error("prompt.text", "encoding text needs the 'tokenizers' package "
                                            "(pip install tokenizers), or give prompt.tokens") from None  # fmt: skip
    return Tokenizer.from_file(str(tokenizer_file)).encode(manifest.prompt.text).ids


def load_plan(manifest_path: str, overrides: list[str] | None = None, out_dir: str | None = None) -> RunPlan:
    return prepare_run(load_manifest(manifest_path, overrides or [], out_dir))
