"""Checks 7-9 of verify, on what the run recorded about itself: the anchor it matched, the
continuity of its steps (contexts, layers, byte accounting, stop rules), and the proof that
capture did not perturb it. Each takes the loaded bundle and returns a note (OK), or raises
:class:`CheckFailed` / :class:`CheckSkipped` with the reason."""

from __future__ import annotations

from typing import Any, Callable

import blake3

from kimi_jax.fileio import read_regular
from kimi_jax.ledger.anchor_record import ANCHOR_VERSION, ANCHORED, condition_differences
from kimi_jax.ledger.bundle import MAX_JSON_BYTES
from kimi_jax.ledger.text_fields import decoding_from_ledger
from kimi_jax.platform_info import mesh_label
from kimi_jax.settings import PROOF_SCOPES, PROVE_ALL, PROVE_FIRST
from kimi_jax.storage.codecs import LEGACY_DEQUANT_NOTE, recorded_dequant
from kimi_jax.storage.digests import identity_differences, recorded_checkpoint
from kimi_jax.verify.bundle_view import BundleView
from kimi_jax.verify.report import CheckFailed, CheckSkipped, first_list_difference, join_problems, require, short

__all__ = ["NP_FIELDS", "check_anchor", "check_continuity", "check_non_perturbation"]

NP_FIELDS = ("token", "hidden_digest", "logits_digest", "bytes_read")


def check_anchor(b: BundleView) -> str:
    ledger = b.ledger
    record = ledger.get("anchor")
    if not b.has("anchor.json"):
        if record is None:
            raise CheckSkipped("the bundle carries no anchor (no anchor.json, ledger.anchor is null)")
        raise CheckFailed(f"anchor.json: missing, but ledger.json anchor records a matched anchor ({short(record)})")
    if not isinstance(record, dict):
        raise CheckFailed("anchor.json is present but ledger.json anchor is null; the run did not check it")
    anchor = b.json("anchor.json")
    if not isinstance(anchor, dict):
        raise CheckFailed("anchor.json: expected a JSON object")
    problems = []
    if anchor.get("anchor_version") != ANCHOR_VERSION:
        problems.append(f"anchor.json: anchor_version is {short(anchor.get('anchor_version'))}, "
                        f"expected {ANCHOR_VERSION}" + (f" (a version-1 anchor was computed with dequantization "
                                                        f"{LEGACY_DEQUANT_NOTE})" if anchor.get("anchor_version") == 1
                                                        else ""))  # fmt: skip
    steps = b.steps()
    if not steps:
        raise CheckFailed("ledger.json: steps: empty; step 0 is compared with the anchor")
    step0 = steps[0]
    for field in ANCHORED:
        if field not in anchor:
            problems.append(f"anchor.json: {field}: missing")
        elif anchor[field] != step0.get(field):
            problems.append(f"steps[0].{field} is {short(step0.get(field))}, anchor.json has {short(anchor[field])}")
    ckpt = ledger.get("checkpoint") or {}
    run = ledger.get("run") or {}
    want = {"prompt": run.get("prompt"), "dtype": run.get("dtype"), "dequant": recorded_dequant(run.get("dequant")),
            "kv_cache": run.get("kv_cache"), "sampling": run.get("sampling")}  # fmt: skip
    mesh = run.get("mesh")
    if isinstance(mesh, dict) or "mesh" in anchor:  # an anchor frozen on a mesh, or a mesh run's bundle
        want["mesh"] = mesh_label(mesh["expert"], mesh["model"], mesh["placement"]) if isinstance(mesh, dict) else None
    problems += [f"anchor.json was frozen for a different run: {d}" for d in condition_differences(anchor, want)]
    frozen = anchor.get("checkpoint") if isinstance(anchor.get("checkpoint"), dict) else {}
    for key in identity_differences(frozen, ckpt):
        problems.append(f"anchor.json: checkpoint.{key} is {short(frozen.get(key))}, this run's is {short(ckpt.get(key))}")
    digest = blake3.blake3(read_regular(b.root / "anchor.json", MAX_JSON_BYTES, "anchor.json")).hexdigest()
    if record.get("anchor_digest") != digest:
        problems.append(f"ledger.json anchor.anchor_digest is {short(record.get('anchor_digest'))}, but "
                        f"BLAKE3(anchor.json) is {digest}")  # fmt: skip
    if record.get("status") != "matched":
        problems.append(f"ledger.json anchor.status is {short(record.get('status'))}, expected 'matched'")
    require(problems)
    return ""


def check_continuity(b: BundleView) -> str:
    ledger = b.ledger
    steps = b.steps()
    run = ledger.get("run") or {}
    prompt = run.get("prompt")
    problems = []
    if not steps:
        raise CheckFailed("ledger.json: steps: empty")
    problems += _stop_problems(b, steps, run)
    layer_plan: list[tuple[Any, Any]] | None = None
    outside, note = _embedding_head_bytes(ledger)
    processes = (run.get("mesh") or {}).get("process_count", 1)
    for n, step in enumerate(steps):
        if step.get("index") != n:
            problems.append(f"steps[{n}].index is {short(step.get('index'))}, expected {n}")
        context = step.get("context")
        if n == 0:
            if context != prompt:
                problems.append(f"steps[0].context {short(context)} is not run.prompt {short(prompt)}")
        else:
            prev = steps[n - 1]
            want = (prev.get("context") or []) + [prev.get("token")] if isinstance(prev.get("context"), list) else None
            if context != want:
                problems.append(f"steps[{n}].context {short(context)} is not steps[{n - 1}].context + "
                                f"[steps[{n - 1}].token] = {short(want)}")  # fmt: skip
        layers = step.get("layers") or []
        indices = [layer.get("layer") for layer in layers]
        if indices != list(range(len(layers))):
            problems.append(f"steps[{n}].layers: layer indices are {short(indices)}, expected 0..{len(layers) - 1}")
        plan = [(layer.get("layer"), layer.get("kind")) for layer in layers]
        if layer_plan is None:
            layer_plan = plan
        elif plan != layer_plan:
            problems.append(f"steps[{n}].layers: layers/kinds {short(plan)} differ from steps[0]'s "
                            f"{short(layer_plan)}")
        problems.extend(_byte_source_problems(n, step, layers))
        layer_bytes = sum(int(layer.get("bytes_read") or 0) for layer in layers)
        step_bytes = step.get("bytes_read")
        if not isinstance(step_bytes, int) or step_bytes < layer_bytes:
            problems.append(f"steps[{n}].bytes_read is {short(step_bytes)}, less than the sum of its layers' "
                            f"bytes_read ({layer_bytes}); it also counts embedding rows and the head")  # fmt: skip
        elif outside is not None and isinstance(context, list):
            extra = outside(n, context)
            if step_bytes != layer_bytes + extra:
                problems.append(f"steps[{n}].bytes_read is {step_bytes}, expected {layer_bytes + extra}: its layers' "
                                f"{layer_bytes} plus {extra} for embedding rows and the head")  # fmt: skip
        problems += _per_process_problems(f"steps[{n}]", step, processes)
        for layer in layers:
            problems += _per_process_problems(f"steps[{n}].layers[{layer.get('layer')}]", layer, processes)
    total = sum(int(s.get("bytes_read") or 0) for s in steps)
    totals = ledger.get("totals") or {}
    recorded = totals.get("bytes_read")
    if recorded != total:
        problems.append(f"totals.bytes_read is {short(recorded)}, but the steps' bytes_read sum to {total}")
    columns = [sum(col) for col in zip(*(s.get("bytes_per_process") or [] for s in steps))]
    if "bytes_per_process" in totals and totals.get("bytes_per_process") != columns:
        problems.append(f"totals.bytes_per_process is {short(totals.get('bytes_per_process'))}, but the steps' "
                        f"bytes_per_process sum to {columns}")  # fmt: skip
    require(problems)
    return note


SERVED_FROM = ("bytes_from_memory", "bytes_from_storage", "bytes_from_speculation")
READ_ASIDE = ("bytes_mispredicted", "bytes_preloaded", "bytes_overread")


def _byte_source_problems(n: int, step: dict[str, Any], layers: list[dict[str, Any]]) -> list[str]:
    """Version 2: every byte used was served from exactly one source, layer by layer and per step (the
    step adds the embedding rows and head to its layers); counts of experts are subsets of each other."""
    problems = []
    for where, entry in [(f"steps[{n}]", step)] + [(f"steps[{n}].layers[{i}]", layer) for i, layer in enumerate(layers)]:
        if not all(isinstance(entry.get(k), int) for k in SERVED_FROM):
            continue  # a version 1 ledger
        served = sum(entry[k] for k in SERVED_FROM)
        if served != entry.get("bytes_read"):
            problems.append(f"{where}: bytes_from_memory + bytes_from_storage + bytes_from_speculation = {served}, "
                            f"but bytes_read is {short(entry.get('bytes_read'))}")  # fmt: skip
        for part, whole in (("experts_from_memory", "experts_used"), ("experts_predicted_used", "experts_predicted"),
                            ("experts_predicted_used", "experts_used")):  # fmt: skip
            if isinstance(entry.get(part), int) and entry[part] > int(entry.get(whole) or 0):
                problems.append(f"{where}: {part} {entry[part]} exceeds {whole} {short(entry.get(whole))}")
    for key in SERVED_FROM + READ_ASIDE:
        if isinstance(step.get(key), int):
            in_layers = sum(int(layer.get(key) or 0) for layer in layers)
            if step[key] < in_layers:
                problems.append(f"steps[{n}].{key} is {step[key]}, less than its layers' sum {in_layers}")
    return problems


def _stop_problems(b: BundleView, steps: list[dict[str, Any]], run: dict[str, Any]) -> list[str]:
    """The run ended where its stop rules (run.stop, the token budget) say, and ``stopped`` says why."""
    budget, stopped = run.get("max_new_tokens"), b.ledger.get("stopped") or {}
    if not isinstance(budget, int) or len(steps) > budget:
        return [f"run.max_new_tokens is {short(budget)}, but the ledger has {len(steps)} steps"]
    tokenizer = None
    if (run.get("stop") or {}).get("strings"):
        try:
            tokenizer = b.tokenizer()
        except CheckFailed as e:
            return [f"stop strings not checked: {e}"]
    decoding = decoding_from_ledger(b.ledger, tokenizer)
    tokens = [s.get("token") for s in steps]
    problems = [f"steps[{n}]: the run should have stopped here ({decoding.stop_reason(tokens[: n + 1])})"
                for n in range(len(tokens) - 1) if decoding.stop_reason(tokens[: n + 1])]  # fmt: skip
    want = decoding.final_reason(tokens)
    if len(steps) < budget and want["reason"] == "max_new_tokens":
        problems.append(f"the ledger has {len(steps)} steps, fewer than run.max_new_tokens {budget}, and no stop rule "
                        "holds at the last one")  # fmt: skip
    if stopped != want:
        problems.append(f"stopped is {short(stopped)}, but the stop rules give {short(want)}")
    return problems


def _per_process_problems(where: str, record: dict[str, Any], processes: int) -> list[str]:
    """A step's or layer's bytes_per_process: one count per process of the run, summing to what was
    read from storage (``bytes_from_storage``; ``bytes_read`` in a ledger without the split)."""
    counts = record.get("bytes_per_process")
    if counts is None and processes == 1:
        return []  # a ledger that does not itemise processes: one process read everything
    if not isinstance(counts, list) or len(counts) != processes:
        return [f"{where}.bytes_per_process is {short(counts)}, expected one count for each of the {processes} process(es)"]
    field = "bytes_from_storage" if "bytes_from_storage" in record else "bytes_read"
    if sum(counts) != record.get(field):
        return [f"{where}.bytes_per_process {short(counts)} sums to {sum(counts)}, but {field} is "
                f"{short(record.get(field))}"]  # fmt: skip
    return []


def _embedding_head_bytes(ledger: dict[str, Any]) -> tuple[Callable[[int, list], int] | None, str]:
    """Bytes a step reads outside the decoder layers (the embedding rows of the distinct input tokens of
    its forward pass, the final norm and the head), when the ledger's checkpoint is on disk with the
    recorded identity; otherwise (None, note) and only ``bytes_read >= sum of layers`` is checked."""
    index, why = recorded_checkpoint(ledger.get("checkpoint"))
    if index is None:
        return None, (f"embedding and head bytes not itemised: {why}, so each step was only checked to read at least "
                      "its layers' bytes")  # fmt: skip
    row = index.embed_row_bytes()
    head = sum(w.nbytes for w in index.head.values())
    kv_cache = bool((ledger.get("run") or {}).get("kv_cache"))

    def outside(n: int, context: list) -> int:
        tokens = context[-1:] if kv_cache and n > 0 else context
        return len(set(tokens)) * row + head

    return outside, ""


def check_non_perturbation(b: BundleView) -> str:
    """The proof is present, agrees with the ledger, and shows bare == instrumented == the ledger's own
    steps over its scope: step 0 (``first``) or every step (``all``; a ledger written before scopes
    existed proved every step). The note says which steps were proven."""
    if not b.has("non_perturbation.json"):
        raise CheckFailed("non_perturbation.json: missing; the bundle carries no proof that capture did not perturb the "
                    "run (a --no-prove run?)")  # fmt: skip
    proof = b.json("non_perturbation.json")
    ledger = b.ledger
    problems = []
    if ledger.get("non_perturbation") != proof:
        problems.append("non_perturbation.json differs from ledger.json non_perturbation")
    if not isinstance(proof, dict):
        raise CheckFailed(join_problems([*problems, "non_perturbation.json: expected an object with compared, bare, instrumented, "
                                      "identical"]))  # fmt: skip
    if proof.get("identical") is not True:
        problems.append(f"non_perturbation.json: identical is {short(proof.get('identical'))}, expected true")
    compared = proof.get("compared")
    if not isinstance(compared, list) or not set(NP_FIELDS) <= set(compared):
        problems.append(f"non_perturbation.json: compared is {short(compared)}, expected it to cover "
                        f"{list(NP_FIELDS)}")
    scope = proof.get("scope", PROVE_ALL)
    if scope not in PROOF_SCOPES:
        problems.append(f"non_perturbation.json: scope is {short(scope)}, expected one of {list(PROOF_SCOPES)}")
    bare, inst = proof.get("bare"), proof.get("instrumented")
    if bare != inst:
        first = first_list_difference(bare, inst)
        problems.append(f"non_perturbation.json: bare and instrumented differ ({first})")
    own = [{"step": s.get("index"), **{k: s.get(k) for k in NP_FIELDS}} for s in b.steps()]
    covered = own[:1] if scope == PROVE_FIRST else own
    if inst != covered:
        first = first_list_difference(inst, covered)
        which = "step 0" if scope == PROVE_FIRST else "steps"
        problems.append(f"non_perturbation.json: instrumented does not match the ledger's {which} ({first})")
    require(problems)
    if scope == PROVE_FIRST and len(own) > 1:
        return (f"scope first: step 0 of {len(own)} proven, the anchor step; `kimi-jax prove` (run --prove all) "
                "proves every step")  # fmt: skip
    return f"scope {scope}: every step of {len(own)} proven"
