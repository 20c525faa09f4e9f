"""The ledger's text and token-choice fields, and their derivations (which verify re-runs).

* Per step: ``probability`` (softmax of the stored logits at the token) and ``rank`` (its place in
  logit order) always; for a sampled run ``sampling`` (the settings and ``probability``, the token's
  probability under the sampling distribution); with a tokenizer ``token_text``, ``token_bytes``
  and, when logits are captured, ``top_k_text``.
* ``text``: the prompt's text and per-token texts, and the generated text, decoded by the
  checkpoint's tokenizer (special tokens written by name).
* ``stopped``: why generation ended (:mod:`kimi_jax.text.decoding`).

A token's text is its bytes as UTF-8 where valid, other bytes as ``\\xNN`` escapes
(:func:`kimi_jax.text.tokenizer.display_text`); ``token_bytes`` is the exact bytes in hex.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kimi_jax.ledger.floats import f32
from kimi_jax.text.decoding import Decoding
from kimi_jax.text.sampling import Sampling, sample_token, sampled_probability, token_probability, token_rank
from kimi_jax.text.tokenizer import Tokenizer, display_text


def token_text(tokenizer: Tokenizer, token: int) -> str | None:
    data = tokenizer.token_bytes(token)
    return None if data is None else display_text(data)


def choice_fields(logits: np.ndarray, token: int, sampling: Sampling | None) -> dict[str, Any]:
    """probability, rank and (sampled runs) sampling of one step, from its stored logits."""
    fields: dict[str, Any] = {"probability": f32(token_probability(logits, token)), "rank": token_rank(logits, token)}
    if sampling is not None:
        fields["sampling"] = {**sampling.as_dict(), "probability": f32(sampled_probability(logits, sampling, token))}
    return fields


def step_text_fields(tokenizer: Tokenizer | None, token: int, top_k: list[list] | None) -> dict[str, Any]:
    if tokenizer is None:
        return {}
    data = tokenizer.token_bytes(token)
    fields: dict[str, Any] = {} if data is None else {"token_text": display_text(data), "token_bytes": data.hex()}
    if top_k is not None:
        fields["top_k_text"] = [token_text(tokenizer, t) or "" for t, _ in top_k]
    return fields


def text_section(tokenizer: Tokenizer | None, prompt: list[int], generated: list[int]) -> dict[str, Any] | None:
    if tokenizer is None:
        return None
    return {"prompt_text": tokenizer.decode(prompt),
            "prompt_token_texts": [token_text(tokenizer, t) or "" for t in prompt],
            "generated_text": tokenizer.decode(generated)}


def decoding_from_ledger(ledger: dict[str, Any], tokenizer: Tokenizer | None) -> Decoding:
    """The stop rules (and sampling) a ledger records, to re-check its choices and its stop."""
    run = ledger.get("run") or {}
    stop = run.get("stop") or {}
    sampling = run.get("sampling")
    return Decoding(Sampling(**sampling) if isinstance(sampling, dict) else None,
                    tuple((int(t), str(r)) for t, r in stop.get("tokens") or []), tuple(stop.get("strings") or []),
                    tokenizer)  # fmt: skip


def audit_choices(ledger: dict[str, Any], arrays: dict[int, tuple[np.ndarray, np.ndarray]]) -> list[str]:
    """Each step's token is the one its choice rule picks from the stored logits (argmax, or the
    seeded draw), and its probability, rank and sampling fields recompute."""
    run_sampling = (ledger.get("run") or {}).get("sampling")
    sampling = Sampling(**run_sampling) if isinstance(run_sampling, dict) else None
    problems = []
    for step in ledger["steps"]:
        i = step["index"]
        if i not in arrays:
            continue
        logits = arrays[i][0]
        chosen = int(np.argmax(logits)) if sampling is None else sample_token(logits, sampling, i)[0]
        how = "argmax of the stored logits" if sampling is None else f"the seeded draw (seed {sampling.seed}, step {i})"
        if step["token"] != chosen:
            problems.append(f"steps[{i}].token is {step['token']}, but {how} gives {chosen}")
            continue
        if step.get("sampling") is not None and sampling is None:
            problems.append(f"steps[{i}].sampling is recorded, but run.sampling is null (a greedy run)")
        for key, value in choice_fields(logits, step["token"], sampling).items():
            if step.get(key) != value:
                problems.append(f"steps[{i}].{key} is {step.get(key)!r}, recomputed {value!r}")
    return problems


def audit_text(ledger: dict[str, Any], tokenizer: Tokenizer, render) -> list[str]:
    """Every text field recomputes with ``tokenizer``, and the prompt as given encodes to
    ``run.prompt`` (``render(messages, kwargs, tools)`` renders a chat prompt)."""
    run = ledger.get("run") or {}
    given = run.get("prompt_input") or {}
    prompt = run.get("prompt") or []
    problems = []
    if "text" in given:
        encoded = tokenizer.encode(given["text"])
    elif "chat" in given:
        encoded = tokenizer.encode(render(given["chat"], given.get("chat_template_kwargs"), given.get("tools")), add_special_tokens=False)
    else:
        encoded = given.get("tokens")
    if encoded != prompt:
        problems.append(f"run.prompt {prompt[:12]!r} is not what run.prompt_input encodes to ({encoded[:12]!r}...)")
    steps = ledger["steps"]
    want = text_section(tokenizer, prompt, [s["token"] for s in steps])
    for key, value in want.items():
        if (ledger.get("text") or {}).get(key) != value:
            problems.append(f"text.{key} does not recompute with the bundled tokenizer (recomputed {value!r:.80})")
    for step in steps:
        fields = step_text_fields(tokenizer, step["token"], step.get("top_k"))
        for key in ("token_text", "token_bytes", "top_k_text"):
            if step.get(key) != fields.get(key):
                problems.append(f"steps[{step['index']}].{key} is {step.get(key)!r}, recomputed {fields.get(key)!r}")
    return problems
