"""Drafts from a multi-token-prediction layer (generate.drafts.method: mtp).

The oracle is transformers: its DeepseekV3 model gives the main model's normed hidden states, its
DeepseekV3DecoderLayer (built at index num_hidden_layers, loaded with the MTP layer's weights as
the checkpoint stores them, FP8 blocks dequantized here) runs the MTP block, and the MTP formula
around it (eh_proj of [enorm(embed(next token)); hnorm(hidden)], shared_head's norm and head) is
written out below. Then: drafts never change a token (greedy and seeded runs equal plain
decoding), the ledger records what drafting cost, and checkpoints without an MTP layer are refused
by name."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer

from kimi_jax.errors import ManifestError
from kimi_jax.manifest import parse_manifest_dict
from kimi_jax.model.drafts import generate_with_drafts
from kimi_jax.model.engine import Engine
from kimi_jax.model.mtp import MTPDrafter
from kimi_jax.run.plan import prepare_run
from kimi_jax.run.runner import execute, run_steps
from kimi_jax.storage.checkpoint import open_checkpoint
from kimi_jax.verify.checklist import verify_bundle
from tests import hf_oracle, hostile
from tests.test_engine_parity import _load_into, _write

PROMPT = [3, 17, 42, 99, 5, 17, 42]
V3 = dict(num_hidden_layers=3, first_k_dense_replace=1, n_group=2, topk_group=1)


def _mtp_tensors(ckpt, layer: int) -> dict[str, torch.Tensor]:
    """The MTP layer's tensors as stored, FP8 blocks dequantized (float32 of fp8 times the block's
    scale_inv), under names relative to the layer."""
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    prefix = f"model.layers.{layer}."
    raw = {}
    for name, shard in index.items():
        if name.startswith(prefix):
            with safe_open(ckpt / shard, "pt") as f:
                raw[name[len(prefix):]] = f.get_tensor(name)
    out = {}
    for name, t in raw.items():
        if name.endswith("weight_scale_inv") or name.endswith("inv_freq"):
            continue
        if t.dtype == torch.float8_e4m3fn:
            s = raw[name.removesuffix("weight") + "weight_scale_inv"]
            s = s.repeat_interleave(128, 0)[: t.shape[0]].repeat_interleave(128, 1)[:, : t.shape[1]]
            out[name] = t.to(torch.float32) * s
        else:
            out[name] = t.to(torch.float32)
    return out


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@torch.no_grad()
def _oracle_mtp_logits(model, ckpt, prompt: list[int], token0: int, draft1: int) -> tuple[np.ndarray, np.ndarray]:
    """The MTP head's logits for the first draft (rows 0..P-1: the main model's hidden state at i and
    the token at i + 1, the last one the step-0 token) and for the second (row P: the MTP layer's
    own output at P-1 and the first draft)."""
    cfg = model.config
    n, eps = cfg.num_hidden_layers, cfg.rms_norm_eps
    t = _mtp_tensors(ckpt, n)
    ids = torch.tensor([prompt])
    hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state[0]  # after the final norm
    layer_cfg = DeepseekV3Config(**{**cfg.to_dict(), "num_hidden_layers": n + 1})
    layer_cfg._attn_implementation = "eager"
    block = DeepseekV3DecoderLayer(layer_cfg, layer_idx=n).eval().float()
    state = {}
    for key in block.state_dict():
        if key == "mlp.experts.gate_up_proj":
            state[key] = torch.stack([torch.cat([t[f"mlp.experts.{e}.gate_proj.weight"], t[f"mlp.experts.{e}.up_proj.weight"]])
                                      for e in range(cfg.n_routed_experts)])  # fmt: skip
        elif key == "mlp.experts.down_proj":
            state[key] = torch.stack([t[f"mlp.experts.{e}.down_proj.weight"] for e in range(cfg.n_routed_experts)])
        else:
            state[key] = t[key]
    block.load_state_dict(state)
    rotary = model.model.rotary_emb

    def run(x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        pos = torch.arange(rows)[None]
        mask = torch.full((rows, rows), float("-inf")).triu(1)[None, None]
        return block(x[None], attention_mask=mask, position_ids=pos, position_embeddings=rotary(x[None], pos))[0]

    def inputs(tokens: list[int], h: torch.Tensor) -> torch.Tensor:
        emb = t["embed_tokens.weight"][torch.tensor(tokens)]
        return torch.cat([_rms(emb, t["enorm.weight"], eps), _rms(h, t["hnorm.weight"], eps)], -1) @ t["eh_proj.weight"].T

    def head(x: torch.Tensor) -> np.ndarray:
        return (_rms(x, t["shared_head.norm.weight"], eps) @ t["shared_head.head.weight"].T).numpy()

    rows = inputs([*prompt[1:], token0], hidden)
    out = run(rows)
    chained = torch.cat([rows, inputs([draft1], out[-1:])])
    return head(out[-1]), head(run(chained)[-1])


def test_mtp_drafts_match_transformers_decoder_layer_and_the_formula(tmp_path):
    model = hf_oracle.build(7, **V3)
    ckpt, stored = _write(tmp_path, "deepseek-v3", model)
    _load_into(model, stored)  # the main model as the checkpoint stores it (FP8 dequantized)
    index = open_checkpoint(ckpt)
    assert index.mtp is not None and index.mtp.layer.index == 3 and index.mtp.layer.kind == "moe"
    with Engine(index) as engine:
        drafter = MTPDrafter(engine, len(PROMPT) + 8)
        steps, passes = generate_with_drafts(engine, PROMPT, 4, 2, draft=drafter, max_passes=1)
        first, second = drafter.last_logits
    want_first, want_second = _oracle_mtp_logits(model, ckpt, PROMPT, steps[0].token, passes[0].drafted[0])
    assert passes[0].drafted[0] == int(np.argmax(want_first))
    np.testing.assert_allclose(first, want_first, rtol=0, atol=1e-4 * float(np.abs(want_first).max()))
    np.testing.assert_allclose(second, want_second, rtol=0, atol=1e-4 * float(np.abs(want_second).max()))
    assert float(np.abs(first - second).max()) > 1e-2  # the chained row is not the first row again
    cost = passes[0].draft_cost
    assert cost.passes == 2 and cost.io.used > 0
    # the first proposal read the layer's weights (inputs, base, head) and the experts it picked
    assert cost.io.from_storage >= index.mtp.layer.base_bytes + sum(w.nbytes for w in index.mtp.head.values())


def _plan(tmp_path, ckpt, name, **generate):
    data = {"version": 1, "model": {"checkpoint": str(ckpt)}, "prompt": {"tokens": PROMPT},
            "generate": {"max_new_tokens": 7, **generate}, "output": {"dir": str(tmp_path / name)}}  # fmt: skip
    return prepare_run(parse_manifest_dict(data, source=str(tmp_path / f"{name}.yaml")))


@pytest.mark.parametrize("sampling", [None, {"temperature": 0.9, "seed": 5}])
def test_mtp_drafted_runs_make_plain_decodings_tokens_and_record_what_drafting_cost(tiny_checkpoints, tmp_path,
                                                                                     sampling):  # fmt: skip
    ckpt = tiny_checkpoints["deepseek-v3"]
    extra = {} if sampling is None else {"sampling": sampling}
    plain = run_steps(_plan(tmp_path, ckpt, "plain", **extra))
    outcome = execute(_plan(tmp_path, ckpt, "mtp", drafts={"method": "mtp", "tokens": 3}, **extra),
                      echo=lambda *_: None, progress=False)  # fmt: skip
    ledger = outcome.ledger
    (seq,) = ledger["sequences"]
    assert [s["token"] for s in seq["steps"]] == [s.token for s in plain]
    verifications = [p for p in ledger["passes"] if "drafted" in p]
    drafting = [p for p in verifications if p["drafted"]]
    assert drafting and all(p["draft_passes"] == len(p["drafted"]) and p["draft_bytes_used"] > 0 for p in drafting)
    assert drafting[0]["draft_bytes_from_storage"] > 0  # the first proposal reads the layer
    totals = ledger["totals"]
    assert totals["bytes_used"] == sum(p["bytes_used"] + p.get("draft_bytes_used", 0) for p in ledger["passes"])
    assert totals["bytes_used"] > sum(p["bytes_used"] for p in ledger["passes"])
    report = verify_bundle(outcome.ledger_path.parent)
    assert report.ok, [c.line() for c in report.checks if c.status == "FAILED"]


def test_mtp_drafts_are_refused_without_an_mtp_layer_or_on_a_mesh(tiny_checkpoints, tmp_path):
    with pytest.raises(ManifestError, match=r"generate\.drafts\.method: mtp drafts .* ships none"):
        _plan(tmp_path, tiny_checkpoints["kimi-k2.5"], "x", drafts={"method": "mtp", "tokens": 2})
    data = {"version": 1, "model": {"checkpoint": str(tiny_checkpoints["deepseek-v3"])}, "prompt": {"tokens": PROMPT},
            "compute": {"mesh": {"expert": 1, "model": 1}}, "generate": {"drafts": {"method": "mtp"}},
            "output": {"dir": str(tmp_path / "m")}}  # fmt: skip
    with pytest.raises(ManifestError, match=r"generate\.drafts\.method: mtp drafts run on one device"):
        prepare_run(parse_manifest_dict(data, source=str(tmp_path / "m.yaml")))
    index = open_checkpoint(tiny_checkpoints["kimi-k2.5"])
    assert index.mtp is None
    v3 = open_checkpoint(tiny_checkpoints["deepseek-v3"])
    # the MTP layer is not part of what a plain run reads or of the tensor list's identity
    assert v3.mtp is not None and not any(n.startswith(f"layers.{v3.config.num_hidden_layers}.") for n in v3.weights)


def test_an_incomplete_mtp_layer_is_skipped_with_why_and_refused_by_name(tiny_checkpoints, tmp_path):
    """A stranger's MTP layer with a tensor under another expert's name: the checkpoint still runs
    (the layer is only for drafts), the index says why it cannot draft, and mtp drafts are refused."""
    src = tiny_checkpoints["deepseek-v3"]
    folder = hostile.checkpoint_like(src, tmp_path / "ckpt")
    weight_map = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    victim = "model.layers.4.mlp.experts.3.down_proj.weight"
    shard = weight_map[victim]
    header, body = hostile.read_header(src / shard)
    header[victim.replace("experts.3.", "experts.99.")] = header.pop(victim)
    hostile.write_shard_raw(folder / shard, header, body)
    hostile._rewrite_index(folder, lambda raw: raw["weight_map"].__setitem__(
        victim.replace("experts.3.", "experts.99."), raw["weight_map"].pop(victim)))  # fmt: skip
    index = open_checkpoint(folder)
    assert index.mtp is None
    reasons = {reason for name, reason in index.skipped if name.startswith("model.layers.4.")}
    assert len(reasons) == 1 and "cannot draft" in reasons.pop()
    with pytest.raises(ManifestError, match=r"generate\.drafts\.method: .* has an unusable one: .*expert"):
        _plan(tmp_path, folder, "x", drafts={"method": "mtp", "tokens": 2})
    plain = run_steps(_plan(tmp_path, folder, "plain"))  # a plain run never reads the layer
    assert len(plain) == 7
