"""Lossless speculative decoding: drafted tokens verified in one pass over the weights.

A draft comes from prompt lookup (:func:`prompt_lookup`): the tokens that followed the most recent
earlier occurrence of the context's last n-gram, which needs no second model and works for every
checkpoint; or, where the checkpoint ships one, from its multi-token-prediction layer
(:class:`~kimi_jax.model.mtp.MTPDrafter`), which sees the main model's hidden states. A verification pass runs the last token and the drafts as the rows of one forward pass
with the KV cache (every layer's weights once, each MoE layer reading the union of the rows'
experts once) and gives the logits after each of them.

Row i's token is chosen exactly as plain decoding chooses it at that step (``Decoding.choose``:
the argmax, or the seeded draw of that step, whose uniform depends only on the seed and the step);
drafts are accepted while they equal it, and the first row that differs gives the next token. So
the tokens are those of plain decoding, greedy or sampled with the same seed, and a seeded run
replays exactly. For sampling this is the speculative-sampling rule for a draft that is one token
with certainty: the draft is accepted with probability p(draft) (the seeded draw lands on it), and
otherwise the token is distributed as p without the draft, renormalised (the draw lands elsewhere).

Only the logits differ from plain decoding, by float32 rounding: a row computed with others.
The anchor (step 0, the prompt) is never drafted. Each accepted token's step keeps the bytes *its*
token used (its lone decode step's); each :class:`Verification` keeps what the pass read.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Protocol

import numpy as np

from kimi_jax.model.batch import PassRecord, own_bytes, share, shared_pass
from kimi_jax.records import ByteCounts, StepRecord


@dataclasses.dataclass(frozen=True)
class DraftCost:
    """What drafting one pass's tokens cost when it reads weights (a multi-token-prediction layer):
    its passes over that layer, their bytes and seconds."""

    passes: int
    io: ByteCounts
    wall_s: float


@dataclasses.dataclass(frozen=True)
class Verification:
    """One pass that verified ``drafted`` tokens after step ``step``'s context: ``accepted`` of them
    were the tokens decoding chose, then one more token came from the pass."""

    step: int  # the first step the pass produced
    drafted: tuple[int, ...]
    accepted: int
    io: ByteCounts
    wall_s: float
    draft_cost: DraftCost | None = None  # None: the drafts cost no weights (prompt lookup)


class Drafter(Protocol):
    """Where drafts come from. ``observe`` gets the main model's hidden states at verified positions
    (only when ``wants_rows``) and the token that followed each; ``propose`` drafts up to n tokens."""

    wants_rows: bool

    def observe(self, start: int, hidden: np.ndarray, next_tokens: list[int]) -> None: ...

    def propose(self, context: list[int], n: int) -> tuple[list[int], DraftCost | None]: ...


class Lookup:
    """Drafts from a function of the context alone (``prompt_lookup``, or a benchmark's)."""

    wants_rows = False

    def __init__(self, draft: Callable[[list[int], int], list[int]]):
        self.draft = draft

    def observe(self, start: int, hidden: np.ndarray, next_tokens: list[int]) -> None:
        pass

    def propose(self, context: list[int], n: int) -> tuple[list[int], None]:
        return self.draft(context, n), None


def prompt_lookup(context: list[int], drafts: int, longest: int = 3) -> list[int]:
    """Up to ``drafts`` tokens that followed the most recent earlier occurrence of the context's last
    n-gram, trying n = ``longest`` down to 1; [] when none recurs."""
    for n in range(min(longest, len(context) - 1), 0, -1):
        tail = context[-n:]
        for start in range(len(context) - n - 1, -1, -1):
            if context[start : start + n] == tail:
                follow = context[start + n : start + n + drafts]
                if follow:
                    return follow
    return []


def generate_with_drafts(engine, prompt: list[int], max_new_tokens: int, drafts: int, decoding=None,
                         on_step: Callable[[StepRecord], None] | None = None,
                         draft: Callable[[list[int], int], list[int]] | Drafter = prompt_lookup,
                         max_passes: int | None = None) -> tuple[list[StepRecord], list[Verification]]:  # fmt: skip
    """Decode up to ``max_new_tokens`` tokens of ``prompt`` with the KV cache, verifying up to
    ``drafts`` drafted tokens per pass (``draft``: a :class:`Drafter`, or a function ``draft(context,
    n)``; prompt lookup by default); returns (the steps, the verification passes). ``max_passes``
    stops after that many verification passes (benchmarks measuring passes)."""
    drafter = draft if hasattr(draft, "propose") else Lookup(draft)
    caches = engine.empty_caches(len(prompt), max_new_tokens)  # the lone run's: its step 0, bitwise
    rows: list | None = [] if drafter.wants_rows else None
    record, caches = engine.step(0, list(prompt), False, caches, None, decoding, rows=rows)
    if rows is not None:
        drafter.observe(0, np.concatenate(rows), [*prompt[1:], record.token])
    steps, passes = [record], []
    if on_step:
        on_step(record)

    def stopped() -> bool:
        return decoding is not None and bool(decoding.stop_reason([s.token for s in steps]))

    while len(steps) < max_new_tokens and not stopped() and (max_passes is None or len(passes) < max_passes):
        context = list(prompt) + [s.token for s in steps]
        proposed, cost = drafter.propose(context, min(drafts, max_new_tokens - len(steps) - 1))
        made, caches, verification = _verify(engine, context, proposed, caches, decoding, len(steps), cost)
        if drafter.wants_rows:
            drafter.observe(len(context) - 1, np.stack([s.hidden for s in made]), [s.token for s in made])
        for s in made:
            steps.append(s)
            if on_step:
                on_step(s)
            if stopped():
                break
        passes.append(verification)
    return steps, passes


def _verify(engine, context: list[int], proposed: list[int], caches: list, decoding, step: int,
            draft_cost: DraftCost | None = None):  # fmt: skip
    """The last token and the drafts as the rows of one pass; the steps they give (the accepted drafts
    and one more), the caches, and the pass's record (with what drafting them cost)."""
    tokens = [context[-1], *proposed]
    done = shared_pass(engine, tokens, np.arange(len(context) - 1, len(context) - 1 + len(tokens)), caches,
                       every_row=True)  # fmt: skip
    hidden, logits, outputs, caches = done.hidden, done.logits, done.outputs, done.caches
    by_layer, io, counters, wall_s = done.by_layer, done.io, done.counters, done.wall_s
    routing = [out.routing for out in outputs]
    made, ctx = [], list(context)
    for row in range(len(tokens)):
        index = step + row
        token = int(np.argmax(logits[row])) if decoding is None else decoding.choose(index, logits[row])
        per_layer, used = own_bytes(engine.index, routing, row)
        # a row's sources are its share of the pass's, layer by layer, so they add up (as in a batch)
        layer_records = [engine.layer_record(layer, out, share(per_layer[layer], by_layer.get(layer, ByteCounts())),
                                             None, row=row)
                         for layer, out in enumerate(outputs)]  # fmt: skip
        made.append(StepRecord(
            index=index, context=list(ctx), token=token, logit=float(logits[row][token]), logits=logits[row],
            hidden=hidden[row], layers=layer_records, bytes_read=used, bytes_per_layer=per_layer, wall_s=wall_s,
            storage=counters.content(), io=share(used, io),
        ))  # fmt: skip
        ctx.append(token)
        if row == len(proposed) or token != proposed[row]:
            break  # the draft after this row was not the token chosen here (or there are no more)
    return made, caches, Verification(step, tuple(proposed), len(made) - 1, io, wall_s, draft_cost)


def passes_of(steps: list[StepRecord], verifications: list[Verification]) -> list[PassRecord]:
    """The passes over the weights that made ``steps``: step 0 alone, then each verification pass,
    which made its accepted drafts and one more token (fewer when a stop rule ended the run)."""
    passes = [PassRecord(0, (0,), steps[0].io, steps[0].wall_s)]
    for n, v in enumerate(verifications):
        end = verifications[n + 1].step if n + 1 < len(verifications) else len(steps)
        passes.append(PassRecord(n + 1, (0,) * (end - v.step), v.io, v.wall_s, v.drafted, v.draft_cost))
    return passes


__all__ = ["DraftCost", "Verification", "Drafter", "Lookup", "prompt_lookup", "generate_with_drafts", "passes_of"]
