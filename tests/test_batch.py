"""Several sequences decoding together (kimi_jax.model.batch): each sequence's tokens are those of
its prompt run alone, its step 0 is bitwise its lone run's, finished sequences leave the batch, and
a pass reads the union of its rows' experts once."""

from __future__ import annotations

import numpy as np
import pytest

from kimi_jax.ledger.ledger import step_identity
from kimi_jax.model.batch import generate_batch
from kimi_jax.model.engine import Engine
from kimi_jax.storage.checkpoint import open_checkpoint
from kimi_jax.text.decoding import Decoding
from kimi_jax.text.sampling import Sampling

PROMPTS = [[1792, 5, 9], [1792, 300], [7, 8, 9, 10, 11]]  # ragged lengths


@pytest.fixture(scope="module")
def k25(tiny_checkpoints):
    return open_checkpoint(tiny_checkpoints["kimi-k2.5"])


def lone(index, prompt, tokens, decoding=None, **engine_args):
    with Engine(index, **engine_args) as engine:
        return engine.generate(prompt, tokens, kv_cache=True, decoding=decoding)


@pytest.mark.parametrize("matmul", ["widened", "stored"])
def test_each_sequence_is_its_lone_run(k25, matmul):
    with Engine(k25, matmul=matmul) as engine:
        steps, passes = generate_batch(engine, PROMPTS, 5)
    for prompt, got in zip(PROMPTS, steps):
        alone = lone(k25, prompt, 5, matmul=matmul)
        assert [s.token for s in got] == [s.token for s in alone]
        assert step_identity(got[0]) == step_identity(alone[0])  # step 0 is the lone run's, bitwise
        assert [s.bytes_read for s in got] == [s.bytes_read for s in alone]  # a token's own bytes
        assert [s.context for s in got] == [s.context for s in alone]
        for a, b in zip(got[1:], alone[1:]):  # decoded together: the same values up to float32 rounding
            np.testing.assert_allclose(a.logits, b.logits, rtol=0, atol=1e-4 * float(np.abs(b.logits).max()))
            assert [layer.experts for layer in a.layers] == [layer.experts for layer in b.layers]
    # three prompts alone, then four passes of three rows
    assert [p.sequences for p in passes] == [(0,), (1,), (2,)] + [(0, 1, 2)] * 4


def test_a_pass_reads_the_union_of_its_rows_experts_once(k25):
    with Engine(k25) as engine:
        steps, passes = generate_batch(engine, PROMPTS, 3)
    for p in passes[3:]:
        rows = [steps[i][p.index - 3 + 1] for i in p.sequences]
        union_experts = sum(len({e for r in rows for e in sum(r.layers[layer].experts, [])})
                            for layer in range(len(rows[0].layers)) if rows[0].layers[layer].experts is not None)
        assert sum(layer_io.experts_used for layer_io in [p.io]) == union_experts
        assert p.io.used < sum(r.bytes_read for r in rows)  # every non-expert weight once for three tokens
        assert p.io.used == p.io.from_memory + p.io.from_storage + p.io.from_speculation


def test_sampled_sequences_replay_their_seeds_and_leave_when_they_stop(k25):
    sampling = [Sampling(temperature=0.8, seed=s) for s in (1, 2, 3)]
    greedy = lone(k25, PROMPTS[1], 4)
    stop_early = Decoding(stop_tokens=((greedy[1].token, "eos"),))  # sequence 1 stops after two tokens
    decodings = [Decoding(sampling[0]), stop_early, Decoding(sampling[2])]
    with Engine(k25) as engine:
        steps, passes = generate_batch(engine, PROMPTS, 4, decodings)
    assert len(steps[1]) == 2 and [s.token for s in steps[1]] == [s.token for s in greedy[:2]]
    for i in (0, 2):
        assert [s.token for s in steps[i]] == [s.token for s in lone(k25, PROMPTS[i], 4, decodings[i])]
    assert [p.sequences for p in passes[3:]] == [(0, 1, 2), (0, 2), (0, 2)]


def test_a_prompt_in_chunks_picks_the_same_tokens_and_holds_a_chunk_at_a_time(k25):
    prompt = [1792, 5, 9, 300, 7, 8, 9]
    whole = lone(k25, prompt, 4)
    with Engine(k25, prefill_chunk=3) as engine:
        chunked = engine.generate(prompt, 4, kv_cache=True)
    with Engine(k25, prefill_chunk=len(prompt)) as engine:  # a chunk as long as the prompt: one pass
        one_chunk = engine.generate(prompt, 4, kv_cache=True)
    assert [step_identity(s) for s in one_chunk] == [step_identity(s) for s in whole]
    assert [s.token for s in chunked] == [s.token for s in whole]
    np.testing.assert_allclose(chunked[0].logits, whole[0].logits, rtol=0, atol=1e-4 * float(np.abs(whole[0].logits).max()))
    # every position's routing is recorded, in order; each of the 3 passes read each layer's non-expert weights
    assert [layer.experts for layer in chunked[0].layers] == [layer.experts for layer in whole[0].layers]
    bases = sum(lm.base_bytes for lm in k25.layers)
    assert chunked[0].bytes_read - whole[0].bytes_read >= 2 * bases
    assert [s.bytes_read for s in chunked[1:]] == [s.bytes_read for s in whole[1:]]


def test_sequences_join_between_passes_and_leave_when_cancelled(k25):
    """A sequence added while others decode (a longer one: the caches are padded to its capacity)
    still gets its lone run's tokens; a cancelled one leaves the rows; every step's sources add up."""
    from kimi_jax.model.batch import Batch

    with Engine(k25) as engine:
        batch = Batch(engine)
        first, _ = batch.add(PROMPTS[0], 6)
        batch.step()
        second, _ = batch.add(PROMPTS[2], 9)  # joins with a larger cache
        third, _ = batch.add(PROMPTS[1], 6)
        assert batch.live == [first, second, third]
        batch.step()
        batch.cancel(third)
        assert batch.live == [first, second]
        while batch.live:
            batch.step()
    steps = {i: s.steps for i, s in batch.sequences.items()}
    assert [s.token for s in steps[first]] == [s.token for s in lone(k25, PROMPTS[0], 6)]
    assert [s.token for s in steps[second]] == [s.token for s in lone(k25, PROMPTS[2], 9)]
    assert len(steps[third]) == 2 and [s.token for s in steps[third]] == [s.token for s in lone(k25, PROMPTS[1], 2)]
    for record in (r for rs in steps.values() for r in rs):
        assert record.io.used == record.bytes_read == record.io.from_memory + record.io.from_storage
