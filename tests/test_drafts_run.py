"""generate.drafts: prompt-lookup from a manifest: the tokens are plain decoding's (greedy and
seeded), step 0 (the anchor step) is untouched, and the ledger (version 3, one sequence) records
each verification pass's drafted and accepted tokens, which verify re-derives."""

from __future__ import annotations

import pytest

from kimi_jax.errors import ManifestError
from kimi_jax.ledger.ledger import step_identity
from kimi_jax.manifest import parse_manifest_dict
from kimi_jax.run.plan import prepare_run
from kimi_jax.run.runner import execute, run_steps
from kimi_jax.verify.checklist import verify_bundle

PROMPT = [1792, 5, 9, 5, 9, 5]  # repeats: prompt lookup has something to draft


def _plan(tmp_path, ckpt, name, **generate):
    data = {"version": 1, "model": {"checkpoint": str(ckpt)}, "prompt": {"tokens": PROMPT},
            "generate": {"max_new_tokens": 6, **generate}, "output": {"dir": str(tmp_path / name)}}  # fmt: skip
    return prepare_run(parse_manifest_dict(data, source=str(tmp_path / f"{name}.yaml")))


@pytest.mark.parametrize("sampling", [None, {"temperature": 0.9, "seed": 3}])
def test_drafted_runs_make_plain_decodings_tokens_and_record_the_drafts(tiny_checkpoints, tmp_path, sampling):
    ckpt = tiny_checkpoints["kimi-k2.5"]
    extra = {} if sampling is None else {"sampling": sampling}
    plain = run_steps(_plan(tmp_path, ckpt, "plain", **extra))
    outcome = execute(_plan(tmp_path, ckpt, "drafted", drafts={"method": "prompt-lookup", "tokens": 3}, **extra),
                      echo=lambda *_: None, progress=False)  # fmt: skip
    ledger = outcome.ledger
    (seq,) = ledger["sequences"]
    assert [s["token"] for s in seq["steps"]] == [s.token for s in plain]
    assert {k: seq["steps"][0][k] for k in ("hidden_digest", "logits_digest", "bytes_read")} == \
        {k: v for k, v in step_identity(plain[0]).items() if k in ("hidden_digest", "logits_digest", "bytes_read")}  # fmt: skip
    verifications = [p for p in ledger["passes"] if "drafted" in p]
    assert verifications and all(len(p["drafted"]) <= 3 for p in verifications)
    for p in verifications:  # a pass makes its accepted drafts and one more token
        made = [seq["steps"][j]["token"] for j in p["steps"]]
        assert p["accepted"] == len(made) - 1 and made[: p["accepted"]] == p["drafted"][: p["accepted"]]
    assert len(ledger["passes"]) == 1 + len(verifications)  # step 0 alone, then the verification passes
    totals = ledger["totals"]
    assert totals["accepted"] == len(seq["steps"]) - len(ledger["passes"])  # tokens made without a pass of their own
    assert totals["drafted"] == sum(len(p["drafted"]) for p in verifications)
    report = verify_bundle(outcome.ledger_path.parent)
    assert report.ok, [c.line() for c in report.checks if c.status == "FAILED"]


def test_drafts_are_refused_where_they_cannot_run(tiny_checkpoints, tmp_path):
    with pytest.raises(ManifestError, match="generate.drafts: drafts verify one sequence's tokens"):
        data = {"version": 1, "model": {"checkpoint": str(tiny_checkpoints["kimi-k2.5"])},
                "prompts": [{"tokens": PROMPT}], "generate": {"drafts": {"tokens": 2}}, "output": {"dir": "o"}}  # fmt: skip
        prepare_run(parse_manifest_dict(data, source=str(tmp_path / "m.yaml")))
    with pytest.raises(ManifestError, match="generate.kv_cache: drafts are verified together"):
        _plan(tmp_path, tiny_checkpoints["kimi-k2.5"], "x", drafts={"tokens": 2}, kv_cache=False)
