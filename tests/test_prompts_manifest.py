"""The manifest's ``prompts:``: several prompts in one run, each as ``prompt`` takes it, with its own
seed and stop strings; exclusive with ``prompt``, every mistake named at its file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from kimi_jax.errors import ManifestError
from kimi_jax.manifest import load_manifest
from kimi_jax.run.plan import prepare_run

HEAD = """version: 1
model:
  synthetic: {preset: tiny, layout: kimi-k2.5, seed: 0}
output:
  dir: out
"""
PROMPTS = """prompts:
  - tokens: [1792, 5]
  - text: a short story
    seed: 11
    stop: ["."]
  - chat: [{role: user, content: hi}]
"""
SAMPLED = "generate: {max_new_tokens: 3, sampling: {temperature: 0.8, seed: 7}, stop: [\"\\n\"]}\n"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "m.yaml"
    path.write_text(text)
    return path


def _error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ManifestError) as e:
        prepare_run(load_manifest(_write(tmp_path, text)))
    return str(e.value)


def test_each_prompt_gets_its_ids_seed_and_stop_strings(tmp_path, tiny_checkpoints):
    plan = prepare_run(load_manifest(_write(tmp_path, HEAD + PROMPTS + SAMPLED)))
    tokenizer = plan.tokenizer
    first, second, third = plan.sequences
    assert first.prompt == (1792, 5) and first.prompt_text is None
    assert second.prompt == tuple(tokenizer.encode("a short story")) and second.prompt_text == "a short story"
    assert "hi" in third.prompt_text and len(third.prompt) > 1  # the rendered chat
    assert [s.decoding.sampling.seed for s in plan.sequences] == [7, 11, 7]  # its own seed, else the manifest's
    assert [s.decoding.stop_strings for s in plan.sequences] == [("\n",), (".",), ("\n",)]
    assert "end_of_turn" in [why for _, why in third.decoding.stop_tokens]  # a chat's end of turn stops it
    assert "end_of_turn" not in [why for _, why in first.decoding.stop_tokens]
    assert (plan.prompt, plan.decoding) == (first.prompt, first.decoding)  # sequence 0 is the anchor's


def test_one_prompt_keeps_its_identity(tmp_path):
    one = load_manifest(_write(tmp_path, HEAD + "prompt: {tokens: [1792]}\n"))
    assert "prompts" not in one.resolved_dict() and one.resolved_dict()["prompt"]["tokens"] == [1792]
    many = load_manifest(_write(tmp_path, HEAD + "prompts: [{tokens: [1792]}]\n"))
    assert "prompt" not in many.resolved_dict() and many.digest() != one.digest()


@pytest.mark.parametrize("text, fragments", [
    (HEAD + "prompt: {tokens: [1]}\n" + PROMPTS, ["m.yaml:7: prompts: exclusive with prompt (at ", "m.yaml:6)"]),
    (HEAD, ["m.yaml:1: prompt: required", "or prompts"]),
    (HEAD + "prompts: []\n", ["m.yaml:6: prompts: must be a non-empty list"]),
    (HEAD + "prompts:\n  - tokens: [1]\n  - tokens: [2]\n    text: two\n", ["m.yaml:8: prompts.1: exactly one of"]),
    (HEAD + "prompts:\n  - tokens: [1]\n  - tokens: [2]\n    seeds: 3\n", ["m.yaml:9: prompts.1.seeds: unknown key"]),
    (HEAD + "prompts:\n  - tokens: [1]\n  - tokens: [2]\n    seed: 3\n", ["m.yaml:9: prompts.1.seed: a sequence's seed"]),
    (HEAD + "prompts:\n  - tokens: [1]\n  - tokens: [2, 99999]\n", ["m.yaml:8: prompts.1.tokens.1: token id 99999"]),
    (HEAD + "prompts: [{tokens: [1]}]\ngenerate: {kv_cache: false}\n", ["generate.kv_cache: prompts decode together"]),
])  # fmt: skip
def test_bad_prompts_are_named_at_their_line(tmp_path, tiny_checkpoints, text, fragments):
    message = _error(tmp_path, text)
    for fragment in fragments:
        assert fragment in message, message


def test_compare_says_a_sequences_own_seed_changes_results(tmp_path):
    from kimi_jax.verify.compare_manifests import compare_manifests

    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(HEAD + PROMPTS + SAMPLED)
    b.write_text(HEAD + PROMPTS.replace("seed: 11", "seed: 12") + SAMPLED)
    c = compare_manifests(a, b)
    assert not c.identical and [(d.field, d.a, d.b) for d in c.result_differences] == [("prompts.1.seed", 11, 12)]
    assert c.verdict == "not expected to be identical: prompts.1.seed differs"
    assert compare_manifests(a, a).identical
