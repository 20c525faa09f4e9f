"""Kimi's tokenizer files, read as data: ``tiktoken.model`` and ``tokenizer_config.json``.

Kimi K2 and K2.5 ship no ``tokenizer.json``. Their tokenizer is byte-level BPE in tiktoken's
format: ``tiktoken.model`` holds one ``BASE64(token bytes) RANK`` line per base token, ranks
0..N-1 dense. The special tokens follow the base tokens: ids N..V-1 (V the model's vocabulary
size; 256 of them for Kimi, BOS 163584 = N, EOS 163585 = N + 1). Those named in
``tokenizer_config.json``'s ``added_tokens_decoder`` take that name, every other id is the
reserved token ``<|reserved_token_{id}|>``. Text is split into pieces by :data:`KIMI_PATTERN`,
the pre-tokenization regex of the model's own ``tokenization_kimi.py``, before BPE.

The checkpoint's Python (``tokenization_kimi.py``) is never executed; these facts about its
behaviour are re-stated here and the encoding is done by the ``tiktoken`` package.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path
from typing import Any

from kimi_jax.errors import TokenizerError
from kimi_jax.fileio import read_json, read_regular
from kimi_jax.text.sandbox import clip

RANKS_FILE = "tiktoken.model"
CONFIG_FILE = "tokenizer_config.json"
RESERVED_SPECIAL_TOKENS = 256  # what Kimi's tokenizer adds after the base tokens

# What these files can legitimately hold, checked before anything is built from them. Kimi's
# tiktoken.model is 2.8 MB (163,584 ranks) and its tokenizer_config.json 40 KB; tokenizer
# configs that list every added token reach a few MB.
RANKS_LIMIT = 32 << 20
CONFIG_LIMIT = 16 << 20
MAX_RANKS = 1 << 21
MAX_TOKEN_BYTES = 1024  # one base token's bytes (real ones: at most a few dozen)
MAX_SPECIAL_TOKENS = 1 << 16  # ids after the base tokens (Kimi: 256)
MAX_SPECIAL_NAME = 1024  # characters of one special token's name (Kimi's longest: 25)

# Letters other than Han, split by case: Kimi keeps the cased-word pieces of cl100k-style
# patterns but makes every Han run a piece of its own.
_UPPERISH = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]"
_LOWERISH = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]"
_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
KIMI_PATTERN = "|".join((
    r"[\p{Han}]+",                                                  # a run of Han characters
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPERISH}*{_LOWERISH}+{_CONTRACTION}",  # a word ending in lower case
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPERISH}+{_LOWERISH}*{_CONTRACTION}",  # a word in upper case
    r"\p{N}{1,3}",                                                  # up to three digits
    r" ?[^\s\p{L}\p{N}]+[\r\n]*",                                   # punctuation, with its line breaks
    r"\s*[\r\n]+",                                                  # line breaks
    r"\s+(?!\S)",                                                   # spaces not before a word
    r"\s+",                                                         # other spaces
))  # fmt: skip


def read_ranks(path: Path) -> dict[bytes, int]:
    """``tiktoken.model`` -> {token bytes: rank}; ranks must be 0..N-1, each once. The file is
    read through :data:`RANKS_LIMIT` and may hold at most :data:`MAX_RANKS` ranks."""
    data = read_regular(path, RANKS_LIMIT, "tiktoken ranks file", TokenizerError)
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{path}: not a tiktoken ranks file (non-ASCII byte at offset {e.start})") from None
    del data
    ranks: dict[bytes, int] = {}
    seen_ranks: dict[int, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2 or not fields[1].isdigit() or len(fields[1]) > 9:
            raise TokenizerError(f"{path}:{number}: expected 'BASE64 RANK' (a rank below 10**9), got {line[:60]!r}")
        if len(fields[0]) > MAX_TOKEN_BYTES * 4 // 3 + 4:
            raise TokenizerError(f"{path}:{number}: a token of more than {MAX_TOKEN_BYTES} bytes")
        try:
            token = base64.b64decode(fields[0], validate=True)
        except binascii.Error:
            raise TokenizerError(f"{path}:{number}: {fields[0][:40]!r} is not base64") from None
        rank = int(fields[1])
        if len(ranks) >= MAX_RANKS:
            raise TokenizerError(f"{path}: more than {MAX_RANKS:,} ranks")
        if token in ranks:
            raise TokenizerError(f"{path}:{number}: token {token!r} already has rank {ranks[token]}")
        if rank in seen_ranks:
            raise TokenizerError(f"{path}:{number}: rank {rank} already given on line {seen_ranks[rank]}")
        ranks[token] = rank
        seen_ranks[rank] = number
    if not ranks:
        raise TokenizerError(f"{path}: no ranks")
    if max(seen_ranks) != len(ranks) - 1:
        missing = next(r for r in range(len(ranks)) if r not in seen_ranks)
        raise TokenizerError(f"{path}: ranks must run 0..{len(ranks) - 1} without gaps; rank {missing} is missing")
    return ranks


def format_ranks(ranks: dict[bytes, int]) -> bytes:
    """The ``tiktoken.model`` bytes of ``ranks``, one line per token in rank order."""
    in_order = sorted(ranks.items(), key=lambda kv: kv[1])
    lines = [base64.b64encode(token) + b" " + str(rank).encode() for token, rank in in_order]
    return b"\n".join(lines) + b"\n"


def read_tokenizer_config(path: Path) -> dict[str, Any]:
    """tokenizer_config.json through the bounded JSON reader ({} when there is none)."""
    if not os.path.lexists(path):
        return {}
    config = read_json(path, CONFIG_LIMIT, "tokenizer config", TokenizerError)
    if not isinstance(config, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return config


def token_name(value: Any, path: Path, field: str) -> str | None:
    """A special token as tokenizer_config.json spells it: a string, or an AddedToken object."""
    if value is None:
        return None
    if isinstance(value, dict):
        value = value.get("content")
    if not isinstance(value, str) or not value:
        raise TokenizerError(f"{path}: {field}: expected a token string or {{\"content\": ...}}, got "
                             f"{clip(repr(value), 80)}")  # fmt: skip
    if len(value) > MAX_SPECIAL_NAME:
        raise TokenizerError(f"{path}: {field}: a token name of {len(value):,} characters; at most "
                             f"{MAX_SPECIAL_NAME:,} are allowed")  # fmt: skip
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TokenizerError(f"{path}: {field}: the token name holds {value[e.start]!r} at character {e.start}, a lone "
                             "surrogate that no text can contain") from None  # fmt: skip
    return value


def special_table(config: dict[str, Any], path: Path, first_id: int, count: int) -> dict[str, int]:
    """{name: id} for ids first_id..first_id+count-1: the names ``added_tokens_decoder`` gives,
    ``<|reserved_token_{id}|>`` for the rest."""
    if count > MAX_SPECIAL_TOKENS:
        raise TokenizerError(f"{path}: the model's vocabulary leaves {count:,} ids for special tokens after the "
                             f"{first_id:,} base tokens; a tokenizer has at most {MAX_SPECIAL_TOKENS:,} (is this the "
                             "model's tokenizer?)")  # fmt: skip
    decoder = config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise TokenizerError(f"{path}: added_tokens_decoder: expected an object {{id: {{content: ...}}}}")
    named: dict[int, str] = {}
    for key, entry in decoder.items():
        field = f"added_tokens_decoder.{clip(key, 40)}"
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 9):
            raise TokenizerError(f"{path}: {field}: the key must be a token id")
        token = int(key)
        if not first_id <= token < first_id + count:
            raise TokenizerError(f"{path}: {field}: id {token} is outside the special tokens "
                                 f"{first_id}..{first_id + count - 1} (after the {first_id} base tokens)")  # fmt: skip
        named[token] = token_name(entry, path, field) or ""
    table: dict[str, int] = {}
    for token in range(first_id, first_id + count):
        name = named.get(token, f"<|reserved_token_{token}|>")
        if name in table:
            raise TokenizerError(f"{path}: special token {clip(repr(name), 80)} is given to ids {table[name]} and {token}")
        table[name] = token
    return table
