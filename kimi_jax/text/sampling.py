"""Choosing the next token from the logits: greedy, or seeded sampling that anyone can redo.

Everything runs on the host in float64 NumPy over the stored float32 logits, outside the layer
programs, so capture and the non-perturbation proof are untouched, and verify (which never
imports JAX) recomputes each choice from a bundle's stored logits.

Sampling (:func:`sample_token`), with ids ordered by logit (ties to the lower id):

1. ``w = exp((z - z_max) / temperature)`` over the whole vocabulary;
2. ``top_k`` > 0 keeps the k best ids;
3. ``top_p`` < 1 keeps the shortest prefix of those whose renormalised probabilities reach top_p;
4. ``min_p`` > 0 keeps the ids with ``w >= min_p`` (probability at least min_p times the best's);
5. the kept weights are renormalised to q and the id at which the running sum of q first exceeds
   ``u`` is chosen, u being the first double of NumPy's Philox4x64 generator keyed by
   ``seed + 2**64 * step`` (counter 0).

The generator is counter-based: step n's draw depends only on (seed, n), never on earlier draws,
so a resumed run, a replay and verify all draw the same u.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

SEED_LIMIT = 2**64


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    seed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def logit_order(logits: np.ndarray) -> np.ndarray:
    """Token ids by logit, largest first, ties to the lower id."""
    logits = np.asarray(logits, dtype=np.float32)
    return np.lexsort((np.arange(logits.size), -logits.astype(np.float64)))


def token_rank(logits: np.ndarray, token: int) -> int:
    """How many ids :func:`logit_order` puts before ``token`` (0: the greedy choice)."""
    logits = np.asarray(logits, dtype=np.float32)
    value = logits[token]
    return int(np.count_nonzero(logits > value) + np.count_nonzero(logits[:token] == value))


def token_probability(logits: np.ndarray, token: int) -> float:
    """softmax(logits)[token], in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max()
    return float(np.exp(z[token]) / np.exp(z).sum())


def greedy_token(logits: np.ndarray) -> int:
    return int(np.argmax(logits))  # the first maximum: ties go to the lowest id


def sampling_distribution(logits: np.ndarray, sampling: Sampling) -> tuple[np.ndarray, np.ndarray]:
    """(kept ids best first, their probabilities q) after temperature, top_k, top_p and min_p."""
    order = logit_order(logits)
    z = np.asarray(logits, dtype=np.float64)[order]
    w = np.exp((z - z[0]) / sampling.temperature)
    keep = w.size
    if sampling.top_k > 0:
        keep = min(keep, sampling.top_k)
    if sampling.top_p < 1.0:
        reached = np.cumsum(w[:keep] / w[:keep].sum())
        keep = min(keep, int(np.searchsorted(reached, sampling.top_p, side="left")) + 1)
    if sampling.min_p > 0.0:
        keep = min(keep, max(1, int(np.count_nonzero(w[:keep] >= sampling.min_p))))
    return order[:keep], w[:keep] / w[:keep].sum()


def step_uniform(seed: int, step: int) -> float:
    """The uniform draw in [0, 1) of step ``step`` of a run seeded with ``seed``."""
    if not 0 <= seed < SEED_LIMIT or step < 0:
        raise ValueError(f"seed must be in [0, 2**64) and step >= 0, got seed {seed}, step {step}")
    return float(np.random.Generator(np.random.Philox(key=seed + SEED_LIMIT * step)).random())


def sample_token(logits: np.ndarray, sampling: Sampling, step: int) -> tuple[int, float]:
    """(token, its probability q under the sampling distribution) for step ``step``."""
    ids, q = sampling_distribution(logits, sampling)
    at = int(np.searchsorted(np.cumsum(q), step_uniform(sampling.seed, step), side="right"))
    at = min(at, ids.size - 1)  # a running sum that ends a rounding error below 1
    return int(ids[at]), float(q[at])


def sampled_probability(logits: np.ndarray, sampling: Sampling, token: int) -> float:
    """q of ``token`` under the sampling distribution (0 when the filters drop it)."""
    ids, q = sampling_distribution(logits, sampling)
    where = np.flatnonzero(ids == token)
    return float(q[where[0]]) if where.size else 0.0
