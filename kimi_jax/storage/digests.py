"""Content digests per tensor: which weight bytes a checkpoint holds, named by BLAKE3.

The digest file (``checkpoint.b3.json`` beside the shards) maps every stored tensor name to
``{shard, offset, length, digest}``, the BLAKE3 of the tensor's bytes as stored. Tensors that are
read in parts also get one digest per *segment* of whole rows (``rows``: ``{row_bytes, digests}``,
``row_bytes`` being the segment's bytes), so a part is checked without reading the rest: the
embedding, which the engine reads row by row, has one per row; each other non-expert tensor
larger than :data:`SEGMENT_BYTES`, which the processes of a mesh read in shares of rows, has one
per ~1 MiB of whole rows (a share is widened to segment boundaries and the extra counted as
read and discarded). The file's ``root`` is one digest over all of it (:func:`content_root`); two
checkpoints with the same root and segments hold the same tensors, byte for byte, however they
are split into shards. Files written before segments (only the embedding's rows) are still read;
a run of several processes asks for the segments (:func:`unsegmented`).

``kimi-jax digest`` writes the file (:func:`compute_digests`): tensors are hashed in parallel
(BLAKE3 and ``preadv`` release the GIL), each finished tensor is appended to a journal
``checkpoint.b3.json.partial``, so a killed run resumes where it stopped, and the file appears
atomically at the end. A journal is resumed only when it is provably this machine's own for these
files: its first line records the identity (device, inode, size, mtime) of every shard and of the
journal itself, which a journal shipped with a checkpoint cannot match. When a digest file is
present the reader checks every tensor it reads against it (:class:`DigestTable`).

A digest file is a stranger's file like any other: it is read through a size limit
(:data:`MAX_DIGEST_FILE_BYTES`), regular files only, as bounded JSON, and every entry's types
and ranges are checked.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import blake3
import numpy as np

from kimi_jax.errors import CheckpointError, KimiJaxError, OutputError
from kimi_jax.fileio import open_regular, parse_json, read_regular, write_failure, write_json_atomic
from kimi_jax.storage.checkpoint import CheckpointIndex, open_checkpoint
from kimi_jax.storage.safetensors_header import TensorRecord

DIGEST_FILE = "checkpoint.b3.json"
DIGEST_FORMAT = "kimi-jax-tensor-digests"
DIGEST_FORMAT_VERSION = 1
# Segment of the non-expert tensors a mesh's processes read in shares: ~21,000 for Kimi K2.5's
# 21 GB, 1.3 MB of the digest file; a share's widening reads at most one segment more at each end.
SEGMENT_BYTES = 1 << 20
HASH_CHUNK = 16 << 20  # bytes per read while hashing: large enough for sequential speed, small for memory
# Kimi K2.5's digest file: about 210,000 tensors at ~250 bytes each plus 10 MB of embedding row
# digests, some 65 MB. Four times that is still a digest file; more is not.
MAX_DIGEST_FILE_BYTES = 256 << 20
JOURNAL_FORMAT = "kimi-jax-digest-journal"
_HEX64 = re.compile(r"[0-9a-f]{64}")


class DigestFileError(CheckpointError):
    """A digest file cannot be read, or does not describe the checkpoint it is beside."""


@dataclasses.dataclass(frozen=True)
class TensorDigest:
    shard: str  # shard file name
    offset: int  # absolute byte offset in the shard
    length: int
    digest: str  # BLAKE3 hex of the tensor's stored bytes


@dataclasses.dataclass(frozen=True)
class RowDigests:
    row_bytes: int  # bytes of one segment (a row of the embedding; whole rows of another tensor)
    digests: bytes  # 32 bytes per segment, concatenated (the last segment may be shorter)

    def row(self, i: int) -> str | None:
        return self.digests[32 * i : 32 * i + 32].hex() if 0 <= i < len(self.digests) // 32 else None


def segment_bytes(rec: TensorRecord, target: int = SEGMENT_BYTES) -> int | None:
    """Bytes of one segment of ``rec`` (whole rows, about ``target``), or None when the tensor is
    no larger than one: then its own digest checks any share of it (the share widened to all of it)."""
    if rec.nbytes <= target:
        return None
    row = rec.nbytes // rec.shape[0] if rec.shape and rec.shape[0] else rec.nbytes
    return max(row, target // row * row)


def unsegmented(table: "DigestTable", index) -> list[str]:
    """Tensors that processes read in shares but ``table`` checks only whole: those larger than its
    segments (every one, for a file from before segments). Each process would read all of them."""
    limit = table.segment_bytes or 0
    return [rec.stored_name for rec in shared_tensors(index) if rec.nbytes > limit and rec.stored_name not in table.rows]


def shared_tensors(index) -> list[TensorRecord]:
    """The tensors a mesh's processes read in shares of rows: every stored part of every layer's
    non-expert weights and of the head, but metadata (read whole by one process)."""
    from kimi_jax.storage.formats import METADATA_PARTS

    weights = [w for lm in index.layers for w in lm.base.values()] + list(index.head.values())
    return [rec for w in weights for part, rec in w.parts.items() if part not in METADATA_PARTS]


def content_root(tensors: dict[str, TensorDigest], rows: dict[str, RowDigests]) -> str:
    """BLAKE3 over the sorted lines ``NAME<TAB>LENGTH<TAB>DIGEST`` of every tensor and, for a tensor
    with row digests, ``NAME#rows<TAB>ROW_BYTES<TAB>BLAKE3(concatenated row digests)``. Shard names
    and offsets are left out: the root names the content, not how it is packed."""
    lines = [f"{name}\t{t.length}\t{t.digest}\n" for name, t in tensors.items()]
    lines += [f"{name}#rows\t{r.row_bytes}\t{blake3.blake3(r.digests).hexdigest()}\n" for name, r in rows.items()]
    h = blake3.blake3()
    for line in sorted(lines):
        h.update(line.encode())
    return h.hexdigest()


def weights_digest(read: dict[str, str]) -> str:
    """The digest of the weights one step read: BLAKE3 over the sorted lines ``NAME<TAB>DIGEST``, one
    per stored tensor read (a row of the embedding as ``NAME[ROW]``), each digest from the digest file."""
    h = blake3.blake3()
    for name in sorted(read):
        h.update(f"{name}\t{read[name]}\n".encode())
    return h.hexdigest()


def split_row_name(name: str) -> tuple[str, int] | None:
    """``'x.weight[17]'`` -> ``('x.weight', 17)``: the engine's label for one embedding row."""
    base, sep, rest = name.rpartition("[")
    if not sep or not rest.endswith("]") or not rest[:-1].isdigit():
        return None
    return base, int(rest[:-1])


@dataclasses.dataclass(frozen=True)
class DigestTable:
    """A loaded digest file: what every tensor's bytes must hash to."""

    source: str  # the file (path or URL), for messages
    tensors: dict[str, TensorDigest]
    rows: dict[str, RowDigests]
    root: str
    segment_bytes: int | None = None  # the size segments were written for (None: a file from before segments)

    def expected(self, rec: TensorRecord) -> str | None:
        """The digest ``rec``'s bytes must have, or None when the file does not cover that range."""
        entry = self.tensors.get(rec.stored_name)
        if entry is not None:
            same = entry.offset == rec.offset and entry.length == rec.nbytes and entry.shard == rec.shard.name
            return entry.digest if same else None
        row = split_row_name(rec.stored_name)
        if row is None or row[0] not in self.rows or row[0] not in self.tensors:
            return None
        base, rows = self.tensors[row[0]], self.rows[row[0]]
        if rec.nbytes != rows.row_bytes or rec.offset != base.offset + row[1] * rows.row_bytes:
            return None
        return rows.row(row[1])

    def segment_rows(self, rec: TensorRecord) -> int:
        """Rows per segment of the whole tensor ``rec`` (all its rows when it has no segments)."""
        rows = rec.shape[0] if rec.shape else 1
        seg = self.rows.get(rec.stored_name)
        row = rec.nbytes // rows if rows else 0
        if seg is None or not row or seg.row_bytes % row:
            return max(rows, 1)
        return seg.row_bytes // row

    def share_segments(self, rec: TensorRecord, start: int, stop: int) -> tuple[int, int, list[tuple[int, str]]]:
        """Rows ``start:stop`` of the whole tensor ``rec``, widened to segment boundaries: ``(first row,
        end row, [(bytes, digest) of each segment in order])``. A tensor without segments is one
        segment, its own digest (an embedding's segments are its rows). Raises KeyError when the
        file does not cover ``rec`` as stored."""
        whole = self.expected(rec)
        if whole is None:
            raise KeyError(rec.stored_name)
        rows = rec.shape[0] if rec.shape else 1
        per = self.segment_rows(rec)
        first, end = start // per * per, min(rows, -(-stop // per) * per)
        if per >= rows:
            return 0, rows, [(rec.nbytes, whole)]
        row = rec.nbytes // rows
        seg = self.rows[rec.stored_name]
        out = []
        for k in range(first // per, -(-end // per)):
            digest = seg.row(k)
            if digest is None:
                raise KeyError(rec.stored_name)
            out.append((min(per, rows - k * per) * row, digest))
        return first, end, out

    def check_matches(self, shards: list[tuple[str, list[TensorRecord]]]) -> None:
        """Every tensor of every shard must be in the file at the same shard, offset and length."""
        seen = 0
        for shard_name, records in shards:
            for rec in records:
                entry = self.tensors.get(rec.stored_name)
                where = f"{self.source}: tensor {rec.stored_name!r}"
                if entry is None:
                    raise DigestFileError(f"{where}: not in the digest file; it was written for another checkpoint "
                                          "(run `kimi-jax digest` again)")  # fmt: skip
                if (entry.shard, entry.offset, entry.length) != (shard_name, rec.offset, rec.nbytes):
                    raise DigestFileError(f"{where}: the digest file places it in {entry.shard} at offset "
                                          f"{entry.offset} ({entry.length} bytes), the checkpoint in {shard_name} at "
                                          f"offset {rec.offset} ({rec.nbytes} bytes); it was written for another "
                                          "checkpoint")  # fmt: skip
                seen += 1
        if seen != len(self.tensors):
            raise DigestFileError(f"{self.source}: lists {len(self.tensors)} tensors, the checkpoint has {seen}; "
                                  "it was written for another checkpoint")  # fmt: skip


def _count(value: Any, where: str, positive: bool = False) -> int:
    if type(value) is not int or value < (1 if positive else 0):
        raise DigestFileError(f"{where}: expected a{' positive' if positive else ' non-negative'} integer, got "
                              f"{str(value)[:40]!r}")  # fmt: skip
    return value


def _digest(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise DigestFileError(f"{where}: expected a BLAKE3 digest (64 lowercase hex digits), got {str(value)[:80]!r}")
    return value


def parse_digest_file(raw: bytes, source: str) -> DigestTable:
    """Read a digest file's bytes; every entry is checked, and its recorded root must recompute."""
    data = parse_json(raw, f"{source}: digest file", DigestFileError)
    if not isinstance(data, dict) or data.get("format") != DIGEST_FORMAT:
        raise DigestFileError(f"{source}: not a kimi-jax digest file (expected format {DIGEST_FORMAT!r})")
    if data.get("version") != DIGEST_FORMAT_VERSION or data.get("algorithm") != "blake3":
        raise DigestFileError(f"{source}: digest file version {str(data.get('version'))[:40]!r} / algorithm "
                              f"{str(data.get('algorithm'))[:40]!r}; this kimi-jax reads version "
                              f"{DIGEST_FORMAT_VERSION}, blake3")  # fmt: skip
    for key in ("tensors", "rows"):
        if not isinstance(data.get(key), dict):
            raise DigestFileError(f"{source}: {key}: expected an object")
    tensors, rows = {}, {}
    for name, e in data["tensors"].items():
        where = f"{source}: tensors[{name[:120]!r}]"
        if not isinstance(e, dict) or not isinstance(e.get("shard"), str) or not 0 < len(e["shard"]) <= 1024:
            raise DigestFileError(f"{where}: expected {{shard, offset, length, digest}} with a shard file name")
        tensors[name] = TensorDigest(e["shard"], _count(e.get("offset"), f"{where}.offset"),
                                     _count(e.get("length"), f"{where}.length"), _digest(e.get("digest"), f"{where}.digest"))  # fmt: skip
    for name, r in data["rows"].items():
        where = f"{source}: rows[{name[:120]!r}]"
        if not isinstance(r, dict) or not isinstance(r.get("digests"), str) or len(r["digests"]) % 64:
            raise DigestFileError(f"{where}: expected {{row_bytes, digests}} with 64 hex digits per row")
        try:
            digests = bytes.fromhex(r["digests"])
        except ValueError:
            raise DigestFileError(f"{where}.digests: not hex") from None
        rows[name] = RowDigests(_count(r.get("row_bytes"), f"{where}.row_bytes", positive=True), digests)
    for name, seg in rows.items():
        entry = tensors.get(name)
        if entry is None or len(seg.digests) // 32 != -(-entry.length // seg.row_bytes):
            raise DigestFileError(f"{source}: rows[{name[:120]!r}]: expected one digest per {seg.row_bytes} bytes of "
                                  "a tensor the file lists; the file is damaged")  # fmt: skip
    segments = data.get("segment_bytes")
    if segments is not None:
        segments = _count(segments, f"{source}: segment_bytes", positive=True)
    root = content_root(tensors, rows)
    if data.get("root") != root:
        raise DigestFileError(f"{source}: recorded root {str(data.get('root'))[:80]!r} does not recompute from its "
                              f"entries ({root}); the file was edited or damaged")  # fmt: skip
    return DigestTable(source, tensors, rows, root, segments)


def load_digest_file(path: Path, source: str | None = None) -> DigestTable:
    """The digest file at ``path``, read as a stranger's: a regular file of at most
    :data:`MAX_DIGEST_FILE_BYTES`, bounded JSON. Messages name ``source`` (a URL for a remote
    checkpoint's mirrored copy), else ``path``."""
    source = source or str(path)
    try:
        raw = read_regular(path, MAX_DIGEST_FILE_BYTES, "digest file", DigestFileError)
    except DigestFileError as e:
        raise DigestFileError(str(e).replace(str(path), source, 1)) from None
    return parse_digest_file(raw, source)


def shard_tensors(index) -> list[tuple[str, list[TensorRecord]]]:
    """``(shard name, every tensor in it)`` for each shard of a checkpoint index, vision tensors included."""
    return [(h.path.name, list(h.tensors)) for h in index.shards]


# -- computing ----------------------------------------------------------------------------------


def _hash_tensor(fd: int, rec: TensorRecord, row_bytes: int | None) -> tuple[str, bytes | None]:
    """BLAKE3 of one tensor's bytes read in chunks; with ``row_bytes``, also one digest per segment of
    that many bytes (the last one may be shorter)."""
    whole = blake3.blake3()
    rows = bytearray() if row_bytes else None
    chunk = HASH_CHUNK if not row_bytes else max(row_bytes, HASH_CHUNK // row_bytes * row_bytes)
    buf = np.empty(min(chunk, rec.nbytes), dtype=np.uint8)
    done = 0
    while done < rec.nbytes:
        n = min(chunk, rec.nbytes - done)
        view = memoryview(buf)[:n]
        got = 0
        while got < n:
            k = os.preadv(fd, [view[got:]], rec.offset + done + got)
            if k == 0:
                raise CheckpointError(f"{rec.shard}: unexpected end of file hashing tensor {rec.stored_name!r} at "
                                      f"offset {rec.offset + done + got}; the shard is truncated")  # fmt: skip
            got += k
        whole.update(view)
        if rows is not None:
            for start in range(0, n, row_bytes):
                rows += blake3.blake3(view[start : start + row_bytes]).digest()
        done += n
    return whole.hexdigest(), (bytes(rows) if rows is not None else None)


def _file_identity(path: Path) -> list[int]:
    st = os.stat(path)
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]


def _journal_header(index, journal_fd: int) -> dict[str, Any]:
    """What ties a journal to the run that writes it: the identity of every shard hashed and of the
    journal file itself (a copy of the journal, or of the shards, has other inodes)."""
    st = os.fstat(journal_fd)
    shards = {h.path.name: _file_identity(h.path) for h in index.shards}
    return {"journal": JOURNAL_FORMAT, "version": 1, "shards": shards, "self": [st.st_dev, st.st_ino]}


def _journal_entry(line: str) -> dict[str, Any] | None:
    """One finished tensor of the journal, or None for a line that is not one (a torn last line)."""
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not isinstance(entry.get("shard"), str):
        return None
    if any(type(entry.get(k)) is not int or entry[k] < 0 for k in ("offset", "length")):
        return None
    if not isinstance(entry.get("digest"), str) or not _HEX64.fullmatch(entry["digest"]):
        return None
    if "rows" in entry and (type(entry.get("row_bytes")) is not int or entry["row_bytes"] < 1
                            or not isinstance(entry["rows"], str) or len(entry["rows"]) % 64
                            or re.fullmatch(r"[0-9a-f]*", entry["rows"]) is None):  # fmt: skip
        return None
    return entry


def _journal_entries(journal: Path, index) -> tuple[dict[str, dict[str, Any]], str | None]:
    """Finished tensors of an interrupted run of this command on these files, and why a journal
    found there is not resumed (None when it is, or there is none)."""
    if not os.path.lexists(journal):
        return {}, None
    try:
        fd = open_regular(journal, "digest journal", CheckpointError)
    except CheckpointError as e:
        return {}, str(e)
    with os.fdopen(fd, "r", encoding="utf-8", errors="replace") as f:
        first = f.readline(1 << 20)
        try:
            header = json.loads(first)
        except ValueError:
            header = None
        if not isinstance(header, dict) or header != _journal_header(index, f.fileno()):
            return {}, (f"{journal}: not resumed: it was not written by `kimi-jax digest` of these files on this "
                        "machine (its first line does not record these shards and this journal file)")  # fmt: skip
        done: dict[str, dict[str, Any]] = {}
        for line in f:
            entry = _journal_entry(line)
            if entry is not None:
                done[entry["name"]] = entry
    return done, None


def compute_digests(index, out: Path | None = None, workers: int = 4,
                    on_progress: Callable[[int, int], None] | None = None,
                    on_note: Callable[[str], None] | None = None,
                    segments: int = SEGMENT_BYTES) -> tuple[Path, DigestTable, int]:  # fmt: skip
    """Hash every tensor of a local checkpoint into its digest file; returns (path, table, bytes
    hashed by this call). Resumes from the journal a killed run of this command left (``on_note``
    is told when it does, or why a journal found there is not resumed); ``on_progress(bytes, total)``.
    ``segments``: the size of the segments the shared non-expert tensors are digested in.
    A full or read-only disk is an OutputError; the journal then keeps what was hashed."""
    if index.source is not None:
        raise CheckpointError(f"{index.source}: `kimi-jax digest` reads a local copy; digest the checkpoint where its "
                              "files are, then serve checkpoint.b3.json beside them")  # fmt: skip
    out = Path(out) if out else index.root / DIGEST_FILE
    journal = out.with_name(out.name + ".partial")
    try:
        return _compute(index, out, journal, workers, on_progress, on_note or (lambda _: None), segments)
    except OSError as e:
        reason = write_failure(e)
        if reason is None:
            raise
        raise OutputError(f"{out}: cannot write the digest file: {reason}; the tensors hashed so far are kept in "
                          f"{journal.name}, and the same command continues from them") from None  # fmt: skip


def _compute(index, out: Path, journal: Path, workers: int, on_progress, note,
             segments: int) -> tuple[Path, DigestTable, int]:  # fmt: skip
    row_tensor = index.embed.parts["weight"]
    # bytes per segment of each tensor digested in segments: the embedding's rows, the shared tensors' ~segments
    segment_of = {rec.stored_name: segment_bytes(rec, segments) for rec in shared_tensors(index)}
    if row_tensor.shape and row_tensor.shape[0]:
        segment_of[row_tensor.stored_name] = row_tensor.nbytes // row_tensor.shape[0]
    todo = [(name, rec) for name, records in shard_tensors(index) for rec in records]
    previous, refused = _journal_entries(journal, index)
    if refused:
        note(refused)
    done: dict[str, dict[str, Any]] = {}
    for name, rec in todo:
        entry = previous.get(rec.stored_name)
        if entry and (entry["shard"], entry["offset"], entry["length"]) == (name, rec.offset, rec.nbytes) and \
                entry.get("row_bytes") == segment_of.get(rec.stored_name):  # fmt: skip
            done[rec.stored_name] = entry
    if done:
        note(f"resuming from {journal}: {len(done)} of {len(todo)} tensors were hashed by an earlier run")
    remaining = [(name, rec) for name, rec in todo if rec.stored_name not in done]
    total = sum(rec.nbytes for _, rec in todo)
    progress = [sum(rec.nbytes for _, rec in todo if rec.stored_name in done)]
    lock = threading.Lock()
    fds: dict[Path, int] = {}
    if os.path.lexists(journal) and not (journal.is_file() and not journal.is_symlink()):
        raise OutputError(f"{journal}: is not a regular file; the digest journal is written there (move it away)")
    with open(journal, "w", encoding="utf-8") as log:  # rewritten: our header, then only the valid entries
        log.write(json.dumps(_journal_header(index, log.fileno())) + "\n")
        log.writelines(json.dumps(e) + "\n" for e in done.values())
        log.flush()

        def work(item: tuple[str, TensorRecord]) -> None:
            name, rec = item
            with lock:
                fd = fds.get(rec.shard)
                if fd is None:
                    fd = fds[rec.shard] = os.open(rec.shard, os.O_RDONLY)
            rows_of = segment_of.get(rec.stored_name)
            digest, rows = _hash_tensor(fd, rec, rows_of)
            entry = {"name": rec.stored_name, "shard": name, "offset": rec.offset, "length": rec.nbytes,
                     "digest": digest}  # fmt: skip
            if rows is not None:
                entry.update(row_bytes=rows_of, rows=rows.hex())
            with lock:
                done[rec.stored_name] = entry
                log.write(json.dumps(entry) + "\n")
                log.flush()
                progress[0] += rec.nbytes
                if on_progress:
                    on_progress(progress[0], total)

        try:
            with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="kimi-jax-digest") as pool:
                list(pool.map(work, remaining))
        finally:
            for fd in fds.values():
                os.close(fd)
    tensors = {n: TensorDigest(e["shard"], e["offset"], e["length"], e["digest"]) for n, e in sorted(done.items())}
    rows = {n: RowDigests(e["row_bytes"], bytes.fromhex(e["rows"])) for n, e in sorted(done.items()) if "rows" in e}
    root = content_root(tensors, rows)
    write_json_atomic(out, {
        "format": DIGEST_FORMAT, "version": DIGEST_FORMAT_VERSION, "algorithm": "blake3", "root": root,
        "segment_bytes": segments,
        "tensors": {n: dataclasses.asdict(t) for n, t in tensors.items()},
        "rows": {n: {"row_bytes": r.row_bytes, "digests": r.digests.hex()} for n, r in rows.items()},
    })  # fmt: skip
    journal.unlink(missing_ok=True)
    return out, DigestTable(str(out), tensors, rows, root, segments), sum(rec.nbytes for _, rec in remaining)


# -- checkpoint identity ------------------------------------------------------------------------

IDENTITY_KEYS = ("layout", "config_digest", "tensor_list_digest")


def checkpoint_identity(record: dict[str, Any]) -> dict[str, Any]:
    """The identity fields of a checkpoint record (a ledger's ``checkpoint``, an anchor's): layout,
    config and tensor list digests, and the content root when the record has one."""
    ident = {k: record.get(k) for k in IDENTITY_KEYS}
    if record.get("content_root"):
        ident["content_root"] = record["content_root"]
    return ident


def identity_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Identity fields in which two checkpoint records differ. The content root is compared when both
    have one (then two checkpoints with the same layout but other weights differ); otherwise only the
    layout, config and tensor list can be."""
    keys = list(IDENTITY_KEYS) + (["content_root"] if a.get("content_root") and b.get("content_root") else [])
    return [k for k in keys if a.get(k) != b.get(k)]


def recorded_checkpoint(record: Any) -> tuple[CheckpointIndex | None, str]:
    """The checkpoint a record names (a ledger's or manifest's ``checkpoint``: its ``path``), opened,
    if it is on disk and is still that checkpoint (the same config and tensor list digests): returns
    ``(CheckpointIndex, "")``, or ``(None, why not)``. Only reads what the record points at."""
    path = record.get("path") if isinstance(record, dict) else None
    if not isinstance(path, str) or "://" in path or not (Path(path) / "config.json").is_file():
        return None, "the checkpoint is not available"
    try:
        index = open_checkpoint(path)
    except KimiJaxError as e:
        return None, f"the checkpoint at {path} cannot be opened ({e})"
    if index.config.digest() != record.get("config_digest") or index.tensor_list_digest() != record.get(
            "tensor_list_digest"):  # fmt: skip
        return None, f"the checkpoint at {path} is not the one recorded"
    return index, ""
