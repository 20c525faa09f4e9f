"""Checkpoint layouts, named in one place.

Two questions get two kinds of name:

* Which release to write: ``kimi-jax synth --layout`` and a manifest's ``model.synthetic.layout``
  name the naming, storage and sharding of one real release (:data:`SYNTH_LAYOUTS`).
* What the index recognised on disk: ``CheckpointIndex.layout``, recorded in every ledger and
  anchor, names the tensor naming and the storage only (:func:`indexed_layout`), since sharding
  does not change what is read. So synthetic ``kimi-k2-fp8`` and ``deepseek-v3`` both read back as
  ``deepseek-v3-fp8``, and ``kimi-k2.5`` as ``kimi-k2.5-int4``.
"""

from __future__ import annotations

from collections.abc import Iterable

# The Kimi releases: they ship Kimi's tokenizer files (tiktoken.model, tokenizer_config.json).
KIMI_SYNTH_LAYOUTS: tuple[str, ...] = ("kimi-k2.5", "kimi-k2-fp8")

# Stored-name prefixes of the text model: Kimi K2.5 nests it inside its multimodal wrapper.
KIMI_K25_PREFIX = "language_model.model."
TEXT_PREFIX = "model."


def synth_prefix(layout: str) -> str:
    return KIMI_K25_PREFIX if layout == "kimi-k2.5" else TEXT_PREFIX


def indexed_layout(prefix: str, formats: Iterable[str], plain_dtypes: Iterable[str]) -> str:
    """The layout a checkpoint index reports, from the text model's name ``prefix``, the storage
    ``formats`` of its weights (plain, int4, fp8) and the dtypes of its plain weights:
    ``kimi-k2.5-int4`` / ``kimi-k2.5`` (the K2.5 wrapper), ``deepseek-v3-fp8`` (block FP8, as Kimi K2
    and DeepSeek-V3 ship), ``kimi-k2-int4``, and ``hf-bf16`` / ``hf-f32`` (transformers'
    ``save_pretrained``)."""
    formats = set(formats)
    if prefix == KIMI_K25_PREFIX:
        return "kimi-k2.5-int4" if "int4" in formats else "kimi-k2.5"
    if "fp8" in formats:
        return "deepseek-v3-fp8"
    if "int4" in formats:
        return "kimi-k2-int4"
    return "hf-bf16" if "BF16" in set(plain_dtypes) else "hf-f32"
