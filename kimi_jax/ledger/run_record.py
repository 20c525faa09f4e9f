"""What a run records about how it ran, beside its steps: the page cache, the residency budget, the
mesh, the anchor check, the non-perturbation proof and the run's wall time. Each record takes plain
values; the runner gathers them into one frozen :class:`RunFacts` and
:func:`~kimi_jax.ledger.ledger.build_ledger` puts them in the ledger's ``run``, ``anchor``,
``non_perturbation`` and ``totals`` sections."""

from __future__ import annotations

import dataclasses
from typing import Any

from kimi_jax.errors import KimiJaxError
from kimi_jax.ledger.floats import f32
from kimi_jax.ledger.ledger import step_identity
from kimi_jax.settings import PROOF_SCOPES, PROVE_ALL, PROVE_FIRST
from kimi_jax.storage.residency import ResidencyPlan

__all__ = ["NonPerturbationFailure", "RunFacts", "page_cache_record", "residency_record", "mesh_record",
           "non_perturbation_record", "timing_record"]  # fmt: skip


class NonPerturbationFailure(KimiJaxError):
    """The bare and the instrumented run differ: capture would not be trustworthy."""


@dataclasses.dataclass(frozen=True)
class RunFacts:
    """The records of one run that are not its steps (see the module doc); None where absent."""

    page_cache: dict[str, Any]
    residency: dict[str, Any] | None = None
    mesh: dict[str, Any] | None = None
    anchor: dict[str, Any] | None = None
    proof: dict[str, Any] | None = None
    kernels: dict[str, Any] | None = None  # compute.matmul: kernels: which ran, or why none did
    timing: dict[str, Any] | None = None


def page_cache_record(evicted: bool, resident_bytes: int, shard_bytes: int) -> dict[str, Any]:
    """Whether the shards were dropped from the page cache before the run, how much of them was in it
    when the run started, and their total size."""
    return {"page_cache_evicted": evicted, "page_cache_resident_bytes": resident_bytes, "shard_bytes": shard_bytes}


def residency_record(residency: ResidencyPlan, expert_cache: str, speculate: bool) -> dict[str, Any]:
    """``run.residency``: the budget as resolved and what it keeps."""
    return {"budget_bytes": residency.budget, "resident_layers": len(residency.layers),
            "head_resident": residency.head, "expert_cache_bytes": residency.expert_capacity,
            "expert_cache": expert_cache, "speculate": speculate,
            "page_cache": "drop" if residency.drop_page_cache else "keep"}  # fmt: skip


def mesh_record(expert: int, model: int, placement: str, process_count: int,
                load_bytes_per_process: list[int] | None) -> dict[str, Any]:  # fmt: skip
    """``run.mesh``: the mesh, the processes sharing it, what each read before step 0."""
    return {"expert": expert, "model": model, "placement": placement, "process_count": process_count,
            "load_bytes_per_process": load_bytes_per_process or [0] * process_count}  # fmt: skip


def non_perturbation_record(bare: list, instrumented: list, scope: str = PROVE_FIRST) -> dict[str, Any]:
    """The proof: tokens, digests and bytes of every step the bare run ran (step 0 for scope ``first``,
    every step for ``all``) equal the instrumented run's. Raises :class:`NonPerturbationFailure` (and
    no ledger is written) if not."""
    if scope not in PROOF_SCOPES:
        raise ValueError(f"proof scope {scope!r}: expected one of {PROOF_SCOPES}")
    a = [step_identity(s) for s in bare]
    b = [step_identity(s) for s in instrumented[: len(bare)]]
    if a != b or (scope == PROVE_ALL and len(bare) != len(instrumented)):
        diffs = [f"step {x['step']}: {k} bare {x[k]!r}, instrumented {y[k]!r}"
                 for x, y in zip(a, b) for k in x if x[k] != y[k]] or [f"bare ran {len(a)} steps, instrumented "
                                                                       f"{len(instrumented)}"]  # fmt: skip
        raise NonPerturbationFailure("capture perturbed the run; no ledger written:\n  " + "\n  ".join(diffs))
    return {"scope": scope, "compared": ["token", "hidden_digest", "logits_digest", "bytes_read"], "bare": a,
            "instrumented": b, "identical": True}  # fmt: skip


def timing_record(proof_wall_s: float, run_wall_s: float, bare: list = ()) -> dict[str, Any]:
    """The whole run's wall time beside the steps': the proof's bare pass, and everything from the
    output folder being held to the ledger (both passes, loading, and what came between). With the
    bare pass's steps, also what that pass fetched: it runs first, so on a remote checkpoint with a
    range cache it is the pass that goes to the network, and the recorded steps are served from the
    cache; without these fields the run's network traffic would read as 0."""
    record = {"proof_wall_s": f32(proof_wall_s), "run_wall_s": f32(run_wall_s)}
    if bare:
        record.update({f"proof_{key}": sum(int((s.storage or {}).get(key, 0)) for s in bare)
                       for key in ("bytes_network", "bytes_cache")})  # fmt: skip
    return record
