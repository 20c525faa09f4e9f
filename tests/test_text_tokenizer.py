"""Kimi's tokenizer read natively: checked against tiktoken itself and transformers' tiktoken loader,
on the synthetic tokenizer files ``kimi-jax synth`` ships (trained by tiktoken's own trainer)."""

from __future__ import annotations

import json
import os
import shutil
from importlib import resources

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kimi_jax.errors import TokenizerError
from kimi_jax.storage.synth import synth_checkpoint
from kimi_jax.text.kimi_format import format_ranks
from kimi_jax.text.synthetic import TRAINED_RANKS, train_ranks
from kimi_jax.text.tokenizer import JsonTokenizer, display_text, load_tokenizer
from tests.hostile import HOSTILE_TEXT, byte_level_tokenizer, catastrophic_split, growing_normalizer, sparse_file

tiktoken = pytest.importorskip("tiktoken")
from tiktoken.load import load_tiktoken_bpe  # noqa: E402

# The pre-tokenization pattern of Kimi's tokenization_kimi.py, spelled out as one regex (the
# package builds it from parts; this is the spec it must equal in effect).
PUBLISHED_PATTERN = (
    r"[\p{Han}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
VOCAB = 2048  # the tiny preset: 1,792 BPE ranks + Kimi's 256 special ids
SAMPLES = ["Hello! How are you today? 你好，世界。 café naïve 😀🇫🇷", "It's DON'T  shout\n\n\n  x\t\ty ",
           "[BOS]<|im_user|>user<|im_middle|>hi<|im_end|>", "1234567 -3.14e10 $19.99", "<|reserved_token_2000|>",
           "def f(x):\n    return x ** 2  # ok\r\n", "Ελληνικά русский עברית العربية हिन्दी 日本語 한국어",
           ""]  # fmt: skip


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return synth_checkpoint(tmp_path_factory.mktemp("tok") / "ckpt", "tiny", "kimi-k2.5")


@pytest.fixture(scope="module")
def ours(ckpt):
    return load_tokenizer(ckpt, VOCAB)


@pytest.fixture(scope="module")
def direct(ckpt):
    """tiktoken.Encoding built directly from the files: ranks by tiktoken's loader, the special
    table from tokenizer_config.json as Kimi lays it out, the published pattern."""
    ranks = load_tiktoken_bpe(str(ckpt / "tiktoken.model"))
    named = {int(k): v["content"] for k, v in json.loads((ckpt / "tokenizer_config.json").read_text())[
        "added_tokens_decoder"].items()}  # fmt: skip
    specials = {named.get(i, f"<|reserved_token_{i}|>"): i for i in range(len(ranks), VOCAB)}
    return tiktoken.Encoding("direct", pat_str=PUBLISHED_PATTERN, mergeable_ranks=ranks, special_tokens=specials)


def test_the_committed_ranks_are_what_tiktokens_trainer_learns():
    assets = resources.files("kimi_jax").joinpath("assets", "text")
    corpus = assets.joinpath("corpus.txt").read_text(encoding="utf-8")
    committed = assets.joinpath(TRAINED_RANKS).read_bytes()
    assert format_ranks(train_ranks(corpus, 1792)) == committed


def test_files_follow_kimis_layout(ckpt, ours):
    ranks = load_tiktoken_bpe(str(ckpt / "tiktoken.model"))
    assert len(ranks) == VOCAB - 256 == ours.n_base
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    assert ours.named_token("bos_token") == 1792 == json.loads((ckpt / "config.json").read_text())["bos_token_id"]
    assert ours.named_token("eos_token") == 1793
    assert ours.token_id("<|im_end|>") == 1794 and ours.token_id("<|im_middle|>") == 1792 + 17
    assert ours.token_id("<|reserved_token_1800|>") == 1800 and ours.token_id("[PAD]") == VOCAB - 1
    assert config["added_tokens_decoder"]["1794"]["content"] == "<|im_end|>"
    assert [ours.is_special(t) for t in (1791, 1792, VOCAB - 1)] == [False, True, True]


@pytest.mark.parametrize("text", SAMPLES)
def test_encode_matches_tiktoken_built_directly(ours, direct, text):
    assert ours.encode(text) == direct.encode(text, allowed_special="all")
    assert ours.decode(ours.encode(text)) == text


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=60)
       | st.lists(st.sampled_from(["<|im_end|>", "[BOS]", " the", "你好", "\n", "  ", "'s", "99", "😀"]),
                  max_size=12).map("".join))
def test_round_trip_and_tiktoken_agree_on_any_text(ours, direct, text):
    ids = ours.encode(text)
    assert ids == direct.encode(text, allowed_special="all")
    assert ours.decode(ids) == text
    assert b"".join(ours.token_bytes(t) for t in ids) == text.encode()


def test_transformers_loader_reads_the_same_files_the_same_way(ckpt, ours):
    converter = pytest.importorskip("transformers.convert_slow_tokenizer").TikTokenConverter
    specials = sorted(ours.specials, key=ours.specials.get)
    hf = converter(vocab_file=str(ckpt / "tiktoken.model"), pattern=PUBLISHED_PATTERN,
                   extra_special_tokens=specials).converted()  # fmt: skip
    for text in SAMPLES:
        assert hf.encode(text).ids == ours.encode(text), text
        assert hf.decode(ours.encode(text), skip_special_tokens=False) == text


def test_long_runs_are_cut_as_kimi_cuts_them(ours, direct):
    for text in ("a" * 25_001, " " * 25_003 + "b", "x" + "\n" * 30_000):
        ids = ours.encode(text)
        assert ours.decode(ids) == text
    assert ours.encode("a" * 25_001) == direct.encode("a" * 25_000) + direct.encode("a")


def test_token_bytes_and_safe_text(ours):
    split = [t for t in range(256, ours.n_base) if not _valid_utf8(ours.token_bytes(t))]
    assert split, "the trained table has tokens that end inside a UTF-8 character"
    data = ours.token_bytes(split[0])
    shown = display_text(data)
    assert "\\x" in shown and shown.encode("ascii", "backslashreplace") and "\ufffd" not in shown
    assert display_text(b"\xe4\xbd\xa0\xe5") == "你\\xe5"
    assert ours.token_bytes(VOCAB) is None and ours.token_bytes(1794) == b"<|im_end|>"


def _valid_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _edit_config(folder, **changes):
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, **changes}))


def _copy(ckpt, tmp_path):
    return shutil.copytree(ckpt, tmp_path / "ckpt", ignore=shutil.ignore_patterns("*.safetensors"))


@pytest.mark.parametrize("damage, expected", [
    (lambda d: (d / "tiktoken.model").write_text("QQ== 0\nnot-base64! 1\n"),
     r"tiktoken.model:2: 'not-base64!' is not base64"),
    (lambda d: (d / "tiktoken.model").write_text("QQ== 0\nQg== 2\n"),
     r"ranks must run 0..1 without gaps; rank 1 is missing"),
    (lambda d: (d / "tiktoken.model").write_text("QQ== 0\nQQ== 1\n"),
     r"tiktoken.model:2: token b'A' already has rank 0"),
    (lambda d: (d / "tokenizer_config.json").unlink(), r"ships tiktoken.model but no tokenizer_config.json"),
    (lambda d: (d / "tokenizer_config.json").write_text('{"added_tokens_decoder": {"5": {"content": "x"}}}'),
     r"added_tokens_decoder.5: id 5 is outside the special tokens 1792..2047"),
    (lambda d: _edit_config(d, eos_token="<|nope|>"),
     r"eos_token: '<\|nope\|>' is not one of the special tokens"),
    (lambda d: (d / "tokenizer_config.json").write_text("{oops"), r"tokenizer_config.json: not valid JSON"),
])  # fmt: skip
def test_malformed_files_are_named(ckpt, tmp_path, damage, expected):
    folder = _copy(ckpt, tmp_path)
    damage(folder)
    with pytest.raises(TokenizerError, match=expected):
        load_tokenizer(folder, VOCAB)


def test_tokenizer_json_through_the_tokenizers_package(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    corpus = resources.files("kimi_jax").joinpath("assets", "text", "corpus.txt").read_text(encoding="utf-8")
    hf = tokenizers.Tokenizer(tokenizers.models.BPE())
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = tokenizers.decoders.ByteLevel()
    alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=600, special_tokens=["<s>", "</s>"], initial_alphabet=alphabet)
    hf.train_from_iterator([corpus], trainer)
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "</s>", "bos_token": "<s>"}')
    ours = load_tokenizer(tmp_path)
    assert isinstance(ours, JsonTokenizer) and ours.byte_level
    assert set(ours.files) == {"tokenizer.json", "tokenizer_config.json"}
    for text in SAMPLES:
        ids = ours.encode(text)
        assert ids == hf.encode(text).ids
        assert b"".join(ours.token_bytes(t) for t in ids) == text.encode()
    assert ours.named_token("eos_token") == hf.token_to_id("</s>") and ours.is_special(hf.token_to_id("<s>"))


def test_digest_covers_every_tokenizer_file(ckpt, tmp_path, ours):
    folder = _copy(ckpt, tmp_path)
    assert load_tokenizer(folder, VOCAB).digest == ours.digest
    (folder / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert load_tokenizer(folder, VOCAB).digest != ours.digest


# -- the bounds: a tokenizer file can make the tokenizer fail, never the process -----------------


def _json_folder(tmp_path, spec: dict):
    folder = tmp_path / "json-tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    return folder


@pytest.mark.parametrize("damage, expected", [
    (growing_normalizer, r"tokenizer.json: encoding text failed: the process doing it ended with signal SIGABRT: "
                         r"memory allocation of \d+ bytes failed"),
    (catastrophic_split, r"tokenizer.json: encoding text failed: PanicException: Onig: Regex search error: "
                         r"retry-limit-in-match over"),
])  # fmt: skip
def test_a_hostile_tokenizer_json_is_a_named_error_in_a_process_that_survives(tmp_path, damage, expected):
    """Main: a Rust allocation abort (SIGABRT) took the process down; a panic escaped as a raw
    traceback (pyo3's PanicException is a BaseException)."""
    ours = load_tokenizer(_json_folder(tmp_path, damage(byte_level_tokenizer())))
    assert ours.encode("abc") == [97, 98, 99]  # harmless text still encodes
    with pytest.raises(TokenizerError, match=expected):
        ours.encode(HOSTILE_TEXT)
    assert ours.encode("abc") == [97, 98, 99]  # a new worker took over
    assert b"".join(ours.token_bytes(t) for t in ours.encode("hé")) == "hé".encode()


@pytest.mark.parametrize("damage, expected", [
    (lambda d: _edit_config(d, added_tokens_decoder={"1792": {"content": "<|" + "x" * 10_000_000 + "|>"}}),
     r"added_tokens_decoder.1792: a token name of 10,000,004 characters; at most 1,024 are allowed"),
    (lambda d: (d / "tokenizer_config.json").write_text('{"added_tokens_decoder": {"1792": {"content": "\\ud800"}}}'),
     r"added_tokens_decoder.1792: the token name holds '\\ud800' at character 0, a lone surrogate"),
    (lambda d: sparse_file(d / "tiktoken.model", 240 << 20),
     r"tiktoken.model: tokenizer file is 251,658,240 bytes, more than the 33,554,432 a tiktoken.model"),
    (lambda d: (d / "tiktoken.model").write_text("QQ== " + "9" * 5000 + "\n"),
     r"tiktoken.model:1: expected 'BASE64 RANK' \(a rank below 10\*\*9\)"),
    (lambda d: (d / "tokenizer_config.json").write_text("[" * 100_000 + "]" * 100_000),
     r"tokenizer_config.json: JSON nested too deeply"),
    (lambda d: ((d / "tokenizer_config.json").unlink(), os.mkfifo(d / "tokenizer_config.json")),
     r"tokenizer_config.json: tokenizer config is a FIFO; expected a regular file"),
    (lambda d: ((d / "chat_template.jinja").unlink(), os.mkfifo(d / "chat_template.jinja")),
     r"chat_template.jinja: tokenizer file is a FIFO; expected a regular file"),
])  # fmt: skip
def test_tokenizer_files_are_capped_and_checked_before_tables_are_built(ckpt, tmp_path, damage, expected):
    """Main: a 10 MB special token cost 4.5 GiB, a 240 MB tiktoken.model 2.8 GiB, a 5,000-digit rank
    or 100,000-deep JSON an internal error, a lone surrogate an internal error."""
    folder = _copy(ckpt, tmp_path)
    damage(folder)
    with pytest.raises(TokenizerError, match=expected):
        load_tokenizer(folder, VOCAB)


def test_special_token_count_is_checked_against_the_vocabulary(ckpt, tmp_path):
    """A bundle's logits may declare up to 2**22 entries: main built that many special tokens."""
    with pytest.raises(TokenizerError, match=r"leaves 4,192,512 ids for special tokens after the 1,792 base tokens; "
                                             r"a tokenizer has at most 65,536"):  # fmt: skip
        load_tokenizer(_copy(ckpt, tmp_path), 2**22)
