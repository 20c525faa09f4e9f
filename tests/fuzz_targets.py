"""Property-based fuzzing of everything that reads files strangers hand us.

Targets: ``safetensors`` (the shard header parser and the checkpoint index), ``manifest`` (the
manifest loader with --set overrides), ``bundle`` (the ledger/bundle readers of verify, compare
and explore), ``archive`` (archive extraction). The property, for every generated input: the
call succeeds or raises a ``KimiJaxError`` (verify always returns a report), never anything
else; it writes nothing outside its output and leaves no temporary files; and the whole run
stays under the memory bound, since it runs in a child whose address space is limited
(RLIMIT_AS) to what it held after warming up plus ``--bound-bytes``.

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


TARGETS = {"safetensors": lambda a, w: safetensors_target(a.checkpoint, w),
           "manifest": lambda a, w: manifest_target(a.checkpoint, w),
           "bundle": lambda a, w: bundle_target(a.bundle, w),
           "archive": lambda a, w: archive_target(a.bundle, w)}  # fmt: skip


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
