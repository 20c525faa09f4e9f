"""Rebuild kimi_jax/assets/text/synthetic.tiktoken: 1,792 BPE ranks (the tiny preset's 2,048-id
vocabulary less Kimi's 256 special tokens) trained on kimi_jax/assets/text/corpus.txt by tiktoken's
educational trainer. The table is committed so synth never trains; tests/test_text_tokenizer.py
re-trains and requires the same bytes.

    python tools/make_synthetic_tokenizer.py
"""

from __future__ import annotations

from pathlib import Path

from kimi_jax.text.kimi_format import format_ranks
from kimi_jax.text.synthetic import TRAINED_RANKS, train_ranks

TRAINED_COUNT = 1792
ASSETS = Path(__file__).resolve().parent.parent / "kimi_jax" / "assets" / "text"

if __name__ == "__main__":
    corpus = (ASSETS / "corpus.txt").read_text(encoding="utf-8")
    target = ASSETS / TRAINED_RANKS
    target.write_bytes(format_ranks(train_ranks(corpus, TRAINED_COUNT)))
    print(f"wrote {target}")
