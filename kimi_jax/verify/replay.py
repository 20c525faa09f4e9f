"""Check 12 of verify (``--replay``): run the bundle's manifest again and compare every measured value."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

from kimi_jax.errors import KimiJaxError
from kimi_jax.fileio import default_cache_dir
from kimi_jax.ledger.bundle import receipt_verdict
from kimi_jax.manifest import parse_manifest_dict, recorded_manifest
from kimi_jax.platform_info import platform_differences
from kimi_jax.storage.codecs import describe_dequant, recorded_dequant
from kimi_jax.verify.bundle_view import BundleView
from kimi_jax.verify.report import CheckFailed, differences, join_problems, short

# -- replay -------------------------------------------------------------------------------------

# Synthetic presets too large to generate without being asked: what each writes.
LARGE_PRESETS = {"full-shape": "a sparse 595 GB checkpoint",
                 "full-shape-routed": "a sparse 595 GB checkpoint (0.8 GB of it written)"}
# Measured fields that legitimately differ between two executions of the same manifest; and the
# checkpoint's path, which for a synthetic one is wherever the replaying user's cache is (the
# checkpoint's identity, its layout and config and tensor list digests, is compared).
# A replay runs without the proof (so without its bare pass's wall time and network bytes) and
# without the anchor; a multi-sequence ledger holds those per sequence.
_REPLAY_EXCLUDED = ("wall_s", "compile_s", "proof_wall_s", "run_wall_s", "page_cache_evicted",
                    "page_cache_resident_bytes", "path", "non_perturbation", "anchor", "proof_bytes_network",
                    "proof_bytes_cache")
_REPLAY_SECTIONS = ("checkpoint", "run", "steps", "totals", "sequences", "passes")


def replay_differences(recorded: dict[str, Any], replayed: dict[str, Any], limit: int = 20) -> list[str]:
    """Where a replayed ledger differs from the recorded one in the checkpoint identity, the run
    settings, any step field (tokens, contexts, logits, digests, top-k, norms, experts, router
    scores, routing weights, bytes per step and layer) or the byte totals; wall-clock and
    page-cache fields are not compared."""

    def skip(path: str) -> bool:
        return path.rsplit(".", 1)[-1] in _REPLAY_EXCLUDED

    a = {k: recorded.get(k) for k in _REPLAY_SECTIONS}
    b = {k: replayed.get(k) for k in _REPLAY_SECTIONS}
    return [f"{path}: bundle {short(x, 60)}, replay {short(y, 60)}"
            for path, x, y in differences(a, b, "", limit, skip)]


def dequant_difference(recorded: dict[str, Any], replayed: dict[str, Any]) -> str:
    """A sentence naming both dequantization modes when they differ, else ''. A ledger of
    kimi-jax 0.1.0 records none: it always rounded quantized weights to bfloat16."""
    was, now = (recorded.get("run") or {}).get("dequant"), (replayed.get("run") or {}).get("dequant")
    if recorded_dequant(was) == recorded_dequant(now):
        return ""
    return (f"the bundle was computed with dequantization {describe_dequant(was)} and the replay with "
            f"{describe_dequant(now)}, so their quantized weights differ; ")


def _pin_residency(resolved: dict[str, Any], residency: Any) -> dict[str, Any]:
    """A budget or page-cache choice of ``auto`` resolved to what memory allowed when the run started:
    the replay keeps what the run kept (the budget it resolved, the page-cache choice it made), so the
    sources of its bytes are the run's too. What a budget computes never depends on it."""
    storage = resolved.get("storage") if isinstance(resolved.get("storage"), dict) else None
    if storage is None or not isinstance(residency, dict):
        return resolved
    pinned = dict(storage)
    if isinstance(residency.get("budget_bytes"), int) and not isinstance(residency["budget_bytes"], bool):
        pinned["resident_bytes"] = residency["budget_bytes"]
    if residency.get("page_cache") in ("keep", "drop"):
        pinned["page_cache"] = residency["page_cache"]
    return {**resolved, "storage": pinned}


def check_replay(b: BundleView, allow_large: bool = False) -> str:
    """Re-run the bundle's manifest. What the bundle names is trusted only to say what to compute:
    whatever the replay writes (a synthetic checkpoint, the JAX compilation cache) goes into the
    user's own cache (``$KIMI_JAX_CACHE`` or ``~/.cache/kimi-jax``), never a folder the bundle
    names, and the run's own output into a temporary folder. A synthetic preset that writes
    hundreds of GB is replayed only with ``allow_large``."""
    from kimi_jax.run.plan import prepare_run  # the model and JAX: only when replaying
    from kimi_jax.run.runner import execute, joined
    from kimi_jax.storage.remote import is_remote, same_checkpoint

    resolved = b.json("manifest.json")
    if not isinstance(resolved, dict):
        raise CheckFailed("manifest.json: expected a JSON object (the resolved manifest)")
    model = resolved.get("model")
    synthetic = model.get("synthetic") if isinstance(model, dict) else None
    if isinstance(synthetic, dict) and synthetic.get("preset") in LARGE_PRESETS and not allow_large:
        raise CheckFailed(f"not replayed: the bundle's manifest asks for the synthetic {synthetic.get('preset')!r} "
                          f"preset, which writes {LARGE_PRESETS[synthetic.get('preset')]} into your cache; pass "
                          "--allow-large to replay it anyway")  # fmt: skip
    ledger = b.ledger
    with tempfile.TemporaryDirectory(prefix="kimi-jax-replay-") as tmp:
        data = copy.deepcopy(resolved)
        data["output"] = {"dir": str(Path(tmp) / "replay")}
        data["anchor"] = None  # the anchor is checked by check 7; replay compares step 0 in full anyway
        if isinstance(data.get("model"), dict):
            data["model"]["cache_dir"] = str(default_cache_dir())  # never a folder the bundle chose
            recorded = (ledger.get("checkpoint") or {}).get("path")
            if is_remote(data["model"].get("checkpoint")) and same_checkpoint(data["model"]["checkpoint"], recorded):
                data["model"]["checkpoint"] = recorded  # the commit the run read, not where a branch is now
        data.pop("distributed", None)  # a replay is one process: a mesh must fit this machine's devices
        data = _pin_residency(recorded_manifest(data), (ledger.get("run") or {}).get("residency"))
        try:
            plan = prepare_run(parse_manifest_dict(data, source=str(b.root / "manifest.json"),
                                                   base_dir=b.root))  # fmt: skip
        except KimiJaxError as e:
            raise CheckFailed(f"cannot replay: {e} (--replay runs the bundle's manifest against the checkpoint it names, "
                        "which must exist)") from None  # fmt: skip
        try:
            with joined(plan):  # checks the mesh against this machine's devices
                outcome = execute(plan, prove=None, echo=lambda *_: None, progress=False)
        except KimiJaxError as e:
            raise CheckFailed(f"the replay stopped: {e}") from None
    diffs = replay_differences(ledger, outcome.ledger)
    if diffs:
        platform = platform_differences(ledger.get("platform") or {}, outcome.ledger.get("platform") or {})
        where = (f"; the platform differs ({', '.join(platform[:3])})" if platform else "; the platform is identical")
        raise CheckFailed(f"{dequant_difference(ledger, outcome.ledger)}the replay differs from the ledger in "
                          f"{len(diffs)}{'+' if len(diffs) >= 20 else ''} field(s); "
                          f"first: {join_problems(diffs)}{where}")  # fmt: skip
    steps = receipt_verdict(outcome.ledger)["steps"]
    steps = f"{sum(steps)} step(s) of {len(steps)} sequences" if isinstance(steps, list) else f"{steps} step(s)"
    return f"re-ran {steps} against {plan.index.root}; every measured value matches"
