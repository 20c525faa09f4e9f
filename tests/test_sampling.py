"""Seeded sampling and stop rules: reproducible draws, the filters' meaning, the stop verdicts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kimi_jax.text.decoding import Decoding
from kimi_jax.text.sampling import (
    Sampling,
    sample_token,
    sampled_probability,
    sampling_distribution,
    step_uniform,
    token_probability,
    token_rank,
)

LOGITS = np.log(np.array([0.05, 0.5, 0.3, 0.15], dtype=np.float32))  # probabilities by id


def test_draws_are_counter_based_and_seeded():
    forward = [step_uniform(3, s) for s in range(50)]
    backward = [step_uniform(3, s) for s in reversed(range(50))][::-1]
    assert forward == backward, "a step's draw must not depend on the draws before it"
    assert all(0.0 <= u < 1.0 for u in forward) and len(set(forward)) == 50
    assert forward != [step_uniform(4, s) for s in range(50)]
    # the generator is NumPy's Philox keyed by (seed, step): the 128-bit key's low word is the seed
    want = np.random.Generator(np.random.Philox(key=np.array([3, 17], dtype=np.uint64))).random()
    assert step_uniform(3, 17) == want
    with pytest.raises(ValueError):
        step_uniform(2**64, 0)


def test_sampling_follows_the_distribution():
    """20,000 seeded steps draw each id with its softmax probability (4 sigma bounds)."""
    n = 20_000
    counts = np.bincount([sample_token(LOGITS, Sampling(seed=11), s)[0] for s in range(n)], minlength=4)
    for p, c in zip(np.exp(LOGITS.astype(np.float64)), counts):
        assert abs(c - n * p) < 4 * math.sqrt(n * p * (1 - p)), (counts, p)


def test_filters():
    def kept(**kw):
        ids, q = sampling_distribution(LOGITS, Sampling(**kw))
        return ids.tolist(), q

    assert kept()[0] == [1, 2, 3, 0]
    assert kept(top_k=2)[0] == [1, 2] and np.allclose(kept(top_k=2)[1], [0.5 / 0.8, 0.3 / 0.8])
    assert kept(top_p=0.49)[0] == [1]  # 0.5 alone reaches 0.49
    assert kept(top_p=0.81)[0] == [1, 2, 3]  # 0.5 + 0.3 = 0.8 falls short of 0.81
    assert kept(top_k=2, top_p=0.7)[0] == [1, 2]  # top_p over the renormalised top-k: 0.625 < 0.7
    assert kept(top_k=2, top_p=0.6)[0] == [1]
    assert kept(min_p=0.29)[0] == [1, 2, 3]  # 0.15 >= 0.29 * 0.5
    assert kept(min_p=0.31)[0] == [1, 2]
    ids, q = kept(temperature=0.5)  # p**2, renormalised
    assert np.allclose(q, np.array([0.25, 0.09, 0.0225, 0.0025]) / 0.365)
    assert all(sample_token(LOGITS, Sampling(top_k=1, seed=s), 0)[0] == 1 for s in range(20))


def test_probability_and_rank_of_a_token():
    logits = np.array([1.0, 3.0, 3.0, -2.0], dtype=np.float32)
    assert [token_rank(logits, t) for t in range(4)] == [2, 0, 1, 3]  # ties to the lower id
    assert token_probability(logits, 0) == pytest.approx(math.e / (math.e + 2 * math.e**3 + math.e**-2))
    assert sampled_probability(LOGITS, Sampling(top_k=2), 0) == 0.0
    token, q = sample_token(LOGITS, Sampling(seed=5), 9)
    assert q == pytest.approx(sampled_probability(LOGITS, Sampling(seed=5), token))


class _Bytes:
    """A stand-in tokenizer: id -> bytes, ids >= 100 special."""

    table = {1: b"Hel", 2: b"lo", 3: b" wor", 4: b"ld", 5: b"\xe4\xbd", 6: b"\xa0"}

    def decode(self, tokens, skip_special=False):
        kept = [self.table.get(t, b"") for t in tokens if not (skip_special and t >= 100)]
        return b"".join(kept).decode(errors="replace")


def test_stop_rules():
    decoding = Decoding(None, ((100, "eos"), (101, "end_of_turn")), ("o wo", "你"), _Bytes())
    assert decoding.stop_reason([]) is None
    assert decoding.stop_reason([1, 2]) is None
    assert decoding.stop_reason([1, 2, 3]) == {"reason": "stop_string", "string": "o wo"}
    assert decoding.stop_reason([1, 100]) == {"reason": "eos", "token": 100}
    assert decoding.stop_reason([101]) == {"reason": "end_of_turn", "token": 101}
    assert decoding.stop_reason([5]) is None  # half a character
    assert decoding.stop_reason([5, 6]) == {"reason": "stop_string", "string": "你"}
    assert decoding.final_reason([1, 2]) == {"reason": "max_new_tokens"}
    assert Decoding().choose(0, np.array([0.5, 2.0, 2.0], np.float32)) == 1
