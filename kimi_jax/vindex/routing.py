"""Phase 3 of the vindex: which experts the routers pick, from engine runs or run-bundle ledgers.

A *routing trace* is one sequence's routing decisions: for each MoE layer, one row per token
position with the ``k`` picked expert ids and their normalised weights (summing to 1).

Each position counts once. A step of the engine (or of a ledger) covers the last ``T``
positions of its context: the whole prompt at step 0, then, with a KV cache, only the newest
position, or without one the whole context again (recomputed, identical decisions). So a
trace takes every row of step 0 and the last row of each later step: the decision made when
that position was first processed. A run of P prompt tokens and N new tokens gives P + N - 1
positions (the last generated token is never fed back).

Statistics per layer (and the same per token position, over the sequences that reach it):
selection ``counts`` per expert, usage entropy ``H = -Σ p_e ln p_e`` (nats) of
``p_e = counts_e / Σ counts``, the normalised entropy ``H / ln(n_experts)`` (1 = uniform use),
and the share of the routing weight carried by the ``k`` most-used experts (k =
num_experts_per_tok; most-used by count, ties to the lower id).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import blake3
import numpy as np

from kimi_jax.errors import KimiJaxError
from kimi_jax.fileio import parse_json, read_regular


class LedgerError(KimiJaxError):
    """A run bundle's ledger.json cannot be read as routing records."""


# A trace: {layer: (experts int [N, k], weights float [N, k])}
Trace = dict[int, tuple[np.ndarray, np.ndarray]]


def trace_from_steps(steps: Iterable[Any], moe_layers: Iterable[int] | None = None) -> Trace:
    """Routing trace of one generation from engine ``StepRecord`` objects (see module doc)."""
    rows: dict[int, tuple[list, list]] = {}
    wanted = None if moe_layers is None else set(moe_layers)
    for s_i, step in enumerate(steps):
        for rec in step.layers:
            if rec.kind != "moe" or rec.experts is None or (wanted is not None and rec.layer not in wanted):
                continue
            ex, wt = rows.setdefault(rec.layer, ([], []))
            take = range(len(rec.experts)) if s_i == 0 else [len(rec.experts) - 1]
            for t in take:
                ex.append(list(rec.experts[t]))
                wt.append(list(rec.routing_weights[t]))
    return {layer: (np.asarray(e, dtype=np.int64), np.asarray(w, dtype=np.float64)) for layer, (e, w) in rows.items()}


def trace_to_json(trace: Trace) -> dict[str, Any]:
    return {str(layer): {"experts": e.tolist(), "weights": w.tolist()} for layer, (e, w) in sorted(trace.items())}


def trace_from_json(data: dict[str, Any]) -> Trace:
    return {int(layer): (np.asarray(v["experts"], dtype=np.int64).reshape(len(v["experts"]), -1),
                         np.asarray(v["weights"], dtype=np.float64).reshape(len(v["weights"]), -1))
            for layer, v in data.items()}  # fmt: skip


# -------------------------------------------------------------------------------------- ledgers


def read_ledger(bundle: Path, n_layers: int, n_experts: int) -> Trace:
    """The routing trace recorded in ``bundle/ledger.json`` (``steps[].layers[]`` with ``layer``,
    ``kind``, ``experts`` [T][k] and ``routing_weights`` [T][k]); every problem names the file
    and the JSON path."""
    return ledger_digest_and_trace(bundle, n_layers, n_experts)[1]


def ledger_digest_and_trace(bundle: Path, n_layers: int, n_experts: int) -> tuple[str, Trace]:
    """(BLAKE3 of the ledger.json bytes read, their routing trace): one read, so the digest is of
    what was parsed. The file is a stranger's bundle's: read as verify reads it (a size limit,
    regular files only, bounded nesting, strict JSON)."""
    from kimi_jax.ledger.bundle import MAX_JSON_BYTES

    path = Path(bundle) / "ledger.json"
    if not os.path.lexists(path):
        raise LedgerError(f"{path}: no ledger.json in the run bundle")
    raw = read_regular(path, MAX_JSON_BYTES, "ledger", LedgerError)
    return blake3.blake3(raw).hexdigest(), routing_from_ledger(parse_json(raw, str(path), LedgerError), path, n_layers,
                                                               n_experts)  # fmt: skip


def routing_from_ledger(data: Any, path: Path, n_layers: int, n_experts: int) -> Trace:
    """The routing trace of a parsed ledger (see :func:`read_ledger`)."""

    def bad(where: str, what: str) -> LedgerError:
        return LedgerError(f"{path}: {where}: {what}")

    steps = data.get("steps") if isinstance(data, dict) else None
    if not isinstance(steps, list):
        raise bad("steps", "expected a list of step objects at the top level")
    rows: dict[int, tuple[list, list]] = {}
    for s_i, step in enumerate(steps):
        layers = step.get("layers") if isinstance(step, dict) else None
        if not isinstance(layers, list):
            raise bad(f"steps[{s_i}].layers", "expected a list of layer objects")
        for l_i, rec in enumerate(layers):
            where = f"steps[{s_i}].layers[{l_i}]"
            if not isinstance(rec, dict):
                raise bad(where, "expected an object")
            layer, kind = rec.get("layer"), rec.get("kind")
            if type(layer) is not int or not 0 <= layer < n_layers:
                raise bad(f"{where}.layer", f"expected a layer index in 0..{n_layers - 1}, got {repr(layer)[:40]}")
            if kind != "moe":
                continue
            experts, weights = rec.get("experts"), rec.get("routing_weights")
            if experts is None or weights is None:
                missing = "experts" if experts is None else "routing_weights"
                raise bad(f"{where}.{missing}", "missing: this MoE layer has no routing record (was the run's "
                                                "capture without 'routing'?)")  # fmt: skip
            e_arr = _matrix(experts, f"{where}.experts", bad, integer=True)
            w_arr = _matrix(weights, f"{where}.routing_weights", bad, integer=False)
            if e_arr.shape != w_arr.shape:
                raise bad(where, f"experts {list(e_arr.shape)} and routing_weights {list(w_arr.shape)} differ in shape")
            if e_arr.size and (e_arr.min() < 0 or e_arr.max() >= n_experts):
                raise bad(f"{where}.experts", f"expert ids must be in 0..{n_experts - 1}, found "
                                              f"{int(e_arr.min())}..{int(e_arr.max())}")  # fmt: skip
            ex, wt = rows.setdefault(layer, ([], []))
            take = range(e_arr.shape[0]) if s_i == 0 else range(e_arr.shape[0] - 1, e_arr.shape[0])
            for t in take:
                ex.append(e_arr[t])
                wt.append(w_arr[t])
    return {layer: (np.asarray(e, dtype=np.int64), np.asarray(w, dtype=np.float64)) for layer, (e, w) in rows.items()}


def _matrix(value: Any, where: str, bad, integer: bool) -> np.ndarray:
    if not isinstance(value, list) or not value or not all(isinstance(r, list) for r in value):
        raise bad(where, "expected a non-empty list of rows [T][k]")
    widths = {len(r) for r in value}
    if len(widths) != 1 or 0 in widths:
        raise bad(where, f"rows must all have the same non-zero length, found lengths {sorted(widths)}")
    for r in value:
        for x in r:
            # bounded before numpy sees them: a 400-digit integer overflows int64 and float64 alike
            small = type(x) is int and -(2**53) <= x <= 2**53
            ok = small if integer else small or (type(x) is float and math.isfinite(x))
            if not ok:
                raise bad(where, f"expected {'integer expert ids' if integer else 'finite numbers'}, found "
                                 f"{repr(x)[:40]}")  # fmt: skip
    return np.asarray(value, dtype=np.int64 if integer else np.float64)


# ----------------------------------------------------------------------------------- statistics


def usage_stats(counts: np.ndarray, weight: np.ndarray, k: int) -> dict[str, Any]:
    """Entropy (nats), normalised entropy and top-k weight share of one count/weight vector."""
    n_experts = counts.shape[0]
    total = int(counts.sum())
    if total == 0:
        return {"selections": 0, "entropy": None, "normalised_entropy": None, "top_k_experts": [],
                "top_k_weight_share": None, "experts_used": 0}  # fmt: skip
    p = counts[counts > 0] / total
    entropy = float(-(p * np.log(p)).sum())
    order = np.lexsort((np.arange(n_experts), -counts))[:k]  # by count desc, then id asc
    wsum = float(weight.sum())
    return {
        "selections": total,
        "entropy": entropy,
        "normalised_entropy": entropy / math.log(n_experts) if n_experts > 1 else None,
        "top_k_experts": [int(e) for e in order],
        "top_k_weight_share": float(weight[order].sum()) / wsum if wsum > 0 else None,
        "experts_used": int((counts > 0).sum()),
    }


def layer_routing_stats(traces: Sequence[Trace], layer: int, n_experts: int, k: int) -> dict[str, Any]:
    """Counts and usage statistics of one layer over all traces, overall and per token position."""
    counts = np.zeros(n_experts, dtype=np.int64)
    weight = np.zeros(n_experts, dtype=np.float64)
    pos_counts: dict[int, np.ndarray] = {}
    pos_weight: dict[int, np.ndarray] = {}
    pos_seqs: dict[int, int] = {}
    positions = 0
    for trace in traces:
        if layer not in trace:
            continue
        experts, weights = trace[layer]
        positions += experts.shape[0]
        np.add.at(counts, experts.reshape(-1), 1)
        np.add.at(weight, experts.reshape(-1), weights.reshape(-1))
        for p in range(experts.shape[0]):
            c = pos_counts.setdefault(p, np.zeros(n_experts, dtype=np.int64))
            w = pos_weight.setdefault(p, np.zeros(n_experts, dtype=np.float64))
            np.add.at(c, experts[p], 1)
            np.add.at(w, experts[p], weights[p])
            pos_seqs[p] = pos_seqs.get(p, 0) + 1
    per_position = []
    for p in sorted(pos_counts):
        c = pos_counts[p]
        nz = np.nonzero(c)[0]
        per_position.append({"position": p, "sequences": pos_seqs[p],
                             "counts": [[int(e), int(c[e])] for e in nz],
                             **usage_stats(c, pos_weight[p], k)})  # fmt: skip
    return {
        "positions": positions,
        "sequences": sum(1 for t in traces if layer in t),
        "top_k": k,
        "counts": counts.tolist(),
        "weight_mass": [float(x) for x in weight],
        **usage_stats(counts, weight, k),
        "per_position": per_position,
    }
