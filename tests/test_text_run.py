"""Runs that take text and give text: a chat prompt through the CLI, seeded sampling across processes,
stop rules, resume, anchors and replay of sampled runs, on the tiny synthetic Kimi K2.5 checkpoint."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml
from click.testing import CliRunner

from kimi_jax.cli import main
from kimi_jax.run.anchor import AnchorMismatch
from kimi_jax.manifest import parse_manifest_dict
from kimi_jax.run.plan import load_plan, prepare_run
from kimi_jax.run.runner import execute, run_steps
from kimi_jax.storage.synth import synth_checkpoint
from kimi_jax.verify.checklist import verify_bundle

CHAT = [{"role": "user", "content": "Tell me a short story about a cat."}]
SAMPLING = {"temperature": 0.9, "top_k": 50, "top_p": 0.95, "seed": 7}
FIRST_SPECIAL = 1792  # the tiny vocabulary's 2,048 ids less Kimi's 256 special tokens


def _quiet(*_):
    pass


def _write(path, ckpt, **generate):
    data = {"version": 1, "model": {"checkpoint": str(ckpt)}, "prompt": {"chat": CHAT},
            "generate": {"max_new_tokens": 6, "kv_cache": True, "sampling": SAMPLING, **generate},
            "output": {"dir": "out"}}  # fmt: skip
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), os.getcwd()) if p)}
    return subprocess.run([sys.executable, "-m", "kimi_jax.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env)  # fmt: skip


@pytest.fixture(scope="module")
def chat_run(tiny_checkpoints, tmp_path_factory):
    """A sampled chat run through the CLI, proving non-perturbation, stderr not a terminal."""
    tmp = tmp_path_factory.mktemp("chat-run")
    manifest = _write(tmp / "chat.yaml", tiny_checkpoints["kimi-k2.5"])
    proc = _cli("run", str(manifest), "--out", str(tmp / "bundle"), cwd=tmp)
    assert proc.returncode == 0, proc.stderr
    return tmp, manifest, proc, json.loads((tmp / "bundle" / "ledger.json").read_text())


def test_a_chat_prompt_streams_text_and_the_ledger_records_it(chat_run):
    tmp, _, proc, ledger = chat_run
    steps = ledger["steps"]
    # stdout: exactly the generated text (special tokens left out), then a newline
    shown = b"".join(bytes.fromhex(s["token_bytes"]) for s in steps if s["token"] < FIRST_SPECIAL)
    assert proc.stdout == shown.decode("utf-8", errors="replace") + "\n"
    # stderr: one line per step of each run (the proof runs step 0 bare), no carriage-return redraws
    assert "\r" not in proc.stderr
    lines = [l for l in proc.stderr.splitlines() if re.match(r"^(bare|instrumented) step \d+: token \d+", l)]
    assert [l.split(":")[0] for l in lines] == ["bare step 0", *(f"instrumented step {i}" for i in range(len(steps)))]
    run = ledger["run"]
    assert run["prompt_input"] == {"chat": CHAT} and run["sampling"] == {**SAMPLING, "min_p": 0.0}
    text = ledger["text"]["prompt_text"]
    assert text.startswith("<|im_system|>system<|im_middle|>") and CHAT[0]["content"] in text
    assert text.endswith("<|im_end|><|im_assistant|>assistant<|im_middle|>")
    assert ledger["text"]["generated_text"].encode(errors="surrogateescape") is not None
    assert [s["index"] for s in steps] == list(range(len(steps))) and steps[0]["sampling"]["seed"] == 7
    assert all(0 < s["sampling"]["probability"] <= 1 and s["rank"] >= 0 for s in steps)
    assert [t for t, reason in run["stop"]["tokens"]] == [1793, 1794]  # [EOS] and <|im_end|>, the end of a turn
    assert ledger["checkpoint"]["tokenizer"]["kind"] == "tiktoken"
    assert sorted(p.name for p in (tmp / "bundle" / "tokenizer").iterdir()) == [
        "chat_template.jinja", "tiktoken.model", "tokenizer_config.json"]  # fmt: skip
    report = verify_bundle(tmp / "bundle")
    assert report.ok and report.status("text") == "OK", report.format()


def test_same_seed_same_tokens_in_another_process_other_seed_other_tokens(chat_run):
    tmp, manifest, _, ledger = chat_run
    same = _cli("run", str(manifest), "--out", str(tmp / "same"), "--no-prove", "--json", "-q", cwd=tmp)
    other = _cli("run", str(manifest), "--out", str(tmp / "other"), "--no-prove", "--json", "-q",
                 "--set", "generate.sampling.seed=8", cwd=tmp)  # fmt: skip
    assert same.returncode == 0 and other.returncode == 0, same.stderr + other.stderr
    assert same.stderr == "" and other.stderr == "", "--quiet leaves stderr to errors"
    summary = json.loads(same.stdout)
    assert summary["tokens"] == [s["token"] for s in ledger["steps"]]
    assert summary["token_texts"] == [s["token_text"] for s in ledger["steps"]]
    again = json.loads((tmp / "same" / "ledger.json").read_text())
    digests = lambda l: [(s["hidden_digest"], s["logits_digest"], s["sampling"]) for s in l["steps"]]  # noqa: E731
    assert digests(again) == digests(ledger)
    assert json.loads(other.stdout)["tokens"] != summary["tokens"]


def test_replay_reproduces_a_sampled_run_and_a_forged_draw_fails(chat_run, tmp_path):
    tmp, _, _, ledger = chat_run
    report = verify_bundle(tmp / "bundle", replay=True)
    assert report.status("replay") == "OK", report.format()
    forged = shutil.copytree(tmp / "bundle", tmp_path / "forged")
    changed = json.loads((forged / "ledger.json").read_text())
    first = changed["steps"][0]
    second = changed["steps"][1]["token"]
    first["token"] = second if second != first["token"] else first["token"] + 1
    (forged / "ledger.json").write_text(json.dumps(changed))
    report = verify_bundle(forged)
    assert report.status("digests") == "FAILED" and "the seeded draw from the stored logits (seed 7)" in \
        report.reason("digests")  # fmt: skip


def test_stop_string_ends_the_run_and_is_not_printed(tiny_checkpoints, tmp_path):
    free = execute(load_plan(str(_write(tmp_path / "a.yaml", tiny_checkpoints["kimi-k2.5"])),
                             out_dir=str(tmp_path / "a")), prove=False, echo=_quiet, progress=False)  # fmt: skip
    words = [s["token_text"] for s in free.ledger["steps"] if s["token"] < FIRST_SPECIAL and s["token_text"].strip()
             and "\\x" not in s["token_text"]]  # whole characters only
    assert len(words) >= 2, free.ledger["text"]
    stop = words[1].strip()
    plan = load_plan(str(_write(tmp_path / "b.yaml", tiny_checkpoints["kimi-k2.5"], stop=[stop])),
                     out_dir=str(tmp_path / "b"))  # fmt: skip
    stopped = execute(plan, prove=False, echo=_quiet, progress=False)
    tokens = [s.token for s in free.steps]
    ends = next(n for n in range(1, 7) if stop in plan.tokenizer.decode(tokens[:n], skip_special=True))
    assert [s.token for s in stopped.steps] == tokens[:ends]
    assert stopped.ledger["stopped"] == {"reason": "stop_string", "string": stop}
    assert stop not in stopped.text and free.text.startswith(stopped.text)
    report = verify_bundle(tmp_path / "b")
    assert report.failed == ["non-perturbation"], report.format()  # a --no-prove run carries no proof


def test_eos_ends_the_run_unless_ignored(tiny_checkpoints, tmp_path):
    free = execute(load_plan(str(_write(tmp_path / "free.yaml", tiny_checkpoints["kimi-k2.5"]))), prove=False,
                   echo=_quiet, progress=False)  # fmt: skip
    eos = free.steps[1].token
    # the same weights with config.json naming the second token as end-of-sequence
    ckpt = synth_checkpoint(tmp_path / "ckpt", "tiny", "kimi-k2.5", eos_token_id=eos)
    stopped = execute(load_plan(str(_write(tmp_path / "eos.yaml", ckpt))), prove=False, echo=_quiet, progress=False)
    assert [s.token for s in stopped.steps] == [s.token for s in free.steps[:2]]
    assert stopped.ledger["stopped"] == {"reason": "eos", "token": eos}
    report = verify_bundle(tmp_path / "out")
    assert report.failed == ["non-perturbation"], report.format()  # a --no-prove run carries no proof
    ignored = execute(load_plan(str(_write(tmp_path / "ignored.yaml", ckpt, ignore_eos=True))), prove=False,
                      echo=_quiet, progress=False)  # fmt: skip
    assert [s.token for s in ignored.steps] == [s.token for s in free.steps]
    assert ignored.ledger["stopped"] == {"reason": "max_new_tokens"} and ignored.ledger["run"]["stop"]["tokens"] == []


def test_a_sampled_run_resumes_to_the_same_tokens(tiny_checkpoints, tmp_path):
    plan = load_plan(str(_write(tmp_path / "m.yaml", tiny_checkpoints["kimi-k2.5"])))
    whole = run_steps(plan, keep_capture=False)
    resumed = run_steps(plan, keep_capture=False, done=whole[:2], caches=whole[1].caches)
    assert [s.token for s in resumed] == [s.token for s in whole]


def test_anchors_cover_sampled_runs(tiny_checkpoints, tmp_path):
    manifest = _write(tmp_path / "m.yaml", tiny_checkpoints["kimi-k2.5"], max_new_tokens=1)  # the shapes of freeze
    data = yaml.safe_load(manifest.read_text()) | {"anchor": "anchor.json"}
    manifest.write_text(yaml.safe_dump(data))
    frozen = CliRunner().invoke(main, ["anchor", "freeze", str(manifest)])
    assert frozen.exit_code == 0, frozen.output
    anchor = json.loads((tmp_path / "anchor.json").read_text())
    assert anchor["sampling"] == {**SAMPLING, "min_p": 0.0}
    outcome = execute(load_plan(str(manifest)), prove=False, echo=_quiet, progress=False)
    assert outcome.ledger["anchor"]["status"] == "matched" and outcome.steps[0].token == anchor["token"]
    with pytest.raises(AnchorMismatch, match=r"frozen for a different run:\n  sampling: anchor"):
        execute(load_plan(str(manifest), ["generate.sampling.seed=9"]), prove=False, echo=_quiet, progress=False)


def test_text_settings_are_checked_against_the_checkpoint_before_compute(tiny_checkpoints, tmp_path):
    from kimi_jax.errors import ManifestError

    def plan(ckpt, prompt, **generate):
        path = tmp_path / "m.yaml"
        path.write_text(yaml.safe_dump({"version": 1, "model": {"checkpoint": str(ckpt)}, "prompt": prompt,
                                        "generate": {"max_new_tokens": 2, **generate}, "output": {"dir": "out"}}))
        return load_plan(str(path))

    no_tokenizer = tiny_checkpoints["deepseek-v3"]
    with pytest.raises(ManifestError, match=r"m.yaml:\d+: prompt.chat: the checkpoint .* ships no tokenizer"):
        plan(no_tokenizer, {"chat": CHAT})
    with pytest.raises(ManifestError, match=r"m.yaml:\d+: generate.stop: stop strings need the generated text, but the "
                                            r"checkpoint .* ships no tokenizer"):  # fmt: skip
        plan(no_tokenizer, {"tokens": [1, 2]}, stop=["x"])
    with pytest.raises(ManifestError, match=r"m.yaml:\d+: prompt.chat: .*chat_template.jinja: the chat template "
                                            r"failed: TemplateError: role must be system, user or assistant, got "
                                            r"tool"):  # fmt: skip
        plan(tiny_checkpoints["kimi-k2.5"], {"chat": [{"role": "tool", "content": "{}"}]})
    eos = json.loads((no_tokenizer / "config.json").read_text())["eos_token_id"]
    assert plan(no_tokenizer, {"tokens": [1, 2]}).decoding.stop_tokens == ((eos, "eos"),)  # config.json's alone


def test_text_run_on_a_tokenizer_json_checkpoint(tiny_checkpoints, tmp_path):
    """A DeepSeek-style checkpoint that ships tokenizer.json (byte-level BPE): the text path as before,
    now recorded in the ledger and re-derived by verify from the bundled copy."""
    tokenizers = pytest.importorskip("tokenizers")
    ckpt = shutil.copytree(tiny_checkpoints["hf-bf16"], tmp_path / "ckpt")
    hf = tokenizers.Tokenizer(tokenizers.models.BPE())
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = tokenizers.decoders.ByteLevel()
    alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>"], initial_alphabet=alphabet)
    hf.train_from_iterator(["Tell me a short story about a cat. The cat sat on the mat."] * 20, trainer)
    hf.save(str(ckpt / "tokenizer.json"))
    data = {"version": 1, "model": {"checkpoint": str(ckpt)}, "prompt": {"text": "a short story"},
            "generate": {"max_new_tokens": 2}, "output": {"dir": str(tmp_path / "out")}}  # fmt: skip
    outcome = execute(prepare_run(parse_manifest_dict(data)), echo=_quiet, progress=False)
    assert outcome.ledger["run"]["prompt"] == hf.encode("a short story").ids
    assert outcome.ledger["checkpoint"]["tokenizer"]["kind"] == "tokenizer.json"
    report = verify_bundle(tmp_path / "out")
    assert report.ok and report.status("text") == "OK", report.format()
