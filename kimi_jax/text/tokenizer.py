"""A checkpoint's tokenizer: text to token ids, token ids to bytes, and the digest of its files.

Two kinds are read:

* ``tiktoken``: Kimi's ``tiktoken.model`` + ``tokenizer_config.json`` (:mod:`kimi_jax.text.kimi_format`),
  encoded by the ``tiktoken`` package with Kimi's pattern and special-token table. Special-token
  names in text encode as the special ids, as Kimi's own ``encode`` does (``allowed_special="all"``).
* ``tokenizer.json``: a Hugging Face tokenizer file, through the ``tokenizers`` package, which runs
  in a child process with a memory and a time limit (:mod:`kimi_jax.text.worker`): a hostile file
  can make that library abort or run away, never kimi-jax.

Every file is read through a size limit (:data:`FILE_LIMITS`), regular files only, and the
counts it declares are checked against the vocabulary before any table is built.

The tokenizer's identity is :attr:`Tokenizer.digest`: BLAKE3 over the canonical JSON of
``{file name: BLAKE3 of the file}`` for every file that decides encoding, decoding or the chat
template (:data:`TOKENIZER_FILES` that exist). No JAX here: verify uses this module.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path
from typing import Any, Iterator

import blake3

from kimi_jax.errors import KimiJaxError, TokenizerError
from kimi_jax.fileio import canonical_json, open_regular, read_regular
from kimi_jax.text.kimi_format import (
    CONFIG_FILE,
    CONFIG_LIMIT,
    KIMI_PATTERN,
    RANKS_FILE,
    RANKS_LIMIT,
    read_ranks,
    read_tokenizer_config,
    special_table,
    token_name,
)
from kimi_jax.text.sandbox import clip
from kimi_jax.text.worker import LOAD_SECONDS, TOKENIZER_JSON_LIMIT, Worker, WorkerFailed

JSON_FILE = "tokenizer.json"
TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_FILES = (RANKS_FILE, JSON_FILE, CONFIG_FILE, TEMPLATE_FILE)
# Kimi's tokenizer encodes at most 400,000 characters per tiktoken call and splits runs of more than
# 25,000 whitespace or non-whitespace characters (tiktoken's regex engine is slow on longer runs);
# both change where pieces can start, so they are part of the encoding and are kept.
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000
TEMPLATE_LIMIT = 1 << 20  # chat_template.jinja (Kimi's: 4 KB; the longest published ones: tens of KB)
FILE_LIMITS = {RANKS_FILE: RANKS_LIMIT, JSON_FILE: TOKENIZER_JSON_LIMIT, CONFIG_FILE: CONFIG_LIMIT,
               TEMPLATE_FILE: TEMPLATE_LIMIT}  # fmt: skip


def present(path: Path) -> bool:
    """Whether anything is at ``path`` (a FIFO or a folder too: it is then refused by name, not ignored)."""
    return os.path.lexists(path)


def file_digests(root: Path, names: tuple[str, ...] = TOKENIZER_FILES) -> dict[str, str]:
    """{name: BLAKE3} of the tokenizer files present in ``root``, each read through its size limit."""
    digests = {}
    for name in names:
        path = Path(root) / name
        if not present(path):
            continue
        fd = open_regular(path, "tokenizer file", TokenizerError)
        with os.fdopen(fd, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > FILE_LIMITS[name]:
                raise TokenizerError(f"{path}: tokenizer file is {size:,} bytes, more than the {FILE_LIMITS[name]:,} "
                                     f"a {name} can legitimately hold")  # fmt: skip
            h, read = blake3.blake3(), 0
            while chunk := f.read(1 << 20):
                read += len(chunk)
                if read > FILE_LIMITS[name]:
                    raise TokenizerError(f"{path}: tokenizer file grew past {FILE_LIMITS[name]:,} bytes while read")
                h.update(chunk)
        digests[name] = h.hexdigest()
    return digests


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
        if present(file):
            data = read_regular(file, TEMPLATE_LIMIT, "chat template", TokenizerError)
            try:
                return data.decode("utf-8"), str(file)
            except UnicodeDecodeError as e:
                raise TokenizerError(f"{file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        value = self.config.get("chat_template")
        where = f"{self.root / CONFIG_FILE}: chat_template"
        if isinstance(value, list):
            named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
            value = named.get("default")
        if value is None:
            return None
        if not isinstance(value, str):
            raise TokenizerError(f"{where}: expected a template string")
        if len(value) > TEMPLATE_LIMIT:
            raise TokenizerError(f"{where}: a template of {len(value):,} characters; at most {TEMPLATE_LIMIT:,}")
        return value, where

    def worker(self) -> Worker:
        """The child process that renders this tokenizer's chat template (and, for a tokenizer.json,
        runs the tokenizer itself)."""
        if getattr(self, "_worker", None) is None:
            self._worker = Worker()
        return self._worker

    def close(self) -> None:
        """End the worker process now (it also ends with this object, or with the program)."""
        if getattr(self, "_worker", None) is not None:
            self._worker.close()

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
        if not present(config_path):
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
        with _rust_failures(root / RANKS_FILE, "building the tokenizer"):
            self.encoding = tiktoken.Encoding(name=f"kimi-jax:{self.digest[:16]}", pat_str=KIMI_PATTERN,
                                              mergeable_ranks=ranks, special_tokens=self.specials,
                                              explicit_n_vocab=self.n_vocab)  # fmt: skip
        for field, default in (("bos_token", "[BOS]"), ("eos_token", "[EOS]")):
            if self.named_token(field, default) is None:
                name = token_name(self.config.get(field, default), config_path, field)
                raise TokenizerError(f"{config_path}: {field}: {name!r} is not one of the special tokens")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids: list[int] = []
        with _rust_failures(self.root / RANKS_FILE, "encoding"):
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


class JsonTokenizer(Tokenizer):
    """A ``tokenizer.json``, parsed and run by the ``tokenizers`` package in the worker process."""

    kind = "tokenizer.json"

    def __init__(self, root: Path):
        path = root / JSON_FILE
        if importlib.util.find_spec("tokenizers") is None:
            raise TokenizerError(f"{path}: reading it needs the 'tokenizers' package (pip install tokenizers)")
        super().__init__(root, read_tokenizer_config(root / CONFIG_FILE))
        load = ("load", {"path": str(path.absolute()), "digest": self.files[JSON_FILE]}, LOAD_SECONDS)
        self._worker = Worker(setup=[load])
        info = self._call("load", load[1], LOAD_SECONDS)
        self.added = {int(i): (content, bool(special)) for i, content, special in info["added"]}
        self.byte_level = bool(info["byte_level"])
        self._bytes: dict[int, bytes | None] = {}

    def _call(self, op: str, args: dict, timeout_s: float | None = None) -> Any:
        try:
            return self.worker().call(op, args, *(() if timeout_s is None else (timeout_s,)))
        except WorkerFailed as e:
            raise TokenizerError(f"{self.root / JSON_FILE}: {_doing(op)} failed: {e}") from None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._call("encode", {"text": text, "add_special_tokens": add_special_tokens})

    def token_bytes(self, token: int) -> bytes | None:
        if token not in self._bytes:
            (found,) = self._call("token_bytes", {"ids": [int(token)]})
            self._bytes[token] = None if found is None else bytes.fromhex(found)
        return self._bytes[token]

    def is_special(self, token: int) -> bool:
        return self.added.get(token, ("", False))[1]

    def token_id(self, name: str) -> int | None:
        return self._call("token_to_id", {"name": name})


def _doing(op: str) -> str:
    return {"load": "reading it as a tokenizer", "encode": "encoding text", "token_bytes": "looking up a token",
            "token_to_id": "looking up a token"}.get(op, op)  # fmt: skip


@contextlib.contextmanager
def _rust_failures(path: Path, doing: str) -> Iterator[None]:
    """A panic in a Rust extension (pyo3's PanicException, a BaseException) or its ValueError as a
    named TokenizerError."""
    try:
        yield
    except (KimiJaxError, KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as e:  # noqa: BLE001 - PanicException derives from BaseException
        if type(e).__name__ != "PanicException" and not isinstance(e, (ValueError, UnicodeError)):
            raise
        raise TokenizerError(f"{path}: {doing} failed: {type(e).__name__}: {clip(str(e), 200)}") from None


def load_tokenizer(root: str | Path, vocab_size: int | None = None) -> Tokenizer | None:
    """The checkpoint's tokenizer (``tiktoken.model`` first, then ``tokenizer.json``), or None."""
    root = Path(root)
    if present(root / RANKS_FILE):
        return TiktokenTokenizer(root, vocab_size)
    if present(root / JSON_FILE):
        return JsonTokenizer(root)
    return None
