"""The tokenizer files ``kimi-jax synth`` writes beside a synthetic Kimi checkpoint.

No real Kimi tokenizer is available offline, so the synthetic checkpoints get one of their own in
exactly Kimi's file formats: a ``tiktoken.model`` whose ranks come from a small BPE trained by
tiktoken's own educational trainer on ``kimi_jax/assets/text/corpus.txt`` (the trained table is
committed as ``synthetic.tiktoken``; ``python tools/make_synthetic_tokenizer.py`` rebuilds it), a
``tokenizer_config.json`` with Kimi's special-token layout moved to the top of the synthetic
vocabulary, and a ``chat_template.jinja`` in Kimi's style.

A vocabulary of V ids gets V - 256 base tokens: the first V - 256 trained ranks (a prefix of a
BPE training run is itself a complete BPE table), and beyond the trained table, concatenations
of two trained tokens in a fixed order, so every preset, ``full-shape``'s 163,584 base tokens
included, gets a valid table.
"""

from __future__ import annotations

import json
from importlib import resources

from kimi_jax.text.kimi_format import (
    CONFIG_FILE,
    KIMI_PATTERN,
    RANKS_FILE,
    RESERVED_SPECIAL_TOKENS,
    format_ranks,
    read_ranks,
)
from kimi_jax.text.tokenizer import TEMPLATE_FILE

TRAINED_RANKS = "synthetic.tiktoken"

# Kimi K2's named special tokens, by offset from the first special id (163584 in the real model);
# the tool-call markers are not "special" (skip_special_tokens keeps them), as in Kimi's file.
KIMI_SPECIAL_LAYOUT: dict[int, tuple[str, bool]] = {
    0: ("[BOS]", True), 1: ("[EOS]", True), 2: ("<|im_end|>", True), 3: ("<|im_user|>", True),
    4: ("<|im_assistant|>", True), 6: ("<|start_header_id|>", True), 7: ("<|end_header_id|>", True),
    9: ("[EOT]", True), 10: ("<|im_system|>", True), 11: ("<|tool_calls_section_begin|>", False),
    12: ("<|tool_calls_section_end|>", False), 13: ("<|tool_call_begin|>", False),
    14: ("<|tool_call_argument_begin|>", False), 15: ("<|tool_call_end|>", False), 17: ("<|im_middle|>", True),
    21: ("<|media_pad|>", True), 254: ("[UNK]", True), 255: ("[PAD]", True),
}  # fmt: skip

# Kimi's conversation format: <|im_ROLE|>ROLE<|im_middle|>CONTENT<|im_end|> per message, a default
# system message when the conversation has none, and the assistant header as generation prompt.
CHAT_TEMPLATE = """\
{%- if not messages or messages[0]['role'] != 'system' -%}
<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>
{%- endif -%}
{%- for message in messages -%}
{%- if message['role'] not in ['system', 'user', 'assistant'] -%}
{{ raise_exception('role must be system, user or assistant, got ' + message['role']) }}
{%- endif -%}
<|im_{{ message['role'] }}|>{{ message['role'] }}<|im_middle|>{{ message['content'] }}<|im_end|>
{%- endfor -%}
{%- if add_generation_prompt -%}
<|im_assistant|>assistant<|im_middle|>
{%- endif -%}
"""


def trained_ranks() -> list[bytes]:
    """The committed trained table, tokens in rank order."""
    path = resources.files("kimi_jax").joinpath("assets", "text", TRAINED_RANKS)
    with resources.as_file(path) as file:
        ranks = read_ranks(file)
    return sorted(ranks, key=ranks.__getitem__)


def synthetic_ranks(count: int) -> dict[bytes, int]:
    """``count`` base tokens: the trained table's first ``count``, then fixed concatenations."""
    trained = trained_ranks()
    tokens = trained[:count]
    seen = set(tokens)
    merged = trained[256:]
    for a in merged:
        if len(tokens) == count:
            break
        for b in merged:
            if a + b not in seen:
                tokens.append(a + b)
                seen.add(a + b)
                if len(tokens) == count:
                    break
    return {token: rank for rank, token in enumerate(tokens)}


def tokenizer_config(first_special: int, count: int = RESERVED_SPECIAL_TOKENS) -> dict:
    """Kimi's tokenizer_config.json with the special tokens starting at ``first_special``."""
    decoder = {str(first_special + offset): {"content": name, "lstrip": False, "normalized": False, "rstrip": False,
                                             "single_word": False, "special": special}
               for offset, (name, special) in KIMI_SPECIAL_LAYOUT.items() if offset < count}  # fmt: skip
    return {
        "added_tokens_decoder": decoder,
        "additional_special_tokens": ["<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|start_header_id|>",
                                      "<|end_header_id|>", "[EOT]", "<|im_system|>", "<|im_middle|>"],
        "bos_token": "[BOS]", "eos_token": "[EOS]", "pad_token": "[PAD]", "unk_token": "[UNK]",
        "clean_up_tokenization_spaces": False, "model_max_length": 1000000000000000019884624838656,
        "tokenizer_class": "TikTokenTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]},
    }  # fmt: skip


def tokenizer_files(vocab_size: int) -> dict[str, bytes]:
    """The files of a synthetic Kimi tokenizer for ``vocab_size`` ids (256 of them special)."""
    first_special = vocab_size - RESERVED_SPECIAL_TOKENS
    if first_special < 256:
        raise ValueError(f"a Kimi-layout tokenizer needs vocab_size >= 512 (256 byte tokens + 256 special), "
                         f"got {vocab_size}")
    return {
        RANKS_FILE: format_ranks(synthetic_ranks(first_special)),
        CONFIG_FILE: (json.dumps(tokenizer_config(first_special), indent=2) + "\n").encode(),
        TEMPLATE_FILE: CHAT_TEMPLATE.encode(),
    }


def train_ranks(corpus: str, count: int) -> dict[bytes, int]:
    """Train ``count`` ranks on ``corpus`` with tiktoken's educational BPE trainer, splitting text
    with Kimi's pattern (``(?V1)``: Python's ``regex`` needs version 1 for the ``&&`` classes)."""
    from tiktoken._educational import bpe_train  # tooling only; synth reads the committed table

    return bpe_train(corpus, count, "(?V1)" + KIMI_PATTERN, visualise=None)
