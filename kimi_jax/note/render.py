"""``note.pdf`` and ``certification.json`` from a bundle's files, and ``kimi-jax note``.

``certification.json`` is the note's certification table as data (verify's certification checks
run on the bundle when it was written), for the explorer's "verify this bundle" view, which can
hash files but not run Python. Both files are pure functions of the bundle's other files, so
verify renders them again and compares bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from kimi_jax.fileio import write_bytes_atomic
from kimi_jax.note.pdf import NoteError, render_pdf, safe
from kimi_jax.verify.bundle_view import BundleView
from kimi_jax.verify.report import CheckFailed

NOTE = "note.pdf"
CERTIFICATION = "certification.json"


def _view(bundle: Path | BundleView) -> BundleView:
    """The bundle the note describes: a multi-sequence bundle's sequence 0 (the anchor's), which the
    note says; :mod:`kimi_jax.verify` checks every sequence."""
    view = bundle if isinstance(bundle, BundleView) else BundleView(Path(bundle))
    return view.sequences()[0]


def render_note(bundle: Path | BundleView) -> bytes:
    """The note's PDF bytes for the bundle folder ``bundle`` (read, never written)."""
    from kimi_jax.note.content import build_note

    try:
        return render_pdf(build_note(_view(bundle), safe))
    except CheckFailed as e:
        raise NoteError(f"cannot write the note: {e}") from None


def render_certification(bundle: Path | BundleView) -> bytes:
    from kimi_jax.verify.certification import certification_record, certification_table

    try:
        record = certification_record(certification_table(_view(bundle)))
    except CheckFailed as e:
        raise NoteError(f"cannot write {CERTIFICATION}: {e}") from None
    return (json.dumps(record, indent=1, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")


def write_note_files(bundle: Path) -> None:
    """Write ``note.pdf`` and ``certification.json`` into a bundle being assembled (atomically each)."""
    view = _view(Path(bundle))
    write_bytes_atomic(Path(bundle) / CERTIFICATION, render_certification(view))
    write_bytes_atomic(Path(bundle) / NOTE, render_note(view))


@click.command("note")
@click.argument("bundle", type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--out", "out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to write the PDF (default: BUNDLE_NAME.note.pdf in the current folder; never inside "
                   "the bundle, whose files are checksummed).")  # fmt: skip
def note_command(bundle: Path, out: Path | None) -> None:
    """Render a bundle's technical note (a folder or a `kimi-jax archive` .tar.gz) from its files alone."""
    from kimi_jax.ledger.archive import open_bundle

    with open_bundle(bundle) as root:
        root = Path(root)
        data = render_note(root)
        target = out or Path.cwd() / f"{root.name}.note.pdf"
        if target.resolve().parent == root.resolve() or root.resolve() in target.resolve().parents:
            raise click.UsageError(f"{target}: inside the bundle; write the note elsewhere (the bundle is checksummed)")
        stored = root / NOTE
        if not stored.is_file():
            state = "the bundle has no note.pdf (written before kimi-jax wrote notes)"
        elif stored.read_bytes() == data:
            state = "byte-identical to the bundle's note.pdf"
        else:
            state = "differs from the bundle's note.pdf (kimi-jax verify says why)"
    write_bytes_atomic(target, data)
    click.echo(str(target))
    click.echo(f"{len(data):,} bytes; {state}", err=True)
