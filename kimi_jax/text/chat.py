"""Chat templates, rendered the way transformers renders them, in jinja2's sandbox.

The template is the checkpoint's (``chat_template.jinja``, else tokenizer_config.json's
``chat_template``). It runs in an ``ImmutableSandboxedEnvironment`` with ``trim_blocks`` and
``lstrip_blocks``, the ``loopcontrols`` extension, transformers' ``tojson`` (no HTML escaping) and
``raise_exception``, and sees ``messages``, ``add_generation_prompt``, ``tools``/``documents``
(None), the tokenizer's special-token strings (``bos_token``, ``eos_token``, ...) and any
``prompt.chat_template_kwargs``. ``strftime_now`` is deliberately absent: a prompt that depends on
the clock could not be replayed; a template that calls it fails with a clear error.

The rendered text is encoded without the tokenizer's own additions: the template writes every
marker itself.
"""

from __future__ import annotations

import json
from typing import Any

from kimi_jax.errors import TokenizerError
from kimi_jax.text.tokenizer import Tokenizer

# Stands in for a message's content when looking for the token that ends a turn.
_PROBE = "kimi-jax end-of-turn probe"


def _environment():
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise jinja2.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env


def render_chat(tokenizer: Tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                template_kwargs: dict[str, Any] | None = None) -> str:  # fmt: skip
    """The checkpoint's chat template applied to ``messages``; TokenizerError names the template on failure."""
    import jinja2

    found = tokenizer.chat_template()
    if found is None:
        raise TokenizerError(f"{tokenizer.root}: ships no chat template (chat_template.jinja, or chat_template in "
                             "tokenizer_config.json); give the prompt as prompt.text or prompt.tokens")  # fmt: skip
    source, where = found
    variables = {**tokenizer.template_tokens(), **(template_kwargs or {})}
    try:
        template = _environment().from_string(source)
        return template.render(messages=messages, tools=None, documents=None,
                               add_generation_prompt=add_generation_prompt, **variables)  # fmt: skip
    except jinja2.TemplateError as e:  # syntax errors, raise_exception, sandbox violations, undefined calls
        raise TokenizerError(f"{where}: the chat template failed: {type(e).__name__}: {e}") from None
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise TokenizerError(f"{where}: the chat template failed: {type(e).__name__}: {e}") from None


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
