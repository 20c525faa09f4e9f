"""Several sequences decoding together: one pass over the weights serves every live sequence.

Each sequence's prompt runs as its own step 0, exactly as in a run of that prompt alone (the same
programs on the same values: its anchor step is its lone run's). Then every pass decodes one token
of each live sequence: the rows of one activation matrix, each attending over its own latent cache
(:class:`~kimi_jax.model.layers.BatchedLatentCache`), so every layer's weights are staged once per
pass and a MoE layer reads the union of the experts its rows picked, once. A sequence that stops
(its decoding's stop rules, or the token budget) leaves the batch.

Bytes are counted twice over, for two questions. Each sequence's step records the bytes *its* token
used (its embedding row, every layer's non-expert weights, its own distinct experts, the head),
which is what its lone run records: anchors and proofs compare it; their sources are the pass's,
shared in proportion (:func:`share`). Each :class:`PassRecord` records what the pass used and where
it came from (the union of the experts, every weight once): the machine's traffic, shared among
the pass's sequences.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Any, Callable

import numpy as np

from kimi_jax.model.layers import BatchedLatentCache
from kimi_jax.model.jax_setup import long_lived_frozen
from kimi_jax.records import ByteCounts, StepRecord


@dataclasses.dataclass(frozen=True)
class PassRecord:
    """One pass over the weights: which sequences it served (by index) and what it used and read."""

    index: int
    sequences: tuple[int, ...]  # a sequence once per token the pass made of it (drafts: several)
    io: ByteCounts  # the pass's bytes: used once, whatever number of sequences shared them
    wall_s: float
    drafted: tuple[int, ...] | None = None  # a verification pass's drafted tokens (kimi_jax.model.drafts)
    draft_cost: Any = None  # what drafting them cost (kimi_jax.model.drafts.DraftCost), when it read weights


@dataclasses.dataclass
class _Sequence:
    index: int
    prompt: list[int]
    decoding: object | None
    max_new_tokens: int
    steps: list[StepRecord] = dataclasses.field(default_factory=list)

    @property
    def context(self) -> list[int]:
        return self.prompt + [s.token for s in self.steps]

    @property
    def finished(self) -> bool:
        if len(self.steps) >= self.max_new_tokens:
            return True
        return self.decoding is not None and bool(self.decoding.stop_reason([s.token for s in self.steps]))


@dataclasses.dataclass
class BatchState:
    """What a batch has done, enough to go on after a restart: each sequence's steps (sequences
    0..n-1, in the order they were added), the live sequences in row order, their caches (one
    :class:`BatchedLatentCache` per layer) and the passes so far."""

    steps: list[list[StepRecord]]
    live: list[int]
    caches: list[BatchedLatentCache] | None
    passes: list[PassRecord]


class Batch:
    """Sequences decoding together on one engine; a sequence joins or leaves between passes.

    :meth:`add` runs a prompt's step 0 (alone, as its lone run) and, unless it already stopped, joins
    it to the decoding rows; :meth:`step` runs one pass that decodes a token of every live sequence;
    :meth:`cancel` takes a sequence out. Not thread-safe: one thread drives it."""

    def __init__(self, engine):
        self.engine = engine
        self.sequences: dict[int, _Sequence] = {}
        self.passes: list[PassRecord] = []
        self._live: list[_Sequence] = []  # in row order
        self._caches: list[BatchedLatentCache] | None = None  # per layer, one row per live sequence
        self._numbers = itertools.count()  # indices are never reused, even after :meth:`release`

    @property
    def live(self) -> list[int]:
        """The sequences still decoding, in row order."""
        return [s.index for s in self._live]

    def add(self, prompt: list[int], max_new_tokens: int, decoding=None) -> tuple[int, StepRecord]:
        """Run ``prompt``'s step 0 and join it to the batch; returns (its index, the step)."""
        seq = _Sequence(next(self._numbers), list(prompt), decoding, max_new_tokens)
        self.sequences[seq.index] = seq
        caches = self.engine.empty_caches(len(prompt), max_new_tokens)
        record, caches = self.engine.step(0, seq.context, False, caches, None, decoding)
        seq.steps.append(record)
        self.passes.append(PassRecord(len(self.passes), (seq.index,), record.io, record.wall_s))
        if not seq.finished:
            self._join([seq], [BatchedLatentCache.stack([c]) for c in caches])
        return seq.index, record

    def state(self) -> BatchState:
        return BatchState([self.sequences[i].steps for i in sorted(self.sequences)], self.live, self._caches,
                          list(self.passes))  # fmt: skip

    def restore(self, state: BatchState, prompts: list[list[int]], max_new_tokens: int, decodings: list) -> None:
        """Take up ``state`` (saved by a batch of the same prompts, :meth:`state`): its sequences are
        the first ``len(state.steps)`` prompts."""
        for i, steps in enumerate(state.steps):
            seq = _Sequence(next(self._numbers), list(prompts[i]), decodings[i], max_new_tokens, list(steps))
            self.sequences[seq.index] = seq
        self._live = [self.sequences[i] for i in state.live]
        self._caches = state.caches if self._live else None
        self.passes = list(state.passes)

    def add_together(self, tokens: list[int], max_new_tokens: int) -> list[tuple[int, StepRecord]]:
        """One-token prompts whose step 0 runs as the rows of one pass, then joins the batch (greedy).
        Each step 0 is computed beside the others, so it is not bitwise its lone run's: the
        benchmarks use it to start a large batch in one pass instead of one pass per prompt."""
        seqs = [_Sequence(next(self._numbers), [t], None, max_new_tokens) for t in tokens]
        empty = self.engine.empty_caches(1, max_new_tokens)
        caches = [BatchedLatentCache.stack([c] * len(seqs)) for c in empty]
        records, caches, io, wall_s = _decode_pass(self.engine, seqs, caches)
        for seq, record in zip(seqs, records):
            self.sequences[seq.index] = seq
            seq.steps.append(record)
        self.passes.append(PassRecord(len(self.passes), tuple(s.index for s in seqs), io, wall_s))
        keep = [k for k, s in enumerate(seqs) if not s.finished]
        if keep:
            self._join([seqs[k] for k in keep], [c.rows(keep) for c in caches])
        return [(s.index, r) for s, r in zip(seqs, records)]

    def step(self) -> list[tuple[int, StepRecord]]:
        """One pass: a token of every live sequence; the finished ones leave. Returns (index, step) pairs."""
        if not self._live:
            return []
        records, self._caches, io, wall_s = _decode_pass(self.engine, self._live, self._caches)
        made = []
        for seq, record in zip(self._live, records):
            seq.steps.append(record)
            made.append((seq.index, record))
        self.passes.append(PassRecord(len(self.passes), tuple(s.index for s in self._live), io, wall_s))
        self._keep([s for s in self._live if not s.finished])
        return made

    def cancel(self, index: int) -> None:
        """Take sequence ``index`` out of the batch (its steps so far are kept)."""
        self._keep([s for s in self._live if s.index != index])

    def release(self, index: int) -> list[StepRecord]:
        """Take sequence ``index`` out of the batch and forget it; returns its steps. A long-lived
        batch (the server's) releases every sequence it is done with, or it keeps them all."""
        self.cancel(index)
        return self.sequences.pop(index).steps

    def _join(self, seqs: list[_Sequence], rows: list[BatchedLatentCache]) -> None:
        """``seqs`` join the decoding rows, after those already there, with their caches ``rows``."""
        self._caches = rows if self._caches is None else [a.join(b) for a, b in zip(self._caches, rows)]
        self._live.extend(seqs)

    def _keep(self, keep: list[_Sequence]) -> None:
        if len(keep) == len(self._live):
            return
        rows = [self._live.index(s) for s in keep]
        self._caches = [c.rows(rows) for c in self._caches] if keep else None
        self._live = keep


def generate_batch(engine, prompts: list[list[int]], max_new_tokens: int, decodings: list | None = None,
                   on_step: Callable[[int, StepRecord], None] | None = None,
                   on_pass: Callable[["Batch", list[tuple[int, StepRecord]]], None] | None = None,
                   resume: BatchState | None = None) -> tuple[list[list[StepRecord]], list[PassRecord]]:  # fmt: skip
    """Decode up to ``max_new_tokens`` tokens of each prompt with the KV cache (``engine``: an
    :class:`~kimi_jax.model.engine.Engine`); returns (each sequence's steps, the passes).

    ``decodings[i]`` chooses sequence i's tokens and says when it stops (None: greedy for exactly
    ``max_new_tokens`` tokens); ``on_step(i, record)`` is called after each of sequence i's steps,
    ``on_pass(batch, [(i, record)...])`` after each pass with the steps it made. ``resume``: go on
    from a saved :class:`BatchState` of the same prompts."""
    batch = Batch(engine)
    decodings = decodings or [None] * len(prompts)
    if resume is not None:
        batch.restore(resume, prompts, max_new_tokens, decodings)

    def made(steps: list[tuple[int, StepRecord]]) -> None:
        for index, record in steps:
            if on_step:
                on_step(index, record)
        if on_pass:
            on_pass(batch, steps)

    with long_lived_frozen() as freeze:
        for prompt, decoding in list(zip(prompts, decodings))[len(batch.sequences):]:
            made([batch.add(prompt, max_new_tokens, decoding)])
        while batch.live:
            freeze()
            made(batch.step())
    return [batch.sequences[i].steps for i in range(len(prompts))], batch.passes


def own_bytes(index, layer_routing: list, row: int) -> tuple[dict, int]:
    """The bytes row ``row``'s token used, by layer (None: its embedding row and the head), as its
    lone run counts them: every layer's non-expert weights and its own distinct experts."""
    per_layer: dict = {None: index.embed_row_bytes() + sum(w.nbytes for w in index.head.values())}
    for layer, (lm, routing) in enumerate(zip(index.layers, layer_routing)):
        picked = [] if routing is None else sorted({int(e) for e in np.asarray(routing.idx)[row]})
        per_layer[layer] = lm.base_bytes + sum(lm.expert_bytes(e) for e in picked)
    return per_layer, sum(per_layer.values())


def share(used: int, whole: ByteCounts) -> ByteCounts:
    """A token's part of a shared pass's sources: its own bytes ``used``, split between memory and
    storage in the pass's proportions (what was read ahead, mispredicted or preloaded is the
    pass's alone), so a step's sources still add up to its bytes."""
    storage = used * whole.from_storage // whole.used if whole.used else 0
    return ByteCounts(used=used, from_storage=storage, from_memory=used - storage)


@dataclasses.dataclass(frozen=True)
class SharedPass:
    """What one forward pass of several rows gave: each row's hidden state and logits, the layers'
    outputs, the caches after it, its bytes by layer and in all, the read counters, its wall time."""

    hidden: Any
    logits: Any
    outputs: list
    caches: Any
    by_layer: dict
    io: ByteCounts
    counters: Any
    wall_s: float


def shared_pass(engine, tokens: list[int], positions: np.ndarray, caches, **forward_args) -> SharedPass:
    """``tokens`` as the rows of one forward pass at ``positions`` (a batch's next tokens, or a
    token and its drafts), counted as one step of the weight source."""
    started = time.perf_counter()
    engine.source.begin_step()
    hidden, logits, outputs, caches = engine.forward(tokens, positions, caches, **forward_args)
    by_layer, _, counters = engine.source.end_step(tokens)
    return SharedPass(hidden, logits, outputs, caches, by_layer, ByteCounts.total(by_layer.values()), counters,
                      time.perf_counter() - started)  # fmt: skip


def _decode_pass(engine, live: list[_Sequence], caches: list[BatchedLatentCache]):
    """One token of each live sequence, as the rows of one forward pass."""
    contexts = [s.context for s in live]
    tokens = [c[-1] for c in contexts]
    done = shared_pass(engine, tokens, np.array([len(c) - 1 for c in contexts]), caches)
    hidden, logits, outputs, caches = done.hidden, done.logits, done.outputs, done.caches
    by_layer, io, counters, wall_s = done.by_layer, done.io, done.counters, done.wall_s
    routing = [out.routing for out in outputs]
    records = []
    for b, (seq, context) in enumerate(zip(live, contexts)):
        per_layer, used = own_bytes(engine.index, routing, b)
        # each part of the token's bytes takes its sources in the proportions of the pass's same part,
        # and the step's are the sum of its parts': a bundle's sources add up layer by layer and per step
        shares = {k: share(n, by_layer.get(k, io)) for k, n in per_layer.items()}
        layer_records = [engine.layer_record(layer, out, shares[layer], None, row=b)
                         for layer, out in enumerate(outputs)]  # fmt: skip
        own_io = ByteCounts.total(shares.values())
        step = len(seq.steps)
        token = int(np.argmax(logits[b])) if seq.decoding is None else seq.decoding.choose(step, logits[b])
        records.append(StepRecord(
            index=step, context=context, token=token, logit=float(logits[b][token]), logits=logits[b],
            hidden=hidden[b], layers=layer_records, bytes_read=used, bytes_per_layer=per_layer, wall_s=wall_s,
            storage=counters.content(), io=own_io,
        ))  # fmt: skip
    return records, caches, io, wall_s


__all__ = ["PassRecord", "BatchState", "Batch", "generate_batch", "SharedPass", "shared_pass", "own_bytes", "share"]
