"""From a manifest to a validated run plan: everything that can be wrong is found before compute."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from kimi_jax.errors import CheckpointError, ManifestError
from kimi_jax.fileio import write_failure
from kimi_jax.run.manifest import Manifest, load_manifest
from kimi_jax.storage.checkpoint import CheckpointIndex, open_checkpoint
from kimi_jax.storage.synth import ensure_synthetic


@dataclasses.dataclass(frozen=True)
class RunPlan:
    manifest: Manifest
    index: CheckpointIndex
    prompt: tuple[int, ...]


def resolve_checkpoint(manifest: Manifest) -> Path:
    model = manifest.model
    if model.checkpoint is not None:
        return Path(model.checkpoint)
    syn = model.synthetic
    return ensure_synthetic(syn.preset, layout=syn.layout, seed=syn.seed, cache_dir=model.cache_dir)


def prepare_run(manifest: Manifest) -> RunPlan:
    """Open the checkpoint and check the manifest against it; raise before any compute."""
    where = "model.checkpoint" if manifest.model.checkpoint is not None else "model.synthetic"
    try:
        index = open_checkpoint(resolve_checkpoint(manifest))
    except CheckpointError as e:
        raise manifest.error(where, str(e)) from None
    except OSError as e:  # generating a synthetic checkpoint into the cache failed
        if write_failure(e) is None:
            raise
        raise manifest.error(where, f"cannot write the synthetic checkpoint into {manifest.model.cache_dir}: "
                                    f"{write_failure(e)}; set model.cache_dir or $KIMI_JAX_CACHE to a writable "
                                    "folder") from None  # fmt: skip
    cfg = index.config
    prompt = _prompt_tokens(manifest, index)
    problems = []
    for i, token in enumerate(prompt):
        if token >= cfg.vocab_size:
            problems.append(manifest.error(f"prompt.tokens.{i}",
                                           f"token id {token} is outside the vocabulary (vocab_size {cfg.vocab_size})"))  # fmt: skip
    total = len(prompt) + manifest.generate.max_new_tokens
    if total > cfg.max_position_embeddings:
        problems.append(manifest.error("generate.max_new_tokens",
                                       f"prompt ({len(prompt)} tokens) + max_new_tokens ({manifest.generate.max_new_tokens}) "
                                       f"= {total} positions exceeds max_position_embeddings {cfg.max_position_embeddings}"))  # fmt: skip
    if problems:
        raise ManifestError("\n".join(str(p) for p in problems))
    return RunPlan(manifest, index, tuple(prompt))


def _prompt_tokens(manifest: Manifest, index: CheckpointIndex) -> list[int]:
    if manifest.prompt.tokens is not None:
        return list(manifest.prompt.tokens)
    tokenizer_file = index.root / "tokenizer.json"
    if not tokenizer_file.is_file():
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
