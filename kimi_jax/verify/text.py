"""Check 11 of verify, ``text``: the tokenizer the ledger names is the one in the bundle, and every
text field re-derives from it: the prompt as given encodes to ``run.prompt`` (a chat through the
bundled template), and the prompt, generated and per-token texts and bytes recompute.

The bundle's template and tokenizer files are a stranger's: they go through the same bounded
renderer and tokenizer worker as a run's (:mod:`kimi_jax.text.chat`, :mod:`kimi_jax.text.worker`),
and anything they make fail is this check FAILED, naming the file."""

from __future__ import annotations

from kimi_jax.verify.bundle_view import BundleView
from kimi_jax.verify.report import CheckFailed, CheckSkipped, require

TEXT_FIELDS = ("token_text", "token_bytes", "top_k_text")


def check_text(b: BundleView) -> str:
    from kimi_jax.errors import TokenizerError
    from kimi_jax.ledger.text_fields import audit_text
    from kimi_jax.text.chat import render_chat

    ledger = b.ledger
    tokenizer = b.tokenizer()
    if tokenizer is None:
        present = [f"steps[{s.get('index')}].{k}" for s in b.steps() for k in TEXT_FIELDS if k in s]
        if ledger.get("text") is not None:
            present.append("text")
        if present:
            raise CheckFailed(f"the ledger records no tokenizer but has text fields ({', '.join(present[:5])})")
        raise CheckSkipped("the checkpoint ships no tokenizer: the ledger has no text fields")

    def render(messages, kwargs, tools):
        try:
            return render_chat(tokenizer, messages, add_generation_prompt=True, template_kwargs=kwargs, tools=tools)
        except TokenizerError as e:
            raise CheckFailed(f"run.prompt_input.chat: {b.relative(str(e))}") from None

    try:
        require(audit_text(ledger, tokenizer, render))
    except TokenizerError as e:  # the bundled tokenizer failed on the bundle's own text
        raise CheckFailed(b.relative(str(e))) from None
    return f"{tokenizer.kind} tokenizer {tokenizer.digest[:16]}: prompt and {len(b.steps())} step(s) re-derived"
