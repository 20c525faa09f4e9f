"""A prompts: run end to end: every sequence is its lone run (tokens, step 0 bitwise, and the
digests where the products are row-independent), the version-3 ledger validates and keeps each
sequence's meaning, and verify, compare and replay handle it."""

from __future__ import annotations

import json
import shutil

import jsonschema
import numpy as np
import pytest

from kimi_jax.ledger.bundle import load_arrays
from kimi_jax.ledger.ledger import step_identity, unclassified_fields
from kimi_jax.ledger.sequences import MULTI_SCHEMA, array_offsets, audit_passes, sequence_view
from kimi_jax.verify.checklist import verify_bundle
from tests.hostile import reseal
from kimi_jax.manifest import parse_manifest_dict
from kimi_jax.run.plan import prepare_run
from kimi_jax.run.runner import execute, run_steps

PROMPTS = [{"tokens": [1792, 5, 9]}, {"tokens": [1792, 300]}, {"tokens": [7, 8, 9, 10, 11]}]


def _manifest(tmp_path, ckpt, name, **extra):
    data = {"version": 1, "model": {"checkpoint": str(ckpt)}, "generate": {"max_new_tokens": 4},
            "output": {"dir": str(tmp_path / name)}, **extra}  # fmt: skip
    return parse_manifest_dict(data, source=str(tmp_path / f"{name}.yaml"))


def _quiet(*_):
    pass


@pytest.fixture(scope="module")
def runs(tiny_checkpoints, tmp_path_factory):
    """A greedy and a seeded prompts: run (the seeded one proven on every step)."""
    tmp = tmp_path_factory.mktemp("prompts")
    ckpt = tiny_checkpoints["kimi-k2.5"]
    sampled = {"sampling": {"temperature": 0.9, "seed": 5}, "max_new_tokens": 4}
    entries = [PROMPTS[0], {**PROMPTS[1], "seed": 21}, PROMPTS[2]]
    plans = {"greedy": prepare_run(_manifest(tmp, ckpt, "greedy", prompts=PROMPTS)),
             "sampled": prepare_run(_manifest(tmp, ckpt, "sampled", prompts=entries, generate=sampled))}  # fmt: skip
    scopes = {"greedy": "first", "sampled": "all"}  # the proof: each step 0 bare, or the whole batch bare
    outcomes = {name: execute(plan, echo=_quiet, progress=False, prove=scopes[name]) for name, plan in plans.items()}
    return tmp, ckpt, plans, outcomes


def _lone(tmp, ckpt, prompt, **generate):
    plan = prepare_run(_manifest(tmp, ckpt, "lone", prompt={"tokens": prompt["tokens"]},
                                 generate={"max_new_tokens": 4, **generate}))  # fmt: skip
    return run_steps(plan)


@pytest.mark.parametrize("name", ["greedy", "sampled"])
def test_every_sequence_is_its_lone_run(runs, name):
    """Tokens and bytes used equal the lone run's; step 0 (each prompt alone, the anchor step) is
    bitwise its lone run's. Later steps decode as rows of one program, whose products sum in
    another order: measured within 5e-7 of the largest logit here, bounded at 1e-5."""
    tmp, ckpt, plans, outcomes = runs
    ledger = outcomes[name].ledger
    arrays = load_arrays(outcomes[name].ledger_path.parent)
    for seq, planned, offset in zip(ledger["sequences"], plans[name].sequences, array_offsets(ledger)):
        sampling = planned.decoding.sampling
        generate = {} if sampling is None else {"sampling": {"temperature": sampling.temperature, "seed": sampling.seed}}
        alone = _lone(tmp, ckpt, {"tokens": list(planned.prompt)}, **generate)
        assert [s["token"] for s in seq["steps"]] == [s.token for s in alone]
        assert [s["bytes_read"] for s in seq["steps"]] == [s.bytes_read for s in alone]
        want = step_identity(alone[0])
        assert {k: seq["steps"][0][k] for k in ("hidden_digest", "logits_digest")} == \
            {k: want[k] for k in ("hidden_digest", "logits_digest")}  # fmt: skip
        for j, lone_step in enumerate(alone[1:], start=1):
            logits = arrays[offset + j][0]
            scale = float(np.abs(lone_step.logits).max())
            np.testing.assert_allclose(logits, lone_step.logits, rtol=0, atol=1e-5 * scale)
    if name == "sampled":  # a sequence's own seed is the one recorded and drawn with
        assert [s["sampling"]["seed"] for s in ledger["sequences"]] == [5, 21, 5]


@pytest.mark.parametrize("name", ["greedy", "sampled"])
def test_the_bundle_verifies_and_each_sequence_keeps_its_meaning(runs, name):
    ledger = runs[3][name].ledger
    report = verify_bundle(runs[3][name].ledger_path.parent)
    assert report.ok, [c.line() for c in report.checks if c.status == "FAILED"]
    assert "3 of 3 sequences" in next(c.reason for c in report.checks if c.name == "digests")
    for i, seq in enumerate(ledger["sequences"]):
        view = sequence_view(ledger, i)  # the version-2 ledger of its own run
        assert view["run"]["prompt"] == seq["prompt"] == PROMPTS[i]["tokens"] and view["steps"] is seq["steps"]
        proof = seq["non_perturbation"]
        assert proof["identical"] and seq["anchor"] is None
        assert [p["step"] for p in proof["bare"]] == ([0] if name == "greedy" else list(range(len(seq["steps"]))))
    # three prompts alone, then passes of every live sequence, each making one step of each
    passes = ledger["passes"]
    assert [p["sequences"] for p in passes[:3]] == [[0], [1], [2]] and passes[3]["sequences"] == [0, 1, 2]
    assert audit_passes(ledger) == []
    shared = passes[3]
    own = sum(ledger["sequences"][i]["steps"][1]["bytes_read"] for i in range(3))
    assert shared["bytes_shared"] == own - shared["bytes_used"] > 0  # every non-expert weight once for three tokens
    assert ledger["totals"]["tokens"] == 12
    jsonschema.Draft202012Validator(MULTI_SCHEMA).validate(ledger)
    assert unclassified_fields(ledger, MULTI_SCHEMA) == []


def test_an_edited_measurement_of_one_sequence_fails_verify(runs, tmp_path):
    bundle = tmp_path / "edited"
    shutil.copytree(runs[3]["greedy"].ledger_path.parent, bundle)
    ledger = json.loads((bundle / "ledger.json").read_text())
    ledger["sequences"][2]["steps"][1]["logit"] += 1.0
    (bundle / "ledger.json").write_text(json.dumps(ledger))
    reseal(bundle)  # what a forger does: checksums and the receipt's digest made to fit
    report = verify_bundle(bundle)
    failed = {c.name: c.reason for c in report.checks if c.status == "FAILED"}
    assert "sequences[2]: " in failed["digests"] and "steps[1].logit" in failed["digests"]
    assert "sequences[0]" not in failed["digests"] and "sequences[1]" not in failed["digests"]


def test_compare_pairs_the_sequences_of_two_runs(runs, tmp_path):
    from kimi_jax.verify.compare import compare_paths, format_comparison

    outcomes = runs[3]
    greedy, sampled = (outcomes[n].ledger_path.parent for n in ("greedy", "sampled"))
    same = compare_paths(greedy, greedy)
    assert same.identical and [s.label for s in same.steps[:5]] == ["0:0", "0:1", "0:2", "0:3", "1:0"]
    other = compare_paths(greedy, sampled)
    first = next(s for s in other.steps if not s.tokens_equal)  # greedy and seeded draws part somewhere
    assert not other.identical and (other.first_divergent_sequence, other.first_divergent_step) <= (first.sequence, first.index)
    text = format_comparison(other)
    assert f"first divergent step: {other.first_divergent_step} of sequence {other.first_divergent_sequence}" in text
    assert "generate.sampling" in text and "prompts" in text  # the manifests' differences: sampling and a seed


def test_an_archive_of_a_prompts_run_verifies_and_replays(runs, tmp_path):
    from kimi_jax.ledger.archive import archive_bundle

    archive = archive_bundle(runs[3]["sampled"].ledger_path.parent, tmp_path / "sampled.tar.gz")
    report = verify_bundle(archive, replay=True)
    assert report.ok, [c.line() for c in report.checks if c.status == "FAILED"]
    replay = next(c for c in report.checks if c.name == "replay")
    assert replay.status == "OK" and "12 step(s) of 3 sequences" in replay.reason


def test_the_anchor_is_sequence_0s_step_0(tiny_checkpoints, tmp_path):
    """An anchor frozen from a prompts: manifest is its sequence 0's step 0 (that prompt run alone),
    and a run of the batch holds its sequence 0 to it, through the command line."""
    from click.testing import CliRunner

    from kimi_jax.cli import main

    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"version: 1\nmodel: {{checkpoint: {tiny_checkpoints['kimi-k2.5']}}}\n"
                        "prompts: [{tokens: [1792, 5]}, {tokens: [9, 10, 11]}]\ngenerate: {max_new_tokens: 2}\n"
                        "anchor: anchor.json\noutput: {dir: out}\n")  # fmt: skip
    frozen = CliRunner().invoke(main, ["anchor", "freeze", str(manifest)])
    assert frozen.exit_code == 0, frozen.output
    ran = CliRunner().invoke(main, ["run", str(manifest), "--json", "-q"])
    assert ran.exit_code == 0, ran.output
    summary = json.loads(ran.stdout)
    assert summary["anchor_matched"] and [s["prompt"] for s in summary["sequences"]] == [[1792, 5], [9, 10, 11]]
    ledger = json.loads((tmp_path / "out" / "ledger.json").read_text())
    anchor = json.loads((tmp_path / "anchor.json").read_text())
    assert ledger["sequences"][0]["anchor"]["status"] == "matched" and ledger["sequences"][1]["anchor"] is None
    assert anchor["logits_digest"] == ledger["sequences"][0]["steps"][0]["logits_digest"]
    report = verify_bundle(tmp_path / "out")
    assert report.ok and next(c.reason for c in report.checks if c.name == "anchor").startswith("1 of 2 sequences")
    published = CliRunner().invoke(main, ["schema", "ledger-sequences"])
    assert json.loads(published.stdout) == MULTI_SCHEMA and jsonschema.Draft202012Validator(MULTI_SCHEMA).is_valid(ledger)


@pytest.mark.parametrize("fault", ["instrumented:4:0", "bare:1:0"])
def test_a_killed_prompts_run_resumes_from_its_last_pass_to_the_same_bundle(runs, tmp_path, fault):
    """Killed with pass 4 of the instrumented run (or pass 1 of the proof's bare run) computed but not
    saved, `--resume` goes on from the passes saved: the ledger's steps and passes are the
    uninterrupted run's, bit for bit, and the bundle verifies."""
    import os
    import subprocess
    import sys

    import yaml

    tmp, ckpt, plans, outcomes = runs
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump({"version": 1, "model": {"checkpoint": str(ckpt)}, "prompts": PROMPTS,
                                        "generate": {"max_new_tokens": 4}, "output": {"dir": "out"}}))  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "KIMI_JAX_FAULT"}

    def run(*extra, fault=None):
        return subprocess.run([sys.executable, "-m", "kimi_jax.cli", "run", str(manifest), *extra],
                              capture_output=True, text=True, env={**env, **({"KIMI_JAX_FAULT": fault} if fault else {})})  # fmt: skip

    killed = run(fault=fault)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (tmp_path / "out" / "ledger.json").exists()
    saved = sorted(p.name for p in (tmp_path / ".out.work" / fault.split(":")[0]).glob("pass_*.json"))
    assert saved == [f"pass_{i:05d}.json" for i in range(int(fault.split(":")[1]))]
    resumed = run("--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{fault.split(':')[0]} pass {fault.split(':')[1]}:" in resumed.stderr  # the unsaved pass ran again
    assert "instrumented pass 0:" in resumed.stderr if fault.startswith("bare") else "instrumented pass 0:" not in resumed.stderr
    whole = outcomes["greedy"].ledger
    ledger = json.loads((tmp_path / "out" / "ledger.json").read_text())

    def identity(led):
        return ([[step_identity_json(s) for s in seq["steps"]] for seq in led["sequences"]],
                [{k: p[k] for k in ("sequences", "bytes_used")} for p in led["passes"]])

    assert identity(ledger) == identity(whole)
    assert verify_bundle(tmp_path / "out").ok
    assert not (tmp_path / ".out.work").exists()


def step_identity_json(step: dict) -> tuple:
    return (step["context"], step["token"], step["hidden_digest"], step["logits_digest"], step["bytes_read"])


@pytest.mark.parametrize("kind", ["pass", "step"])
def test_a_hand_edited_saved_pass_or_step_is_a_named_error_and_is_kept(tmp_path, kind):
    from kimi_jax.errors import ResumeError
    from kimi_jax.run.resume import RunCheckpoints

    saved = RunCheckpoints(tmp_path / "out", {"run": 1}, resume=False)
    folder = saved.root / "instrumented"
    folder.mkdir(parents=True)
    edited = folder / f"{kind}_00000.json"
    edited.write_text(json.dumps({"pass": {"index": 0}, "made": [], "live": []} if kind == "pass" else {"index": 0}))
    np.savez(folder / f"{kind}_00000.npz", logits=np.zeros(3, np.float32), hidden=np.zeros(2, np.float32))
    with pytest.raises(ResumeError, match=rf"{kind}_00000.json: not what this kimi-jax saves \((KeyError|TypeError)"):
        saved.load_passes("instrumented") if kind == "pass" else saved.load("instrumented")
    assert edited.exists()
