"""Lossless speculative decoding (kimi_jax.model.drafts): the tokens are plain decoding's, greedy
and seeded sampling, whatever the drafts; step 0 is untouched; accepted drafts save passes."""

from __future__ import annotations

import pytest

from kimi_jax.ledger.ledger import step_identity
from kimi_jax.model.drafts import generate_with_drafts, prompt_lookup
from kimi_jax.model.engine import Engine
from kimi_jax.storage.checkpoint import open_checkpoint
from kimi_jax.text.decoding import Decoding
from kimi_jax.text.sampling import Sampling

PROMPT = [1792, 5, 9, 5]
TOKENS = 8


@pytest.fixture(scope="module")
def k25(tiny_checkpoints):
    return open_checkpoint(tiny_checkpoints["kimi-k2.5"])


@pytest.fixture(scope="module")
def plain(k25):
    runs = {}
    for name, decoding in (("greedy", None), ("sampled", Decoding(Sampling(temperature=0.9, seed=7)))):
        with Engine(k25) as engine:
            runs[name] = (decoding, engine.generate(PROMPT, TOKENS, kv_cache=True, decoding=decoding))
    return runs


def test_prompt_lookup_drafts_what_followed_the_last_ngram():
    assert prompt_lookup([1, 2, 3, 9, 1, 2], 3) == [3, 9, 1]  # the 2-gram [1, 2] recurs: what followed it
    assert prompt_lookup([4, 5, 6, 5], 2) == [6, 5]  # only the 1-gram [5]
    assert prompt_lookup([1, 2, 3], 4) == []  # nothing recurs


@pytest.mark.parametrize("mode", ["greedy", "sampled"])
@pytest.mark.parametrize("drafter", ["oracle", "wrong", "lookup"])
def test_tokens_are_plain_decodings_whatever_the_drafts(k25, plain, mode, drafter):
    decoding, reference = plain[mode]
    want = [s.token for s in reference]
    drafts = {"oracle": lambda ctx, n: want[len(ctx) - len(PROMPT):][:n],  # exactly what decoding picks
              "wrong": lambda ctx, n: [(t + 1) % 2048 for t in want[len(ctx) - len(PROMPT):][:n]],
              "lookup": prompt_lookup}[drafter]  # fmt: skip
    with Engine(k25) as engine:
        steps, passes = generate_with_drafts(engine, PROMPT, TOKENS, 3, decoding, draft=drafts)
    assert [s.token for s in steps] == want
    assert step_identity(steps[0]) == step_identity(reference[0])  # the anchor step is untouched
    assert [s.bytes_read for s in steps] == [s.bytes_read for s in reference]  # each token's own bytes
    assert sum(p.accepted + 1 for p in passes) == TOKENS - 1
    if drafter == "oracle":  # every draft taken: 7 tokens in 2 passes (3 drafts + 1, then 2 + 1)
        assert [(len(p.drafted), p.accepted) for p in passes] == [(3, 3), (2, 2)]
    if drafter == "wrong":  # none taken: one token per pass, as plain decoding
        assert all(p.accepted == 0 for p in passes) and len(passes) == TOKENS - 1
