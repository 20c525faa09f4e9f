"""Property-based fuzzing of everything that reads files strangers hand us.

Targets: ``safetensors`` (the shard header parser and the checkpoint index), ``manifest`` (the
manifest loader with --set overrides), ``bundle`` (the ledger/bundle readers of verify, compare
and explore), ``archive`` (archive extraction), ``template`` (chat templates, generated from
jinja fragments and hostile operations, and mutations of the checkpoint's own), ``tokenizer``
(tiktoken.model, tokenizer_config.json and tokenizer.json, mutated or with generated normalizers
and regexes), ``digest`` (the digest file), ``remote`` (a checkpoint served from 127.0.0.1 by a
server whose every answer the fuzzer may rewrite: status, headers, body) and ``vindex`` (run
bundles' ledgers read for routing). The property, for every generated input: the call succeeds
or raises a ``KimiJaxError`` (verify always returns a report), never anything else; it writes
nothing outside its output and leaves no temporary files; what it returns is right where that
can be checked (a remote read's bytes are the local ones); and the whole run stays under the
memory bound, since it runs in a child whose address space is limited (RLIMIT_AS) to what it
held after warming up plus ``--bound-bytes`` (the template and tokenizer worker process has its
own limit, kimi_jax/text/worker.py).

``python -m tests.fuzz_targets TARGET --checkpoint CKPT --bundle BUNDLE --work DIR
(--examples N | --seconds S) [--report FILE]``; ``tests/test_fuzz.py`` runs it per target.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import resource
import shutil
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kimi_jax.errors import KimiJaxError
from tests.bounded_child import vm_bytes
from tests.hostile import SHARD, checkpoint_like, read_header, reseal

EXAMPLES = {"count": 0}

# -- shared strategies ----------------------------------------------------------------------------

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.integers(-3, 300),
                     st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12),
                     st.sampled_from(["F32", "BF16", "I32", "yarn", "..", "/etc/passwd", "NaN", "\x00", "step_00000"]))  # fmt: skip
json_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                             st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=12)  # fmt: skip


def _paths(value: Any, here: tuple = ()) -> list[tuple]:
    """Every path into a JSON value (keys and indices), the root first."""
    out = [here]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*here, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*here, i))
    return out


def _replace(value: Any, path: tuple, new: Any, delete: bool) -> Any:
    if not path:
        return new
    parent = value
    for key in path[:-1]:
        parent = parent[key]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = new
    return value


@st.composite
def mutated_json(draw, value: Any) -> Any:
    """``value`` with one to three places replaced by, or deleted in favour of, arbitrary JSON."""
    value = json.loads(json.dumps(value))
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(value)
        path = paths[draw(st.integers(0, len(paths) - 1))]
        value = _replace(value, path, draw(json_values), delete=bool(path) and draw(st.booleans()))
    return value


@st.composite
def mutated_bytes(draw, data: bytes) -> bytes:
    """``data`` with a few bytes flipped, a slice cut out or random bytes spliced in."""
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "cut", "splice", "truncate"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "cut":
            del data[at : at + draw(st.integers(1, 64))]
        elif kind == "splice":
            data[at:at] = draw(st.binary(max_size=32))
        else:
            del data[at:]
    return bytes(data)


# -- the property ---------------------------------------------------------------------------------


def _snapshot(root: Path, skip: Path | None = None) -> dict[str, tuple]:
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if skip is not None and Path(dirpath) == skip.parent:
            dirnames[:] = [d for d in dirnames if Path(dirpath, d) != skip]
            filenames = [f for f in filenames if Path(dirpath, f) != skip]
        for name in dirnames:  # a folder's own times change with what is written inside it
            found[os.path.relpath(os.path.join(dirpath, name), root)] = (os.lstat(os.path.join(dirpath, name)).st_mode,)
        for name in filenames:
            st_ = os.lstat(os.path.join(dirpath, name))
            found[os.path.relpath(os.path.join(dirpath, name), root)] = (st_.st_mode, st_.st_size, st_.st_mtime_ns)
    return found


def holds(call: Callable[[], Any], inputs: Path, output: Path | None = None) -> Any:
    """Run ``call``; only a KimiJaxError may escape it (anything else fails the example), and
    nothing under ``inputs`` but ``output`` may change, nor may a temporary file be left."""
    before, temp_before = _snapshot(inputs, output), set(os.listdir(tempfile.gettempdir()))
    try:
        result = call()
    except KimiJaxError:
        result = None
    assert _snapshot(inputs, output) == before, "wrote outside its output"
    assert set(os.listdir(tempfile.gettempdir())) <= temp_before, "left temporary files"
    return result


def _fresh(work: Path, name: str) -> Path:
    path = work / name
    if path.exists() or path.is_symlink():
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    return path


# -- targets --------------------------------------------------------------------------------------

_DTYPES = st.one_of(st.sampled_from(["F32", "BF16", "F16", "I32", "I64", "U8", "F8_E4M3", "BOOL"]), json_values)
_entries = st.one_of(
    st.fixed_dictionaries({"dtype": _DTYPES, "shape": st.one_of(st.lists(st.integers(0, 6), max_size=3), json_values),
                           "data_offsets": st.one_of(st.lists(st.integers(-8, 300), min_size=2, max_size=2),
                                                     json_values)}),  # fmt: skip
    json_values,
)
_headers = st.dictionaries(st.text(max_size=10), _entries, max_size=5)


def safetensors_target(ckpt: Path, work: Path):
    from kimi_jax.storage.checkpoint import open_checkpoint
    from kimi_jax.storage.safetensors_header import DTYPE_SIZES, read_shard_header

    config = json.loads((ckpt / "config.json").read_text())
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    header, body = read_header(ckpt / SHARD)
    shard_bytes = (ckpt / SHARD).read_bytes()

    @st.composite
    def shards(draw) -> bytes:
        kind = draw(st.sampled_from(["generated", "mutated-header", "mutated-bytes"]))
        if kind == "mutated-bytes":
            return draw(mutated_bytes(shard_bytes[:4096])) + shard_bytes[4096:]
        head = draw(_headers) if kind == "generated" else draw(mutated_json(header))
        blob = json.dumps(head).encode() if draw(st.booleans()) else draw(mutated_bytes(json.dumps(head).encode()))
        length = len(blob) if draw(st.integers(0, 5)) else draw(st.integers(0, 2**64 - 1))
        data = body if kind == "mutated-header" else draw(st.binary(max_size=256))
        return length.to_bytes(8, "little") + blob + data

    def run(data: bytes, config_change, index_change) -> None:
        EXAMPLES["count"] += 1
        shard = _fresh(work, "one.safetensors")
        shard.write_bytes(data)
        parsed = holds(lambda: read_shard_header(shard), work)
        if parsed is not None:  # accepted: its tensors tile the data section exactly
            spans = sorted((r.offset, r.offset + r.nbytes) for r in parsed.tensors)
            assert (spans[0][0] if spans else parsed.data_start) == parsed.data_start
            assert (spans[-1][1] if spans else parsed.data_start) == parsed.file_size
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
            assert all(r.nbytes == DTYPE_SIZES[r.dtype] * _prod(r.shape) for r in parsed.tensors)
        folder = checkpoint_like(ckpt, _fresh(work, "ckpt"))
        (folder / SHARD).unlink()
        (folder / SHARD).write_bytes(data if config_change is None and index_change is None else shard_bytes)
        for name, change in (("config.json", config_change), ("model.safetensors.index.json", index_change)):
            if change is not None:
                (folder / name).unlink()
                (folder / name).write_text(json.dumps(change))
        holds(lambda: open_checkpoint(folder), work)

    return run, {"data": shards(), "config_change": st.one_of(st.none(), mutated_json(config)),
                 "index_change": st.one_of(st.none(), mutated_json(index))}  # fmt: skip


def _prod(shape) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


_FIELDS = ["version", "model", "model.checkpoint", "model.synthetic", "model.synthetic.preset", "model.cache_dir",
           "prompt", "prompt.tokens", "prompt.text", "generate.max_new_tokens", "generate.kv_cache", "capture",
           "anchor", "output.dir", "storage.io_retries", "vindex", "vindex.prompts", "compute.dtype", "x.y.z"]  # fmt: skip
_yaml_scalars = st.one_of(st.sampled_from(["1", "true", "null", "~", "[1, 2]", "{a: 1}", "!!python/object:os.system",
                                           "*a", "&a [1]", "5.0", "'5'", "-1", "1e400", ".nan", "[[[[[[]]]]]]",
                                           "{x: *x}", "0x10", "2001-01-01"]), st.text(max_size=20))  # fmt: skip


def manifest_target(ckpt: Path, work: Path):
    import yaml

    from kimi_jax.manifest import load_manifest

    base = {"version": 1, "model": {"checkpoint": str(ckpt)}, "prompt": {"tokens": [7, 300]},
            "generate": {"max_new_tokens": 2}, "output": {"dir": "out"}}  # fmt: skip

    @st.composite
    def texts(draw) -> str:
        kind = draw(st.sampled_from(["structured", "text-edit", "value-edit"]))
        if kind == "structured":
            return yaml.safe_dump(draw(mutated_json(base)))
        text = yaml.safe_dump(base, default_flow_style=draw(st.booleans()))
        if kind == "text-edit":
            return draw(mutated_bytes(text.encode())).decode("utf-8", "replace")
        lines = text.splitlines()
        at = draw(st.integers(0, len(lines) - 1))
        key = lines[at].split(":", 1)[0]
        lines[at] = f"{key}: {draw(_yaml_scalars)}"
        return "\n".join(lines) + "\n"

    overrides = st.lists(st.builds(lambda k, v: f"{k}={v}", st.sampled_from(_FIELDS), _yaml_scalars), max_size=3)

    def run(text: str, sets: list[str], out) -> None:
        EXAMPLES["count"] += 1
        path = _fresh(work, "m.yaml")
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        manifest = holds(lambda: load_manifest(path, sets, out), work)
        if manifest is not None:
            assert len(manifest.digest()) == 64 and manifest.resolved_dict()["version"] == 1

    return run, {"text": texts(), "sets": overrides, "out": st.one_of(st.none(), st.sampled_from(["o", "~", "/", ""]))}


_BUNDLE_JSON = ["ledger.json", "receipt.json", "manifest.json", "provenance.json", "non_perturbation.json",
                "environment.json", "arrays/_METADATA", "arrays/_CHECKPOINT_METADATA"]  # fmt: skip


def bundle_target(bundle: Path, work: Path):
    from kimi_jax.explorer.page import write_explorer
    from kimi_jax.verify.checklist import verify_bundle
    from kimi_jax.verify.compare_bundles import compare_bundles

    texts = {name: json.loads((bundle / name).read_text()) for name in _BUNDLE_JSON}
    raw_files = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())

    @st.composite
    def damage(draw) -> tuple[str, bytes]:
        if draw(st.integers(0, 3)):
            name = draw(st.sampled_from(_BUNDLE_JSON))
            value = draw(mutated_json(texts[name]))
            return name, json.dumps(value, indent=draw(st.sampled_from([None, 1]))).encode()
        name = draw(st.sampled_from(raw_files))
        return name, draw(mutated_bytes((bundle / name).read_bytes()[:65536]))

    def run(changes: list[tuple[str, bytes]], resealed: bool) -> None:
        EXAMPLES["count"] += 1
        root = Path(shutil.copytree(bundle, _fresh(work, "bundle")))
        for name, data in changes:
            (root / name).write_bytes(data)
        if resealed:
            try:
                reseal(root)  # what a forger does, so the checks behind the checksums run too
            except (ValueError, KeyError, TypeError, AttributeError):
                pass  # the receipt itself is no longer a JSON object
        report = holds(lambda: verify_bundle(root), work)
        assert report is not None and report.checks, "verify raised instead of reporting"
        holds(lambda: compare_bundles(bundle, root), work)
        page = root / "explorer.html"
        page.unlink(missing_ok=True)
        holds(lambda: write_explorer(root), work, output=page)

    return run, {"changes": st.lists(damage(), min_size=1, max_size=2), "resealed": st.booleans()}


_NAMES = st.one_of(st.sampled_from(["b/ledger.json", "b", "b/", "/etc/x", "../x", "b/../../x", "./b/a", "b//c", "",
                                    "b/arrays/d/ff", "C:\\x", "b\\..\\x", "b/" + "a" * 300, "b/\u00e9"]),
                   st.text(max_size=20))  # fmt: skip
_KINDS = [tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE, tarfile.CHRTYPE,
          tarfile.CONTTYPE, tarfile.GNUTYPE_SPARSE, b"x", b"g", b"V", b"Z"]  # fmt: skip


@st.composite
def tar_archives(draw) -> bytes:
    buf = io.BytesIO()
    fmt = draw(st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT]))
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for _ in range(draw(st.integers(0, 5))):
            info = tarfile.TarInfo(draw(_NAMES))
            info.type = draw(st.sampled_from(_KINDS))
            info.linkname = draw(_NAMES) if info.type in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
            data = draw(st.binary(max_size=64)) if info.type in (tarfile.REGTYPE, tarfile.CONTTYPE) else b""
            info.size = len(data)
            if fmt == tarfile.PAX_FORMAT and draw(st.booleans()):
                info.pax_headers = draw(st.dictionaries(st.sampled_from(["size", "path", "GNU.sparse.map", "x"]),
                                                        st.sampled_from(["0", "99999999999", "../x", "1,2"]), max_size=2))  # fmt: skip
            try:
                tar.addfile(info, io.BytesIO(data))
            except (ValueError, tarfile.TarError, UnicodeError):
                continue  # a name this format cannot write
    raw = buf.getvalue()
    if draw(st.booleans()):
        raw = draw(mutated_bytes(raw[:2048])) + raw[2048:]
    return gzip.compress(raw, mtime=0) if draw(st.booleans()) else raw


def archive_target(bundle: Path, work: Path):
    from kimi_jax.ledger.archive import archive_bundle, is_archive, safe_extract

    good = archive_bundle(bundle, work / "good.tar.gz").read_bytes()
    (work / "good.tar.gz").unlink()

    def run(data: bytes) -> None:
        EXAMPLES["count"] += 1
        archive = _fresh(work, "a.tar.gz")
        archive.write_bytes(data)
        dest = _fresh(work, "dest")
        holds(lambda: (is_archive(archive), safe_extract(archive, dest)), work, output=dest)
        for dirpath, dirnames, filenames in os.walk(dest):  # only regular files and folders, all inside
            for name in dirnames + filenames:
                path = Path(dirpath, name)
                assert not path.is_symlink() and (path.is_dir() or path.is_file()), path
                assert Path(os.path.realpath(path)).is_relative_to(os.path.realpath(dest))

    return run, {"data": st.one_of(tar_archives(), mutated_bytes(good))}


# -- chat templates --------------------------------------------------------------------------------

_BIG = st.sampled_from([10**9, 10**10, 2**64, 10**100, 100_000, 100_001, 4_194_305, -(10**9)])
_INTS = st.one_of(st.integers(-5, 50), _BIG)
_LEAVES = st.one_of(
    _INTS.map(str), st.sampled_from(["messages", "messages[0]", "messages[0].content", "'x'", "'ab'", "''", "none",
                                     "true", "[1, 2]", "{'a': 1}", "add_generation_prompt", "bos_token", "loop",
                                     "range", "ns", "ns.s", "lipsum", "namespace", "cycler", "joiner", "dict"]))  # fmt: skip


@st.composite
def template_expressions(draw, depth: int = 0) -> str:
    if depth > 3 or draw(st.integers(0, 3)) == 0:
        return draw(_LEAVES)
    kind = draw(st.sampled_from(["binop", "call", "filter", "method", "attr", "index", "concat"]))
    inner = draw(template_expressions(depth + 1))
    if kind == "binop":
        return f"({inner} {draw(st.sampled_from(['**', '*', '+', '%', '//', '-', '~', 'in', '==']))} " \
               f"{draw(template_expressions(depth + 1))})"  # fmt: skip
    if kind == "call":
        name = draw(st.sampled_from(["range", "lipsum", "raise_exception", "dict", "namespace", "cycler", "strftime_now"]))
        return f"{name}({inner})"
    if kind == "filter":
        f = draw(st.sampled_from(["join", "center", "indent", "format", "batch", "slice", "replace", "tojson", "list",
                                  "string", "sum", "length", "first", "wordwrap", "truncate", "int", "float", "round",
                                  "unique", "sort", "reverse", "map('string')", "select"]))  # fmt: skip
        args = draw(st.lists(template_expressions(depth + 1), max_size=2))
        return f"({inner}|{f}{'(' + ', '.join(args) + ')' if args and '(' not in f else ''})"
    if kind == "method":
        m = draw(st.sampled_from(["replace", "join", "format", "center", "ljust", "zfill", "split", "upper", "items",
                                  "expandtabs", "count", "startswith", "__class__", "mro"]))  # fmt: skip
        args = draw(st.lists(template_expressions(depth + 1), max_size=2))
        return f"{inner}.{m}({', '.join(args)})"
    if kind == "attr":
        return f"{inner}.{draw(st.sampled_from(['content', 'role', '__class__', '__globals__', 'x']))}"
    if kind == "index":
        return f"{inner}[{draw(template_expressions(depth + 1))}]"
    return f"{inner} ~ {draw(template_expressions(depth + 1))}"


@st.composite
def template_sources(draw, depth: int = 0) -> str:
    parts = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["output", "for", "set", "if", "macro", "text", "raw"] if depth < 2 else
                                    ["output", "set", "text"]))  # fmt: skip
        expr = draw(template_expressions())
        if kind == "output":
            parts.append(f"{{{{ {expr} }}}}")
        elif kind == "for":
            parts.append(f"{{% for x in {expr} %}}{draw(template_sources(depth + 1))}{{% endfor %}}")
        elif kind == "set":
            parts.append(f"{{% set ns = namespace(s={expr}) %}}{{% set ns.s = ns.s ~ ns.s %}}")
        elif kind == "if":
            parts.append(f"{{% if {expr} %}}{draw(template_sources(depth + 1))}{{% endif %}}")
        elif kind == "macro":
            parts.append(f"{{% macro m(n) %}}{draw(template_sources(depth + 1))}{{{{ m(n) }}}}{{% endmacro %}}"
                         f"{{{{ m({expr}) }}}}")  # fmt: skip
        elif kind == "text":
            parts.append(draw(st.text(max_size=12)))
        else:
            parts.append(draw(st.sampled_from(["{% for", "{{", "{% endfor %}", "}}", "{#", "{% raw %}"])))
    return "".join(parts)


def template_target(ckpt: Path, work: Path):
    from kimi_jax.text import chat as chat_mod
    from kimi_jax.text.chat import render_chat
    from kimi_jax.text.sandbox import MAX_RENDERED_CHARS
    from kimi_jax.text.tokenizer import load_tokenizer

    chat_mod.RENDER_SECONDS = 3.0  # the mechanism is the same at any limit; the fuzzer's time is not
    folder = Path(shutil.copytree(ckpt, work / "tok", ignore=shutil.ignore_patterns("*.safetensors")))
    original = (ckpt / "chat_template.jinja").read_bytes()
    tokenizer = load_tokenizer(folder, 2048)
    messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "x"]),
                                               "content": st.text(max_size=40)}), min_size=1, max_size=3)  # fmt: skip
    sources = st.one_of(template_sources(), mutated_bytes(original).map(lambda b: b.decode("utf-8", "replace")))

    def run(source: str, chat: list, generation_prompt: bool) -> None:
        EXAMPLES["count"] += 1
        (folder / "chat_template.jinja").write_text(source, encoding="utf-8", errors="surrogatepass")
        started = time.monotonic()
        text = holds(lambda: render_chat(tokenizer, chat, generation_prompt), work)
        assert time.monotonic() - started < chat_mod.RENDER_SECONDS + 10
        if text is not None:
            assert isinstance(text, str) and len(text) <= MAX_RENDERED_CHARS

    return run, {"source": sources, "chat": messages, "generation_prompt": st.booleans()}


# -- tokenizer files -----------------------------------------------------------------------------

_NORMALIZERS = st.one_of(
    st.builds(lambda p, c: {"type": "Replace", "pattern": p, "content": c},
              st.one_of(st.builds(lambda t: {"String": t}, st.text(max_size=3)),
                        st.builds(lambda t: {"Regex": t}, st.sampled_from(["", "a*", "(a+)+$", ".", "l", "[", "\\p{L}"]))),
              st.one_of(st.text(max_size=5), st.integers(1, 3000).map(lambda n: "l" * n))),
    st.sampled_from([{"type": "NFKC"}, {"type": "Lowercase"}, {"type": "Strip", "strip_left": True, "strip_right": True},
                     {"type": "Prepend", "prepend": "▁"}, {"type": "BertNormalizer"}, {"type": "Nope"}]),
)  # fmt: skip
_PRE_TOKENIZERS = st.one_of(
    st.builds(lambda r, b: {"type": "Split", "pattern": {"Regex": r}, "behavior": b, "invert": False},
              st.sampled_from(["(a+)+$", "\\s+", "(x|x)*y", "", "[", "\\p{N}{1,3}", "(?=a)"]),
              st.sampled_from(["Isolated", "Removed", "MergedWithNext", "Contiguous", "Bogus"])),
    st.sampled_from([{"type": "ByteLevel", "add_prefix_space": False}, {"type": "Whitespace"},
                     {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always"}, {"type": "Digits"}]),
)  # fmt: skip


def tokenizer_target(ckpt: Path, work: Path):
    from kimi_jax.text.chat import render_chat
    from kimi_jax.text.tokenizer import load_tokenizer
    from tests.hostile import byte_level_tokenizer

    ranks = (ckpt / "tiktoken.model").read_bytes()
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    spec = byte_level_tokenizer()

    @st.composite
    def folders(draw) -> dict[str, bytes]:
        kind = draw(st.sampled_from(["tiktoken", "tiktoken", "json", "json"]))
        files = {"tokenizer_config.json": json.dumps(draw(st.one_of(st.just(config), mutated_json(config)))).encode()}
        if kind == "tiktoken":
            files["tiktoken.model"] = draw(st.one_of(st.just(ranks), mutated_bytes(ranks[:8192]).map(lambda b: b + ranks[8192:])))
        else:
            value = draw(st.one_of(mutated_json(spec), st.builds(
                lambda n, t: {**spec, "normalizer": {"type": "Sequence", "normalizers": n},
                              "pre_tokenizer": {"type": "Sequence", "pretokenizers": t}},
                st.lists(_NORMALIZERS, max_size=4), st.lists(_PRE_TOKENIZERS, max_size=3))))  # fmt: skip
            files["tokenizer.json"] = json.dumps(value).encode()
        return files

    texts = st.one_of(st.text(max_size=40), st.sampled_from(["hello world " * 50 + "a" * 3000 + "b", "<|im_end|>",
                                                             "[BOS]x", "\ud800", "1234567"]))  # fmt: skip

    def run(files: dict[str, bytes], text: str, vocab: int) -> None:
        EXAMPLES["count"] += 1
        folder = _fresh(work, "tok")
        folder.mkdir()
        for name, data in files.items():
            (folder / name).write_bytes(data)
        (folder / "chat_template.jinja").write_bytes((ckpt / "chat_template.jinja").read_bytes())

        def use():
            tokenizer = load_tokenizer(folder, vocab)
            try:
                ids = tokenizer.encode(text)
                assert all(isinstance(i, int) for i in ids)
                for token in ids[:20]:
                    data = tokenizer.token_bytes(token)
                    assert data is None or isinstance(data, bytes)
                render_chat(tokenizer, [{"role": "user", "content": text}])
            finally:
                tokenizer.close()

        holds(use, work)

    return run, {"files": folders(), "text": texts, "vocab": st.sampled_from([2048, 1793, 2**22, 1])}


# -- digest files ------------------------------------------------------------------------------------


def digest_target(ckpt: Path, work: Path):
    from kimi_jax.storage.checkpoint import open_checkpoint
    from kimi_jax.storage.digests import compute_digests, load_digest_file, shard_tensors

    index = open_checkpoint(ckpt)
    compute_digests(index, work / "good.b3.json", workers=1)
    good = json.loads((work / "good.b3.json").read_text())
    raw = (work / "good.b3.json").read_bytes()
    (work / "good.b3.json").unlink()

    def run(data: bytes) -> None:
        EXAMPLES["count"] += 1
        path = _fresh(work, "d.b3.json")
        path.write_bytes(data)

        def load():
            table = load_digest_file(path)
            table.check_matches(shard_tensors(index))
            assert table.root == good["root"], "a digest file that passed every check names other weights"

        holds(load, work)

    data = st.one_of(st.builds(lambda v: json.dumps(v).encode(), mutated_json(good)), mutated_bytes(raw[:4096])
                     .map(lambda b: b + raw[4096:]), st.builds(lambda v: json.dumps(v).encode(), json_values))  # fmt: skip
    return run, {"data": data}


# -- remote responses ---------------------------------------------------------------------------------

_STATUSES = st.sampled_from([200, 206, 204, 301, 304, 400, 403, 404, 416, 429, 500, 503])
_HEADER_CHANGES = st.dictionaries(
    st.sampled_from(["Content-Length", "Content-Range", "ETag", "Last-Modified", "Content-Encoding",
                     "Transfer-Encoding", "Content-Type"]),
    st.one_of(st.none(), st.sampled_from(["gzip", "identity", "br", "0", "-1", "99999999999999999999", "bytes 0-0/1",
                                          "bytes */0", '"other"', "W/\"x\"", "chunked", "x" * 200])),
    max_size=2)  # fmt: skip


def remote_target(ckpt: Path, work: Path):
    """A checkpoint (with its digest file) served from 127.0.0.1; each example rewrites some of the
    server's answers (by request number). Whatever the server does, the client returns the local
    bytes or raises a KimiJaxError, within its deadlines."""
    from kimi_jax.storage.digests import compute_digests
    from kimi_jax.storage.reader import ShardReader
    from kimi_jax.storage.remote import RemoteSettings
    from kimi_jax.storage.source import open_source
    from tests.range_server import folder_server

    served = Path(shutil.copytree(ckpt, work / "served", ignore=shutil.ignore_patterns("*.b3.json*")))
    from kimi_jax.storage.checkpoint import open_checkpoint

    local = open_checkpoint(served)
    compute_digests(local, workers=1)
    names = sorted(local.weights)[:6]
    with ShardReader() as reader:
        want = {n: {k: a.tobytes() for k, a in parts.items()}
                for n, parts in reader.read_weights([local.weights[n] for n in names], None).items()}  # fmt: skip
    server = folder_server(served).__enter__()
    settings = RemoteSettings(timeout_s=1.0, retries=1, backoff_s=0.001, max_in_flight=4, request_bytes=1 << 14)

    @st.composite
    def plans(draw) -> dict[int, tuple]:
        plan = {}
        for _ in range(draw(st.integers(1, 4))):
            number = draw(st.integers(0, 40))
            plan[number] = (draw(st.one_of(st.none(), _STATUSES)), draw(_HEADER_CHANGES),
                            draw(st.sampled_from(["keep", "truncate", "extend", "flip", "empty", "garbage"])))
        return plan

    def run(plan: dict[int, tuple]) -> None:
        EXAMPLES["count"] += 1
        seen = [0]

        def rewrite(path: str, status: int, headers: dict, body: bytes):
            n, seen[0] = seen[0], seen[0] + 1
            if n not in plan:
                return status, headers, body
            new_status, changes, how = plan[n]
            for key, value in changes.items():
                headers.pop(key, None) if value is None else headers.__setitem__(key, value)
            body = {"keep": body, "truncate": body[: len(body) // 2], "extend": body + b"\0" * 64, "empty": b"",
                    "flip": bytes([body[0] ^ 1]) + body[1:] if body else body, "garbage": b"\xff" * 32}[how]  # fmt: skip
            return new_status or status, headers, body

        server.faults.rewrite = rewrite
        cache = _fresh(work, "cache")

        def read():
            source = open_source(server.base + "/ckpt/", cache, remote=settings)
            try:
                got = source.reader(settings.retries).read_weights([source.index.weights[n] for n in names], None)
                assert {n: {k: a.tobytes() for k, a in parts.items()} for n, parts in got.items()} == want
            finally:
                source.close()

        started = time.monotonic()
        holds(read, work, output=cache)
        assert time.monotonic() - started < 120
        server.faults.rewrite = None

    return run, {"plan": plans()}


# -- vindex ledgers ------------------------------------------------------------------------------------


def vindex_target(bundle: Path, work: Path):
    from kimi_jax.vindex.routing import read_ledger

    ledger = json.loads((bundle / "ledger.json").read_text())
    raw = (bundle / "ledger.json").read_bytes()

    def run(data: bytes, n_layers: int, n_experts: int) -> None:
        EXAMPLES["count"] += 1
        folder = _fresh(work, "b")
        folder.mkdir()
        (folder / "ledger.json").write_bytes(data)
        trace = holds(lambda: read_ledger(folder, n_layers, n_experts), work)
        for layer, (experts, weights) in (trace or {}).items():
            assert 0 <= layer < n_layers and experts.shape == weights.shape
            assert experts.size == 0 or (experts.min() >= 0 and experts.max() < n_experts)

    data = st.one_of(st.builds(lambda v: json.dumps(v).encode(), mutated_json(ledger)),
                     mutated_bytes(raw[:4096]).map(lambda b: b + raw[4096:]))  # fmt: skip
    return run, {"data": data, "n_layers": st.integers(1, 6), "n_experts": st.integers(1, 32)}


TARGETS = {"safetensors": lambda a, w: safetensors_target(a.checkpoint, w),
           "manifest": lambda a, w: manifest_target(a.checkpoint, w),
           "bundle": lambda a, w: bundle_target(a.bundle, w),
           "archive": lambda a, w: archive_target(a.bundle, w),
           "template": lambda a, w: template_target(a.checkpoint, w),
           "tokenizer": lambda a, w: tokenizer_target(a.checkpoint, w),
           "digest": lambda a, w: digest_target(a.checkpoint, w),
           "remote": lambda a, w: remote_target(a.checkpoint, w),
           "vindex": lambda a, w: vindex_target(a.bundle, w)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("target", choices=sorted(TARGETS))
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--examples", type=int, default=100, help="examples per batch (the whole run without --seconds)")
    parser.add_argument("--seconds", type=float, default=0.0, help="keep running batches of new examples this long")
    parser.add_argument("--derandomize", action="store_true", help="the same examples every run (CI)")
    parser.add_argument("--bound-bytes", type=int, default=2 << 30)
    parser.add_argument("--report", type=Path)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    body, strategies = TARGETS[args.target](args, args.work)

    def runs(examples: int, derandomize: bool):
        return settings(max_examples=examples, derandomize=derandomize, deadline=None, database=None,
                        suppress_health_check=list(HealthCheck))(given(**strategies)(body))  # fmt: skip

    batch = runs(args.examples, args.derandomize)
    runs(2, True)()  # warm up: imports, threads, caches
    limit = vm_bytes() + args.bound_bytes
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    EXAMPLES["count"] = 0
    started = time.monotonic()
    batch()
    while time.monotonic() - started < args.seconds:
        batch()
    summary = {"target": args.target, "examples": EXAMPLES["count"], "seconds": round(time.monotonic() - started, 1),
               "address_space_limit": limit, "peak_address_space": vm_bytes("VmPeak")}  # fmt: skip
    print(json.dumps(summary))
    if args.report:
        args.report.write_text(json.dumps(summary))


if __name__ == "__main__":
    main()
