"""The output formation ledger, anchors and the non-perturbation proof."""

from __future__ import annotations

import json
import subprocess
import sys

import jsonschema
import numpy as np
import pytest

from kimi_jax.ledger.ledger import (
    LEDGER_SCHEMA,
    audit_derived,
    provenance_map,
    unclassified_fields,
)
from kimi_jax.model import engine as engine_mod
from kimi_jax.run.anchor import AnchorMismatch
from kimi_jax.manifest import parse_manifest_dict
from kimi_jax.run.plan import prepare_run
from kimi_jax.ledger.run_record import NonPerturbationFailure
from kimi_jax.run.runner import execute


def _plan(tmp_path, ckpt, **extra):
    data = {"version": 1, "model": {"checkpoint": str(ckpt)}, "prompt": {"tokens": [7, 300, 7]},
            "generate": {"max_new_tokens": 5}, "output": {"dir": str(tmp_path / "out")}, **extra}  # fmt: skip
    return prepare_run(parse_manifest_dict(data, source=str(tmp_path / "m.yaml")))


def _quiet(*_):
    pass


@pytest.fixture(scope="module")
def demo(tiny_checkpoints, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ledger")
    outcome = execute(_plan(tmp, tiny_checkpoints["kimi-k2.5"]), echo=_quiet, progress=False)
    return outcome


def test_fields_the_schema_does_not_classify_are_found(demo):
    ledger = json.loads(demo.ledger_path.read_text())
    ledger["steps"][0]["bogus"] = 1  # a new leaf in every step's shape
    ledger["run"]["extra"] = {"deep": 2}
    ledger["steps"][1]["layers"][0]["nothing"] = None
    ledger["anchor"] = None  # an absent optional section whose fields are classified is fine
    assert unclassified_fields(ledger) == ["run.extra.deep", "steps[].bogus", "steps[].layers[].nothing"]


def test_ledger_has_every_field_and_validates(demo):
    ledger = json.loads(demo.ledger_path.read_text())
    jsonschema.Draft202012Validator(LEDGER_SCHEMA).validate(ledger)
    assert unclassified_fields(ledger) == []
    assert len(ledger["steps"]) == 5
    step_fields = {"context", "token", "logit", "top_k", "entropy", "margin", "hidden_digest", "logits_digest",
                   "bytes_read", "wall_s", "layers"}  # fmt: skip
    layer_fields = {"layer", "kind", "norm_in", "norm_out", "experts", "routing_weights", "router_scores", "bytes_read"}
    for step in ledger["steps"]:
        assert step_fields <= step.keys()
        assert len(step["top_k"]) == 16
        moe = [l for l in step["layers"] if l["kind"] == "moe"]
        assert moe and all(layer_fields <= l.keys() for l in moe)
    assert ledger["non_perturbation"]["identical"] is True


def test_provenance_is_in_the_schema():
    classes = provenance_map()
    measured = {"steps[].token", "steps[].logit", "steps[].layers[].norm_in", "steps[].layers[].experts",
                "steps[].bytes_read", "steps[].layers[].router_scores"}  # fmt: skip
    derived = {"steps[].top_k", "steps[].entropy", "steps[].margin", "steps[].hidden_digest",
               "steps[].logits_digest", "steps[].layers[].routing_weights"}  # fmt: skip
    assert all(classes[f] == "measured" for f in measured)
    assert all(classes[f] == "derived" for f in derived)


def test_floats_read_back_to_identical_float32(demo):
    ledger = json.loads(demo.ledger_path.read_text())
    for rec, step in zip(demo.steps, ledger["steps"]):
        assert np.float32(step["logit"]) == np.float32(rec.logits[rec.token])
        for entry, layer in zip(step["layers"], rec.layers):
            assert np.float32(entry["norm_in"]) == np.float32(layer.norm_in)
            if layer.router_scores is not None:
                assert np.array_equal(np.asarray(entry["router_scores"], np.float32),
                                      np.asarray(layer.router_scores, np.float32))  # fmt: skip


def test_routing_weights_sum_to_one_and_match_the_engine(demo):
    ledger = json.loads(demo.ledger_path.read_text())
    for rec, step in zip(demo.steps, ledger["steps"]):
        for entry, layer in zip(step["layers"], rec.layers):
            if layer.kind == "moe":
                w = np.asarray(entry["routing_weights"], np.float64)
                np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)
                np.testing.assert_allclose(w, np.asarray(layer.routing_weights), rtol=1e-6)


def test_derived_values_recompute_independently(demo):
    torch = pytest.importorskip("torch")
    ledger = json.loads(demo.ledger_path.read_text())
    arrays = {rec.index: (rec.logits, rec.hidden) for rec in demo.steps}
    assert audit_derived(ledger, arrays) == []
    for rec, step in zip(demo.steps, ledger["steps"]):
        logits = torch.from_numpy(rec.logits.astype(np.float64))
        values, ids = torch.topk(logits, 16)
        assert [t for t, _ in step["top_k"]] == ids.tolist()
        np.testing.assert_allclose([v for _, v in step["top_k"]], values.numpy(), rtol=1e-7)
        p = torch.softmax(logits, 0)
        assert step["entropy"] == pytest.approx(float(-(p * torch.log(p)).sum()), rel=1e-6)
        assert step["margin"] == pytest.approx(float(values[0] - values[1]), rel=1e-6)
    tampered = json.loads(demo.ledger_path.read_text())
    tampered["steps"][2]["entropy"] += 0.25
    tampered["steps"][3]["layers"][1]["routing_weights"][0][0] = 0.5
    problems = audit_derived(tampered, arrays)
    assert any("steps[2].entropy" in p for p in problems)
    assert any("steps[3].layers[1].routing_weights" in p for p in problems)


@pytest.mark.parametrize("layout", ["kimi-k2.5", "kimi-k2-fp8", "hf-bf16"])
def test_bare_and_instrumented_identical(tiny_checkpoints, tmp_path, layout):
    outcome = execute(_plan(tmp_path, tiny_checkpoints[layout], generate={"max_new_tokens": 3}), prove="all",
                      echo=_quiet, progress=False)  # fmt: skip
    proof = outcome.ledger["non_perturbation"]
    assert proof["identical"] and proof["bare"] == proof["instrumented"] and proof["scope"] == "all"
    assert [s["hidden_digest"] for s in proof["bare"]] == [s["hidden_digest"] for s in outcome.ledger["steps"]]


def test_the_default_proof_runs_only_step_0_bare(tiny_checkpoints, tmp_path, monkeypatch):
    # the proof's cost: one bare step, not a second pass over the run (counted at the engine)
    bare_steps = []
    real = engine_mod.Engine.forward

    def counting(self, *args, **kwargs):
        if not self.keep_capture:
            bare_steps.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(engine_mod.Engine, "forward", counting)
    outcome = execute(_plan(tmp_path, tiny_checkpoints["kimi-k2.5"], generate={"max_new_tokens": 3}), echo=_quiet,
                      progress=False)  # fmt: skip
    proof = outcome.ledger["non_perturbation"]
    assert len(bare_steps) == 1 and proof["scope"] == "first"
    assert proof["bare"] == proof["instrumented"] == [
        {k: outcome.ledger["steps"][0][k if k != "step" else "index"] for k in proof["bare"][0]}]
    # with the KV cache, the bare step 0 attends over the caches the whole run has: a shorter cache is a
    # shorter reduction, which can change step 0's bits and fail the proof for nothing
    capacities = []
    real_generate = engine_mod.Engine.generate

    def generating(self, prompt, max_new_tokens, kv_cache, *args, caches=None, **kwargs):
        capacities.append((self.keep_capture, max_new_tokens, caches[0].capacity))
        return real_generate(self, prompt, max_new_tokens, kv_cache, *args, caches=caches, **kwargs)

    monkeypatch.setattr(engine_mod.Engine, "generate", generating)
    execute(_plan(tmp_path / "kv", tiny_checkpoints["kimi-k2.5"], generate={"max_new_tokens": 3, "kv_cache": True}),
            echo=_quiet, progress=False)  # fmt: skip
    prompt = len(outcome.ledger["run"]["prompt"])
    assert capacities == [(False, 1, prompt + 3), (True, 3, prompt + 3)]
    # time: each step says what of its wall time was compiling, the totals the whole run's wall time
    totals, steps = outcome.ledger["totals"], outcome.ledger["steps"]
    assert all(0 <= s["compile_s"] <= s["wall_s"] for s in steps)
    assert totals["compile_s"] == pytest.approx(sum(s["compile_s"] for s in steps), rel=1e-5)
    assert totals["run_wall_s"] >= totals["wall_s"] + totals["proof_wall_s"] > totals["wall_s"]


def test_perturbed_capture_writes_no_ledger(tiny_checkpoints, tmp_path, monkeypatch):
    real = engine_mod.Engine.forward

    def perturbing(self, *args, **kwargs):
        hidden, logits, layers, caches = real(self, *args, **kwargs)
        if self.keep_capture:  # an instrument that changes what it measures
            hidden = hidden + np.float32(1e-3)
        return hidden, logits, layers, caches

    monkeypatch.setattr(engine_mod.Engine, "forward", perturbing)
    with pytest.raises(NonPerturbationFailure, match="hidden_digest"):
        execute(_plan(tmp_path, tiny_checkpoints["kimi-k2.5"]), echo=_quiet, progress=False)
    assert not (tmp_path / "out" / "ledger.json").exists()


def _freeze(manifest, out):
    return subprocess.run([sys.executable, "-m", "kimi_jax.cli", "anchor", "freeze", str(manifest), "--out", str(out)],
                          capture_output=True, text=True)  # fmt: skip


def test_anchor_freeze_reproducible_across_processes_and_checked(tiny_checkpoints, tmp_path):
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"version: 1\nmodel:\n  checkpoint: {tiny_checkpoints['kimi-k2.5']}\nprompt:\n  tokens: [1792]\n"
                        f"generate:\n  max_new_tokens: 3\nanchor: anchor.json\noutput:\n  dir: out\n")  # fmt: skip
    a, b = _freeze(manifest, tmp_path / "a.json"), _freeze(manifest, tmp_path / "b.json")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    (tmp_path / "anchor.json").write_bytes((tmp_path / "a.json").read_bytes())
    from kimi_jax.run.plan import load_plan

    outcome = execute(load_plan(str(manifest)), echo=_quiet, progress=False)
    anchor = json.loads((tmp_path / "a.json").read_text())
    step0 = outcome.ledger["steps"][0]
    assert outcome.ledger["anchor"]["status"] == "matched"
    assert (step0["token"], step0["hidden_digest"], step0["bytes_read"]) == (anchor["token"], anchor["hidden_digest"],
                                                                             anchor["bytes_read"])  # fmt: skip
    assert len(outcome.ledger["steps"]) == 3  # a multi-step run keeps the single-step anchor in step 0

    good_ledger = (tmp_path / "out" / "ledger.json").read_bytes()
    tampered = dict(anchor, logits_digest="0" * 64)
    (tmp_path / "anchor.json").write_text(json.dumps(tampered))
    with pytest.raises(AnchorMismatch) as e:
        execute(load_plan(str(manifest)), echo=_quiet, progress=False)
    msg = str(e.value)
    assert f"logits_digest: anchor '{'0' * 64}', this run '{anchor['logits_digest']}'" in msg
    assert "token:" not in msg and "the platform is identical" in msg

    other_platform = dict(tampered, platform=dict(anchor["platform"], jax="0.0.1"))
    (tmp_path / "anchor.json").write_text(json.dumps(other_platform))
    with pytest.raises(AnchorMismatch, match=r"the platform differs:\n  jax: '0.0.1' -> "):
        execute(load_plan(str(manifest)), echo=_quiet, progress=False)
    # the stopped runs wrote nothing: the earlier ledger is untouched
    assert (tmp_path / "out" / "ledger.json").read_bytes() == good_ledger


def test_anchor_for_another_prompt_is_refused_before_compute(tiny_checkpoints, tmp_path):
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"version: 1\nmodel:\n  checkpoint: {tiny_checkpoints['kimi-k2.5']}\nprompt:\n  tokens: [1792]\n"
                        f"anchor: anchor.json\noutput:\n  dir: out\n")  # fmt: skip
    assert _freeze(manifest, tmp_path / "anchor.json").returncode == 0
    from kimi_jax.run.plan import load_plan

    with pytest.raises(AnchorMismatch, match=r"frozen for a different run:\n  prompt: anchor \[1792\], this run \[5\]"):
        execute(load_plan(str(manifest), ["prompt.tokens=[5]"]), echo=_quiet, progress=False)
    # an anchor frozen before the config digest became BLAKE3 is named for what it is
    old = json.loads((tmp_path / "anchor.json").read_text()) | {"anchor_version": 1}
    (tmp_path / "anchor.json").write_text(json.dumps(old))
    with pytest.raises(AnchorMismatch, match=r"anchor.json: anchor_version is 1, this kimi-jax reads version 2 "
                                             r"\(checkpoint.config_digest is BLAKE3.*freeze it again") as e:  # fmt: skip
        execute(load_plan(str(manifest)), echo=_quiet, progress=False)
    # ... and for the weights it was computed with
    assert ("a version-1 anchor was computed with dequantization bf16-rounded (kimi-jax 0.1.0, which did not record "
            "the mode)") in str(e.value)  # fmt: skip


def test_anchor_names_the_dequantization_mode(tiny_checkpoints, tmp_path):
    """An anchor frozen under one dequantization mode stops a run under the other before compute,
    naming both modes; an anchor without a mode (written before it existed) reads as bf16-rounded."""
    from kimi_jax.run.anchor import freeze
    from kimi_jax.run.plan import load_plan
    from kimi_jax.run.runner import run_steps

    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"version: 1\nmodel:\n  checkpoint: {tiny_checkpoints['kimi-k2.5']}\nprompt:\n  tokens: [1792]\n"
                        f"generate:\n  max_new_tokens: 1\nanchor: anchor.json\noutput:\n  dir: out\n")  # fmt: skip
    rounded = ["compute.dequant=bf16-rounded"]

    def one_step(plan):
        return run_steps(plan, False, max_new_tokens=1)[0]

    path, frozen = freeze(load_plan(str(manifest), rounded), one_step)
    assert frozen["dequant"] == "bf16-rounded"
    with pytest.raises(AnchorMismatch) as e:
        execute(load_plan(str(manifest)), echo=_quiet, progress=False)
    assert ("frozen for a different run:\n  dequant (dequantization mode of quantized weights): anchor bf16-rounded, "
            "this run exact") in str(e.value)  # fmt: skip
    assert "logits_digest" not in str(e.value)  # stopped on the condition, before any digest was compared

    path.write_text(json.dumps({k: v for k, v in frozen.items() if k != "dequant"}))
    with pytest.raises(AnchorMismatch) as e:
        execute(load_plan(str(manifest)), echo=_quiet, progress=False)
    assert "anchor bf16-rounded (kimi-jax 0.1.0, which did not record the mode), this run exact" in str(e.value)
    # Under bf16-rounded that anchor's condition holds, and step 0 is compared (and matches).
    outcome = execute(load_plan(str(manifest), rounded), echo=_quiet, progress=False)
    assert outcome.ledger["anchor"]["status"] == "matched" and outcome.ledger["run"]["dequant"] == "bf16-rounded"

    # Frozen under exact, checked under bf16-rounded: the other direction stops too.
    freeze(load_plan(str(manifest)), one_step)
    with pytest.raises(AnchorMismatch, match=r"dequant \(dequantization mode of quantized weights\): anchor exact, "
                                             r"this run bf16-rounded"):  # fmt: skip
        execute(load_plan(str(manifest), rounded), echo=_quiet, progress=False)
