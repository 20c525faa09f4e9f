"""Chat templates, rendered the way transformers renders them, in jinja2's sandbox, bounded.

The template is the checkpoint's (``chat_template.jinja``, else tokenizer_config.json's
``chat_template``), or a stranger's bundle's in verify: the same renderer serves both. It runs
in an ``ImmutableSandboxedEnvironment`` with ``trim_blocks`` and ``lstrip_blocks``, the
``loopcontrols`` extension, transformers' ``tojson`` (no HTML escaping) and ``raise_exception``,
and sees ``messages``, ``add_generation_prompt``, ``tools`` (None unless given), ``documents`` (None), the tokenizer's
special-token strings (``bos_token``, ``eos_token``, ...) and any ``prompt.chat_template_kwargs``.
``strftime_now`` is deliberately absent: a prompt that depends on the clock could not be
replayed; a template that calls it fails with a clear error.

Rendering is bounded twice: the sandbox refuses, before computing it, any operation that would
build something large (:mod:`kimi_jax.text.sandbox`), and it runs in the worker process
(:mod:`kimi_jax.text.worker`) with a memory limit and a wall-time limit. Any failure is one
TokenizerError naming the template.

The rendered text is encoded without the tokenizer's own additions: the template writes every
marker itself.
"""

from __future__ import annotations

import json
from typing import Any

from kimi_jax.errors import TokenizerError
from kimi_jax.text.tokenizer import Tokenizer
from kimi_jax.text.worker import RENDER_SECONDS, WorkerFailed

# Stands in for a message's content when looking for the token that ends a turn.
_PROBE = "kimi-jax end-of-turn probe"


def render_chat(tokenizer: Tokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                template_kwargs: dict[str, Any] | None = None, tools: list[dict[str, Any]] | None = None) -> str:  # fmt: skip
    """The checkpoint's chat template applied to ``messages`` (and ``tools``, as transformers passes
    them); TokenizerError names the template on failure."""
    found = tokenizer.chat_template()
    if found is None:
        raise TokenizerError(f"{tokenizer.root}: ships no chat template (chat_template.jinja, or chat_template in "
                             "tokenizer_config.json); give the prompt as prompt.text or prompt.tokens")  # fmt: skip
    source, where = found
    variables = {**tokenizer.template_tokens(), **(template_kwargs or {})}
    variables.update(messages=messages, tools=tools, documents=None, add_generation_prompt=add_generation_prompt)
    try:
        json.dumps(variables)
    except (TypeError, ValueError) as e:
        raise TokenizerError(f"{where}: the template's variables must be JSON values ({e})") from None
    try:
        return tokenizer.worker().call("render", {"source": source, "variables": variables}, RENDER_SECONDS)
    except WorkerFailed as e:
        if e.kind == "timeout":
            raise TokenizerError(f"{where}: the chat template {e}") from None
        raise TokenizerError(f"{where}: the chat template failed: {e}") from None


def end_of_turn_token(tokenizer: Tokenizer, template_kwargs: dict[str, Any] | None = None) -> int | None:
    """The special token the template writes right after an assistant message's content (Kimi:
    ``<|im_end|>``), found by rendering a probe conversation; None when there is no such token."""
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = render_chat(tokenizer, probe, add_generation_prompt=False, template_kwargs=template_kwargs)
    except TokenizerError:
        return None
    at = text.find(_PROBE)
    if at < 0:
        return None
    after = tokenizer.encode(text[at + len(_PROBE) :], add_special_tokens=False)
    return after[0] if after and tokenizer.is_special(after[0]) else None
