"""Several sequences decoding together: one pass over the weights serves every live sequence.

Each sequence's prompt runs as its own step 0, exactly as in a run of that prompt alone (the same
programs on the same values: its anchor step is its lone run's). Then every pass decodes one token
of each live sequence: the rows of one activation matrix, each attending over its own latent cache
(:class:`~kimi_jax.model.layers.BatchedLatentCache`), so every layer's weights are staged once per
pass and a MoE layer reads the union of the experts its rows picked, once. A sequence that stops
(its decoding's stop rules, or the token budget) leaves the batch.

Bytes are counted twice over, for two questions. Each sequence's step records the bytes *its* token
used (its embedding row, every layer's non-expert weights, its own distinct experts, the head),
which is what its lone run records: anchors and proofs compare it. Each :class:`PassRecord` records
what the pass used and where it came from (the union of the experts, every weight once): the
machine's traffic, shared among the pass's sequences.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import numpy as np

from kimi_jax.model.layers import BatchedLatentCache, LatentCache
from kimi_jax.model.jax_setup import long_lived_frozen
from kimi_jax.records import ByteCounts, StepRecord


@dataclasses.dataclass(frozen=True)
class PassRecord:
    """One pass over the weights: which sequences it served (by index) and what it used and read."""

    index: int
    sequences: tuple[int, ...]
    io: ByteCounts  # the pass's bytes: used once, whatever number of sequences shared them
    wall_s: float


@dataclasses.dataclass
class _Sequence:
    index: int
    prompt: list[int]
    decoding: object | None
    steps: list[StepRecord] = dataclasses.field(default_factory=list)
    caches: list[LatentCache] | None = None

    @property
    def context(self) -> list[int]:
        return self.prompt + [s.token for s in self.steps]

    def finished(self, max_new_tokens: int) -> bool:
        if len(self.steps) >= max_new_tokens:
            return True
        return self.decoding is not None and bool(self.decoding.stop_reason([s.token for s in self.steps]))


def generate_batch(engine, prompts: list[list[int]], max_new_tokens: int, decodings: list | None = None,
                   on_step: Callable[[int, StepRecord], None] | None = None,
                   on_pass: Callable[[PassRecord], None] | None = None) -> tuple[list[list[StepRecord]], list[PassRecord]]:  # fmt: skip
    """Decode up to ``max_new_tokens`` tokens of each prompt with the KV cache (``engine``: an
    :class:`~kimi_jax.model.engine.Engine`); returns (each sequence's steps, the passes).

    ``decodings[i]`` chooses sequence i's tokens and says when it stops (None: greedy for exactly
    ``max_new_tokens`` tokens); ``on_step(i, record)`` is called after each of sequence i's steps,
    ``on_pass(record)`` after each pass."""
    seqs = [_Sequence(i, list(p), (decodings or [None] * len(prompts))[i]) for i, p in enumerate(prompts)]
    passes: list[PassRecord] = []

    def done_step(seq: _Sequence, record: StepRecord) -> None:
        seq.steps.append(record)
        if on_step:
            on_step(seq.index, record)

    def done_pass(record: PassRecord) -> None:
        passes.append(record)
        if on_pass:
            on_pass(record)

    with long_lived_frozen() as freeze:
        for seq in seqs:  # step 0: each prompt alone, as in its lone run
            caches = engine.empty_caches(len(seq.prompt), max_new_tokens)
            record, seq.caches = engine.step(0, seq.context, False, caches, None, seq.decoding)
            done_step(seq, record)
            done_pass(PassRecord(len(passes), (seq.index,), record.io, record.wall_s))
        live = [s for s in seqs if not s.finished(max_new_tokens)]
        caches = [BatchedLatentCache.stack([s.caches[layer] for s in live]) for layer in range(engine.cfg.num_hidden_layers)]
        while live:
            freeze()
            records, caches, io, wall_s = _decode_pass(engine, live, caches)
            for seq, record in zip(live, records):
                done_step(seq, record)
            done_pass(PassRecord(len(passes), tuple(s.index for s in live), io, wall_s))
            keep = [b for b, s in enumerate(live) if not s.finished(max_new_tokens)]
            if len(keep) < len(live):
                caches = [c.rows(keep) for c in caches] if keep else caches
                live = [live[b] for b in keep]
    return [s.steps for s in seqs], passes


def own_bytes(index, layer_routing: list, row: int) -> tuple[dict, int]:
    """The bytes row ``row``'s token used, by layer (None: its embedding row and the head), as its
    lone run counts them: every layer's non-expert weights and its own distinct experts."""
    per_layer: dict = {None: index.embed_row_bytes() + sum(w.nbytes for w in index.head.values())}
    for layer, (lm, routing) in enumerate(zip(index.layers, layer_routing)):
        picked = [] if routing is None else sorted({int(e) for e in np.asarray(routing.idx)[row]})
        per_layer[layer] = lm.base_bytes + sum(lm.expert_bytes(e) for e in picked)
    return per_layer, sum(per_layer.values())


def _decode_pass(engine, live: list[_Sequence], caches: list[BatchedLatentCache]):
    """One token of each live sequence, as the rows of one forward pass."""
    started = time.perf_counter()
    engine.source.begin_step()
    contexts = [s.context for s in live]
    tokens = [c[-1] for c in contexts]
    positions = np.array([len(c) - 1 for c in contexts])
    hidden, logits, outputs, caches = engine.forward(tokens, positions, caches)
    by_layer, _, counters = engine.source.end_step(tokens)
    io = ByteCounts()
    for counts in by_layer.values():
        io = io.add(counts)
    wall_s = time.perf_counter() - started
    routing = [out.routing for out in outputs]
    records = []
    for b, (seq, context) in enumerate(zip(live, contexts)):
        per_layer, used = own_bytes(engine.index, routing, b)
        layer_records = [engine.layer_record(layer, out, ByteCounts(used=per_layer[layer]), None, row=b)
                         for layer, out in enumerate(outputs)]  # fmt: skip
        step = len(seq.steps)
        token = int(np.argmax(logits[b])) if seq.decoding is None else seq.decoding.choose(step, logits[b])
        records.append(StepRecord(
            index=step, context=context, token=token, logit=float(logits[b][token]), logits=logits[b],
            hidden=hidden[b], layers=layer_records, bytes_read=used, bytes_per_layer=per_layer, wall_s=wall_s,
            storage=counters.content(), io=ByteCounts(used=used),
        ))  # fmt: skip
    return records, caches, io, wall_s


__all__ = ["PassRecord", "generate_batch", "own_bytes"]
