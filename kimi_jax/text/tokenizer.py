"""A checkpoint's tokenizer: text to token ids, token ids to bytes, and the digest of its files.

Two kinds are read:

* ``tiktoken``: Kimi's ``tiktoken.model`` + ``tokenizer_config.json`` (:mod:`kimi_jax.text.kimi_format`),
  encoded by the ``tiktoken`` package with Kimi's pattern and special-token table. Special-token
  names in text encode as the special ids, as Kimi's own ``encode`` does (``allowed_special="all"``).
* ``tokenizer.json``: a Hugging Face tokenizer file, through the ``tokenizers`` package.

The tokenizer's identity is :attr:`Tokenizer.digest`: BLAKE3 over the canonical JSON of
``{file name: BLAKE3 of the file}`` for every file that decides encoding, decoding or the chat
template (:data:`TOKENIZER_FILES` that exist). No JAX here: verify uses this module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import blake3

from kimi_jax.errors import TokenizerError
from kimi_jax.fileio import canonical_json
from kimi_jax.text.kimi_format import (
    CONFIG_FILE,
    KIMI_PATTERN,
    RANKS_FILE,
    read_ranks,
    read_tokenizer_config,
    special_table,
    token_name,
)

JSON_FILE = "tokenizer.json"
TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_FILES = (RANKS_FILE, JSON_FILE, CONFIG_FILE, TEMPLATE_FILE)
# Kimi's tokenizer encodes at most 400,000 characters per tiktoken call and splits runs of more than
# 25,000 whitespace or non-whitespace characters (tiktoken's regex engine is slow on longer runs);
# both change where pieces can start, so they are part of the encoding and are kept.
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000


def file_digests(root: Path, names: tuple[str, ...] = TOKENIZER_FILES) -> dict[str, str]:
    return {n: blake3.blake3((root / n).read_bytes()).hexdigest() for n in names if (root / n).is_file()}


def files_digest(files: dict[str, str]) -> str:
    """The tokenizer digest from ``{file name: file digest}``."""
    return blake3.blake3(canonical_json(files)).hexdigest()


def display_text(data: bytes) -> str:
    """Token bytes as text: UTF-8 where valid, every other byte as a ``\\xNN`` escape."""
    return data.decode("utf-8", errors="backslashreplace")


class Tokenizer:
    """What the run, the ledger and verify need of a tokenizer, whichever kind it is."""

    kind: str

    def __init__(self, root: Path, config: dict[str, Any]):
        self.root = root
        self.config = config
        self.files = file_digests(root)
        self.digest = files_digest(self.files)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """``add_special_tokens``: the tokenizer's own additions (a BOS for some tokenizer.json
        files); a rendered chat already holds them."""
        raise NotImplementedError

    def token_bytes(self, token: int) -> bytes | None:
        """The bytes a token stands for (a special token: its name); None for an id the tokenizer lacks."""
        raise NotImplementedError

    def is_special(self, token: int) -> bool:
        raise NotImplementedError

    def token_id(self, name: str) -> int | None:
        """The id of a special token by name."""
        raise NotImplementedError

    def decode(self, tokens: list[int], skip_special: bool = False) -> str:
        """UTF-8 text of the tokens' bytes (invalid bytes become U+FFFD)."""
        parts = [self.token_bytes(t) or b"" for t in tokens if not (skip_special and self.is_special(t))]
        return b"".join(parts).decode("utf-8", errors="replace")

    def named_token(self, field: str, default: str | None = None) -> int | None:
        """The id of the token tokenizer_config.json names in ``field`` (bos_token, eos_token)."""
        name = token_name(self.config.get(field, default), self.root / CONFIG_FILE, field)
        return None if name is None else self.token_id(name)

    def chat_template(self) -> tuple[str, str] | None:
        """(template, where it came from): ``chat_template.jinja``, else tokenizer_config.json's
        ``chat_template`` (a string, or a list of named templates: the one named ``default``)."""
        file = self.root / TEMPLATE_FILE
        if file.is_file():
            return file.read_text(encoding="utf-8"), str(file)
        value = self.config.get("chat_template")
        where = f"{self.root / CONFIG_FILE}: chat_template"
        if isinstance(value, list):
            named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
            value = named.get("default")
        if value is None:
            return None
        if not isinstance(value, str):
            raise TokenizerError(f"{where}: expected a template string")
        return value, where

    def template_tokens(self) -> dict[str, str]:
        """The special-token strings transformers passes to a chat template (bos_token, ...)."""
        names = {}
        for field in ("bos_token", "eos_token", "unk_token", "pad_token"):
            name = token_name(self.config.get(field), self.root / CONFIG_FILE, field)
            if name is not None:
                names[field] = name
        return names


class TiktokenTokenizer(Tokenizer):
    kind = "tiktoken"

    def __init__(self, root: Path, vocab_size: int | None):
        import tiktoken

        config_path = root / CONFIG_FILE
        if not config_path.is_file():
            raise TokenizerError(f"{root}: ships {RANKS_FILE} but no {CONFIG_FILE}; Kimi's special tokens "
                                 f"(BOS, EOS, the chat markers) are named there")  # fmt: skip
        super().__init__(root, read_tokenizer_config(config_path))
        ranks = read_ranks(root / RANKS_FILE)
        n_base = len(ranks)
        count = 256 if vocab_size is None else vocab_size - n_base
        if count < 1:
            raise TokenizerError(f"{root / RANKS_FILE}: {n_base} base tokens leave no room for special tokens in "
                                 f"the model's vocabulary of {vocab_size}")  # fmt: skip
        self.specials = special_table(self.config, config_path, n_base, count)
        self.n_base = n_base
        self.n_vocab = n_base + count
        self.encoding = tiktoken.Encoding(name=f"kimi-jax:{self.digest[:16]}", pat_str=KIMI_PATTERN,
                                          mergeable_ranks=ranks, special_tokens=self.specials,
                                          explicit_n_vocab=self.n_vocab)  # fmt: skip
        for field, default in (("bos_token", "[BOS]"), ("eos_token", "[EOS]")):
            if self.named_token(field, default) is None:
                name = token_name(self.config.get(field, default), config_path, field)
                raise TokenizerError(f"{config_path}: {field}: {name!r} is not one of the special tokens")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids: list[int] = []
        for start in range(0, len(text), MAX_ENCODE_CHARS):
            for piece in split_long_runs(text[start : start + MAX_ENCODE_CHARS], MAX_RUN_CHARS):
                ids.extend(self.encoding.encode(piece, allowed_special="all"))
        return ids

    def token_bytes(self, token: int) -> bytes | None:
        if not 0 <= token < self.n_vocab:
            return None
        return self.encoding.decode_single_token_bytes(token)

    def is_special(self, token: int) -> bool:
        return self.n_base <= token < self.n_vocab

    def token_id(self, name: str) -> int | None:
        return self.specials.get(name)


def split_long_runs(text: str, limit: int) -> list[str]:
    """Cut ``text`` so no piece holds more than ``limit`` consecutive whitespace, or non-whitespace,
    characters (a cut inside a run leaves the first ``limit`` characters of the run before it)."""
    pieces, start, run, run_is_space = [], 0, 0, None
    for i, ch in enumerate(text):
        is_space = ch.isspace()
        if is_space != run_is_space:
            run, run_is_space = 1, is_space
            continue
        run += 1
        if run > limit:
            pieces.append(text[start:i])
            start, run = i, 1
    pieces.append(text[start:])
    return pieces


def _gpt2_byte_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-ins: bytes that print as themselves keep their character,
    the others take characters from U+0100 upwards, in byte order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet, extra = {}, 0
    for byte in range(256):
        if byte in kept:
            alphabet[chr(byte)] = byte
        else:
            alphabet[chr(256 + extra)] = byte
            extra += 1
    return alphabet


class JsonTokenizer(Tokenizer):
    kind = "tokenizer.json"

    def __init__(self, root: Path):
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError:
            raise TokenizerError(f"{root / JSON_FILE}: reading it needs the 'tokenizers' package "
                                 "(pip install tokenizers)") from None  # fmt: skip
        super().__init__(root, read_tokenizer_config(root / CONFIG_FILE))
        path = root / JSON_FILE
        try:
            self.hf = HFTokenizer.from_file(str(path))
            spec = json.loads(path.read_text(encoding="utf-8"))
        except Exception as e:  # tokenizers raises plain Exceptions on a malformed file
            raise TokenizerError(f"{path}: cannot be read as a tokenizer ({e})") from None
        self.added = {int(t["id"]): (t["content"], bool(t.get("special"))) for t in spec.get("added_tokens") or []}
        decoder = spec.get("decoder") or {}
        kinds = {d.get("type") for d in decoder.get("decoders", [])} | {decoder.get("type")}
        self.byte_level = "ByteLevel" in kinds
        self.alphabet = _gpt2_byte_alphabet() if self.byte_level else {}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens).ids

    def token_bytes(self, token: int) -> bytes | None:
        if token in self.added:
            return self.added[token][0].encode()
        piece = self.hf.id_to_token(token)
        if piece is None:
            return None
        if self.byte_level and all(c in self.alphabet for c in piece):
            return bytes(self.alphabet[c] for c in piece)
        return self.hf.decode([token], skip_special_tokens=False).encode()

    def is_special(self, token: int) -> bool:
        return self.added.get(token, ("", False))[1]

    def token_id(self, name: str) -> int | None:
        return self.hf.token_to_id(name)


def load_tokenizer(root: str | Path, vocab_size: int | None = None) -> Tokenizer | None:
    """The checkpoint's tokenizer (``tiktoken.model`` first, then ``tokenizer.json``), or None."""
    root = Path(root)
    if (root / RANKS_FILE).is_file():
        return TiktokenTokenizer(root, vocab_size)
    if (root / JSON_FILE).is_file():
        return JsonTokenizer(root)
    return None
