"""Runs mesh jobs in a fresh process, where XLA_FLAGS can still give JAX 8 CPU devices.

``python tests/mesh_worker.py JOBS_JSON`` prints one JSON line per job. The flag must be set
before JAX initialises its CPU backend, which the test process itself has long done; one worker
runs many jobs, so the start-up cost is paid once.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

# JAX is imported after XLA_FLAGS is set, on purpose
import jax
import numpy as np

from kimi_jax.ledger.ledger import step_identity
from kimi_jax.model.engine import Engine
from kimi_jax.model.mesh import MeshError, MeshShape, build_mesh, host_value
from kimi_jax.model.params import expert_stack
from kimi_jax.model.placement import MeshReads
from kimi_jax.model.slots import deal_expert_slots
from kimi_jax.model.weights import WeightPolicy
from kimi_jax.storage.checkpoint import open_checkpoint
from kimi_jax.storage.reader import ShardReader


def leaves_bytes(tree) -> list[tuple[str, bytes]]:
    return [(str(np.asarray(host_value(a)).dtype), np.asarray(host_value(a)).tobytes())
            for a in jax.tree_util.tree_leaves(tree)]  # fmt: skip


def placement_reads(ckpt: str, expert: int, model: int) -> dict:
    """Every weight of every layer, the head and one expert stack read through the mesh equal the
    single-device read bit for bit; the mesh read exactly the same bytes."""
    index = open_checkpoint(ckpt)
    cfg = index.config
    mesh = build_mesh(MeshShape(expert, model))
    single, meshed = ShardReader(), ShardReader()
    policy = WeightPolicy()
    reads = MeshReads(index, mesh, meshed, np.float32, policy)
    mismatched = []
    for layer in range(cfg.num_hidden_layers):
        entries = index.layers[layer].base
        want = single.read_weights(entries.values(), layer)
        got = reads.assemble(reads.stage_weights(entries, layer, lambda tensors: tensors))
        for e in entries.values():
            if leaves_bytes(policy.decode(e, want[e.name], index)) != leaves_bytes(got[e.name]):
                mismatched.append(e.name)
    layer = next(i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i))
    picked = np.array([[3, 7, 1, 12], [7, 2, 1, 9]])
    stack_ids, slots = deal_expert_slots(picked, cfg.n_routed_experts, mesh.size)
    stack = reads.expert_stack(layer, stack_ids)
    distinct = sorted({int(e) for e in picked.ravel()})
    entries = [w for e in distinct for w in index.layers[layer].experts[e].values()]
    parts = single.read_weights(entries, layer)
    tensors = {w.name: policy.decode(w, parts[w.name], index) for w in entries}
    got = [(dtype, np.frombuffer(raw, np.uint8)) for dtype, raw in leaves_bytes(stack)]
    for slot, picked_expert in enumerate(stack_ids):
        if picked_expert is None:
            continue
        one = leaves_bytes(expert_stack(cfg, layer, [picked_expert], tensors))
        per_slot = [raw.reshape(len(stack_ids), -1)[slot].tobytes() for _, raw in got]
        if [raw for _, raw in one] != per_slot:
            mismatched.append(f"layers.{layer}.mlp.experts.{picked_expert}")
    empty_zero = all(not raw.reshape(len(stack_ids), -1)[s].any() for s, e in enumerate(stack_ids) if e is None
                     for _, raw in got)  # fmt: skip
    return {"mismatched": mismatched, "single_bytes": single.run.total, "mesh_bytes": meshed.run.total,
            "empty_slots_zero": empty_zero,
            "slots_point_at_picks": all(stack_ids[s] == e for s, e in zip(slots.ravel(), picked.ravel())),
            "specs": sorted({str(a.sharding.spec) for a in jax.tree_util.tree_leaves(stack)})}  # fmt: skip


def mesh_mismatch(expert: int, model: int) -> dict:
    try:
        build_mesh(MeshShape(expert, model))
    except MeshError as e:
        return {"error": str(e)}
    return {"error": None}


def generate(ckpt: str, steps: int, kv_cache: bool, mesh: MeshShape | None, **engine_args):
    with Engine(open_checkpoint(ckpt), mesh=mesh, **engine_args) as engine:
        return engine.generate([5, 9, 400], steps, kv_cache=kv_cache)


def settings_on_meshes(ckpt: str, matmul: str, meshes: list[list]) -> dict:
    """One device and each mesh ``[expert, model]`` with the same residency budget (every layer's
    non-expert weights and the head kept) and ``matmul``: tokens, logit difference, bytes by source."""
    from kimi_jax.storage.residency import plan_residency

    index = open_checkpoint(ckpt)
    budget = plan_residency(index, 1 << 40).pinned_bytes  # the bases and the head, no experts

    def run(mesh):
        steps = generate(ckpt, 4, True, mesh, matmul=matmul, residency=plan_residency(index, budget))
        return {"tokens": [s.token for s in steps], "used": [s.bytes_read for s in steps],
                "from_memory": [s.io.from_memory for s in steps], "from_storage": [s.io.from_storage for s in steps],
                "logits": [s.logits for s in steps]}  # fmt: skip

    one = run(None)
    out = {"one": {k: v for k, v in one.items() if k != "logits"}, "meshes": []}
    for expert, model in meshes:
        got = run(MeshShape(expert, model))
        diff = max(float(np.abs(a - b).max()) for a, b in zip(one["logits"], got.pop("logits")))
        out["meshes"].append({"mesh": [expert, model], "max_abs_logit_diff": diff, **got})
    return out


def tokens_on_meshes(ckpt: str, steps: int, kv_cache: bool, meshes: list[list], repeat: bool = False) -> dict:
    """Greedy decoding on one device and on each mesh ``[expert, model, placement]``: tokens, the
    largest logit difference, bytes; with ``repeat``, the first mesh runs twice (same-mesh digests)."""
    one = generate(ckpt, steps, kv_cache, None)
    out = {"tokens": [s.token for s in one], "meshes": []}
    for expert, model, placement in meshes:
        got = generate(ckpt, steps, kv_cache, MeshShape(expert, model, placement))
        out["meshes"].append({
            "mesh": [expert, model, placement], "tokens": [s.token for s in got],
            "max_abs_logit_diff": max(float(np.abs(a.logits - b.logits).max()) for a, b in zip(one, got)),
            "max_abs_logit": max(float(np.abs(a.logits).max()) for a in one),
            "bytes": [s.bytes_read for s in got], "one_device_bytes": [s.bytes_read for s in one],
            "from_storage": [s.io.from_storage for s in got],
            "bytes_per_process": [s.bytes_per_process for s in got],
            "layer_bytes_sum": all(sum(r.bytes_read for r in s.layers) + s.bytes_per_layer.get(None, 0) == s.bytes_read
                                   for s in got),
        })  # fmt: skip
    if repeat:
        expert, model, placement = meshes[0]
        first = [step_identity(s) for s in generate(ckpt, steps, kv_cache, MeshShape(expert, model, placement))]
        again = [step_identity(s) for s in generate(ckpt, steps, kv_cache, MeshShape(expert, model, placement))]
        out["same_mesh_identical"] = first == again
    return out


def digests_on_a_mesh(ckpt: str, meshes: list[list]) -> dict:
    """Each step's weights digest (every tensor checked against the digest file as it is read) on one
    device and on each mesh ``[expert, model, placement]`` of this one process."""
    from kimi_jax.storage.digests import DIGEST_FILE, load_digest_file

    def digests(mesh):
        reader = ShardReader(digests=load_digest_file(Path(ckpt) / DIGEST_FILE))
        with Engine(open_checkpoint(ckpt), mesh=mesh, reader=reader) as engine:
            steps = engine.generate([5, 9, 400], 3, kv_cache=True)
        return [s.storage["weights_digest"] for s in steps]

    return {"one": digests(None), "meshes": [digests(MeshShape(*m)) for m in meshes]}


def prompts_on_a_mesh(ckpt: str, meshes: list[list]) -> dict:
    """Three prompts decoded together and one prompt with drafts, on one device and on each mesh
    ``[expert, model, placement]``: tokens of each, and the largest logit difference from one device."""
    from kimi_jax.model.batch import generate_batch
    from kimi_jax.model.drafts import generate_with_drafts

    prompts = [[5, 9, 400], [7], [300, 5]]
    repeating = [5, 9, 5, 9, 5]

    def draft(context, n):  # drafts every pass (prompt lookup needs the model to repeat itself)
        return [context[-2], context[-1]][:n]

    def run(mesh):
        with Engine(open_checkpoint(ckpt), mesh=mesh) as engine:
            batch, passes = generate_batch(engine, prompts, 3)
        with Engine(open_checkpoint(ckpt), mesh=mesh) as engine:
            drafted, verifications = generate_with_drafts(engine, repeating, 4, 2, draft=draft)
        return ([[s.token for s in own] for own in batch] + [[s.token for s in drafted]],
                [np.asarray(s.logits) for own in batch for s in own], len(passes), sum(len(v.drafted) for v in verifications))

    one = run(None)
    out = {"one": one[0], "one_passes": one[2], "one_drafted": one[3], "meshes": []}
    for m in meshes:
        tokens, logits, passes, drafted = run(MeshShape(*m))
        worst = max(float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-9)) for a, b in zip(logits, one[1]))
        out["meshes"].append({"tokens": tokens, "passes": passes, "drafted": drafted, "logits_rel": worst})
    return out


JOBS = {"prompts_on_a_mesh": prompts_on_a_mesh, "placement_reads": placement_reads, "digests_on_a_mesh": digests_on_a_mesh, "mesh_mismatch": mesh_mismatch, "tokens_on_meshes": tokens_on_meshes,
        "settings_on_meshes": settings_on_meshes}

if __name__ == "__main__":
    for job in json.loads(sys.argv[1]):
        name, kwargs = job["job"], job.get("args", {})
        print(json.dumps({"job": name, "args": kwargs, "result": JOBS[name](**kwargs)}), flush=True)
