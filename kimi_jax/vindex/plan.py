"""A vindex plan: a manifest's ``vindex`` section checked against the checkpoint, before compute."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from kimi_jax.errors import ManifestError
from kimi_jax.manifest import Manifest, VindexSection
from kimi_jax.run.plan import prepare_run, prompt_problems
from kimi_jax.storage.checkpoint import CheckpointIndex
from kimi_jax.storage.residency import ResidencyPlan
from kimi_jax.vindex.routing import LedgerError, Trace, ledger_digest_and_trace


def vindex_dir(output_dir: Path) -> Path:
    """Where a manifest's vindex lands: beside its run bundle (``OUTPUT.vindex``), never inside it,
    so ``run`` and ``vindex`` can share one manifest without replacing each other's output."""
    output_dir = Path(output_dir)
    return output_dir.parent / f"{output_dir.name}.vindex"


@dataclasses.dataclass(frozen=True)
class VindexPlan:
    """A validated vindex run: everything checked against the checkpoint, nothing computed."""

    manifest: Manifest
    index: CheckpointIndex
    phases: tuple[int, ...]
    layers: tuple[int, ...]  # selected layers, ascending
    experts: tuple[int, ...] | None  # phase-1 expert ids, None = all
    top: int
    prompts: tuple[tuple[int, ...], ...]
    max_new_tokens: int
    ledgers: tuple[tuple[Path, str, Trace], ...]  # (bundle dir, BLAKE3 of ledger.json, routing trace)
    out_dir: Path  # OUTPUT.vindex
    residency: ResidencyPlan  # the run plan's: what phase 3's engine keeps in memory

    def moe_layers(self) -> list[int]:
        return [i for i in self.layers if self.index.layers[i].kind == "moe"]


def plan_vindex(manifest: Manifest) -> VindexPlan:
    """Open the checkpoint and check the manifest's vindex section against it, before compute."""
    run = prepare_run(manifest)
    index, cfg = run.index, run.index.config
    v = manifest.vindex or VindexSection()
    problems: list[ManifestError] = []
    n_layers = cfg.num_hidden_layers
    has_experts = any(layer.kind == "moe" for layer in index.layers)
    if not has_experts:
        what = {1: "1 (expert spectra)", 2: "2 (router spectra)", 3: "3 (routing statistics)"}
        problems.append(manifest.error("vindex.phases", f"phase(s) {', '.join(what[p] for p in v.phases)} need routed "
                                                        f"experts, but checkpoint {index.root} has none "
                                                        f"(n_routed_experts={cfg.n_routed_experts}, all {n_layers} layers "
                                                        "dense); choose a MoE checkpoint"))  # fmt: skip
    layers = list(range(n_layers)) if v.layers is None else list(v.layers)
    for i, layer in enumerate(v.layers or []):
        if layer >= n_layers:
            problems.append(manifest.error(f"vindex.layers.{i}", f"layer {layer} is out of range: checkpoint "
                                                                 f"{index.root} has {n_layers} layers (0..{n_layers - 1})"))  # fmt: skip
    for i, expert in enumerate(v.experts or []):
        if expert >= cfg.n_routed_experts:
            problems.append(manifest.error(f"vindex.experts.{i}", f"expert id {expert} is out of range: checkpoint "
                                                                  f"{index.root} has {cfg.n_routed_experts} routed experts "
                                                                  f"per MoE layer (0..{cfg.n_routed_experts - 1})"))  # fmt: skip
    layers = sorted(layer for layer in layers if layer < n_layers)
    if has_experts and v.layers is not None and ({2, 3} & set(v.phases)):
        if not any(index.layers[i].kind == "moe" for i in layers):
            problems.append(manifest.error("vindex.layers", f"phases {sorted({2, 3} & set(v.phases))} need a MoE layer, "
                                                            f"but layers {layers} are all dense (the first "
                                                            f"{cfg.first_k_dense_replace} layer(s) are)"))  # fmt: skip
    max_new = v.max_new_tokens if v.max_new_tokens is not None else manifest.generate.max_new_tokens
    if v.prompts is not None:
        prompts = [tuple(p) for p in v.prompts]
    else:
        prompts = [] if v.bundles else [tuple(run.prompt)]
    if 3 in v.phases:
        max_field = "vindex.max_new_tokens" if v.max_new_tokens is not None else "generate.max_new_tokens"
        for i, prompt in enumerate(prompts):
            field = f"vindex.prompts.{i}" if v.prompts is not None else "prompt.tokens"
            problems += prompt_problems(manifest, cfg, prompt, max_new, name=field, tokens_field=field,
                                        length_field=max_field)  # fmt: skip
    ledgers = []
    if 3 in v.phases:
        for i, bundle in enumerate(v.bundles):
            ledger = Path(bundle) / "ledger.json"
            if not os.path.lexists(ledger):  # a FIFO or a folder there is refused by the reader, by name
                problems.append(manifest.error(f"vindex.bundles.{i}", f"{ledger} does not exist (expected a run-bundle "
                                                                      "directory holding ledger.json)"))  # fmt: skip
                continue
            try:
                digest, trace = ledger_digest_and_trace(Path(bundle), n_layers, cfg.n_routed_experts)
            except LedgerError as e:
                problems.append(manifest.error(f"vindex.bundles.{i}", str(e)))
                continue
            ledgers.append((Path(bundle), digest, trace))
    if problems:
        raise ManifestError("\n".join(str(p) for p in problems))
    return VindexPlan(manifest, index, tuple(sorted(v.phases)), tuple(layers),
                      None if v.experts is None else tuple(v.experts), v.top_singular_values, tuple(prompts),
                      max_new, tuple(ledgers), vindex_dir(Path(manifest.output.dir)), run.residency)  # fmt: skip
