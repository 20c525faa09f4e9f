"""From a manifest to a validated run plan: everything that can be wrong is found before compute."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from kimi_jax.checkpoint import CheckpointIndex, open_checkpoint
from kimi_jax.errors import CheckpointError, ManifestError
from kimi_jax.manifest import Manifest, load_manifest
from kimi_jax.synth import ensure_synthetic


@dataclasses.dataclass(frozen=True)
class RunPlan:
    manifest: Manifest
    index: CheckpointIndex
    prompt: tuple[int, ...]

    @property
    def context_len(self) -> int:
        """Positions the last step attends over: the prompt plus all generated tokens but the last."""
        return len(self.prompt) + self.manifest.generate.max_new_tokens - 1


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


def run_manifest(manifest_path: str, overrides: list[str] | None = None, out_dir: str | None = None, echo=print):
    plan = load_plan(manifest_path, overrides, out_dir)
    return generate(plan, echo=echo)


def generate(plan: RunPlan, echo=print, progress: bool = True):
    """Stream the plan's checkpoint and decode greedily; prints progress and a per-step summary."""
    from tqdm import tqdm

    from kimi_jax.engine import Engine
    from kimi_jax.jax_setup import enable_compilation_cache

    m = plan.manifest
    enable_compilation_cache(m.model.cache_dir)
    if m.storage.evict_page_cache:
        from kimi_jax.reader import evict_page_cache

        evict_page_cache(h.path for h in plan.index.shards)
    cfg = plan.index.config
    echo(f"{plan.index.layout} checkpoint {plan.index.root}")
    echo(f"{cfg.num_hidden_layers} layers, {cfg.n_routed_experts} experts top-{cfg.num_experts_per_tok}; "
         f"prompt {list(plan.prompt)}; {m.generate.max_new_tokens} new tokens, kv_cache {m.generate.kv_cache}, "
         f"{m.compute.dtype}")  # fmt: skip
    layers = cfg.num_hidden_layers
    bar = tqdm(total=m.generate.max_new_tokens * layers, unit="layer", disable=not progress, dynamic_ncols=True)
    started = time.perf_counter()
    done_bytes = [0]

    def on_layer(step: int, layer: int, step_bytes: int) -> None:
        total = done_bytes[0] + step_bytes
        rate = total / max(time.perf_counter() - started, 1e-9) / 2**20
        bar.set_description(f"step {step} layer {layer}")
        bar.set_postfix_str(f"{total / 2**20:,.1f} MiB read, {rate:,.0f} MiB/s")
        bar.update(1)

    def on_step(step) -> None:
        done_bytes[0] += step.bytes_read

    with Engine(plan.index, m.compute.dtype, m.storage.prefetch, m.storage.io_retries) as engine:
        engine.on_layer = on_layer
        steps = engine.generate(list(plan.prompt), m.generate.max_new_tokens, m.generate.kv_cache, on_step)
    bar.close()
    echo(f"{'step':>4} {'token':>8} {'logit':>12} {'bytes read':>14} {'wall s':>8}")
    for s in steps:
        echo(f"{s.index:>4} {s.token:>8} {s.logit:>12.6f} {s.bytes_read:>14,} {s.wall_s:>8.3f}")
    echo("tokens: " + " ".join(str(s.token) for s in steps))
    return steps
