"""The ``kimi-jax`` command line."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from kimi_jax.errors import KimiJaxError
from kimi_jax.explorer.page import explore_command
from kimi_jax.note.render import note_command
from kimi_jax.settings import PROOF_SCOPES, PROVE_ALL, PROVE_FIRST, SYNTH_LAYOUTS, SYNTH_PRESETS


# Commands whose completed steps survive an interrupt and continue with --resume.
RESUMABLE = ("run", "prove")


class _Group(click.Group):
    """Print our own errors as one clean line instead of a traceback; anything else is a bug of
    ours, reported in one line that says where its traceback was saved. A reader that stops
    reading (``kimi-jax verify B | head``) ends the command quietly."""

    def invoke(self, ctx: click.Context):
        try:
            try:
                return super().invoke(ctx)
            finally:
                sys.stdout.flush()  # a closed pipe shows here, not at exit
        except BrokenPipeError:
            _quiet_stdout()
            if ctx.invoked_subcommand in RESUMABLE:
                click.echo("stdout was closed; the completed steps are kept beside the output folder: run the same "
                           "command with --resume to continue", err=True)  # fmt: skip
            sys.exit(EXIT_BROKEN_PIPE)
        except KimiJaxError as e:
            click.echo(f"error: {_bounded(str(e))}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            command = ctx.invoked_subcommand
            more = ("; the completed steps are kept beside the output folder: run the same command with --resume "
                    "to continue") if command in RESUMABLE else ""  # fmt: skip
            click.echo(f"interrupted{more}", err=True)
            sys.exit(130)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort, SystemExit,
                GeneratorExit):  # fmt: skip
            raise
        except BaseException as e:  # noqa: BLE001 - the point is to catch what nothing else did (a Rust panic too)
            click.echo(f"internal error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''} "
                       f"(a bug in kimi-jax; the traceback was saved to {_save_traceback()})", err=True)  # fmt: skip
            sys.exit(70)


EXIT_BROKEN_PIPE = 141  # what a shell reports for a program ended by SIGPIPE
MAX_ERROR_LINE = 1000  # characters of one line of an error message (it may quote a stranger's file)


def _bounded(message: str) -> str:
    """Each line cut to its first and last characters (what went wrong is usually said last)."""
    head, tail = MAX_ERROR_LINE * 3 // 5, MAX_ERROR_LINE * 2 // 5
    return "\n".join(line if len(line) <= MAX_ERROR_LINE else
                     f"{line[:head]} ...[{len(line) - head - tail:,} characters]... {line[-tail:]}"
                     for line in message.splitlines()[:50])  # fmt: skip


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so what is still buffered for the closed pipe is dropped at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _save_traceback() -> str:
    """Write the current exception's traceback to a new file in the temporary folder; returns its path."""
    import tempfile
    import traceback

    try:
        fd, path = tempfile.mkstemp(prefix="kimi-jax-internal-error-", suffix=".txt")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(f"kimi-jax {' '.join(sys.argv[1:])}\n\n{traceback.format_exc()}")
        return path
    except OSError as e:
        traceback.print_exc()
        return f"nowhere ({e.strerror}); it was printed above"


@click.group(cls=_Group)
@click.version_option(package_name="kimi-jax")
def main() -> None:
    """Stream DeepSeek-V3-architecture MoE checkpoints (Kimi K2.5) through JAX, layer by layer."""


@main.command()
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a manifest field (repeatable).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Output directory (replaces output.dir).")
@click.option("--prove", type=click.Choice(PROOF_SCOPES), default=PROVE_FIRST, show_default=True, is_flag=False,
              flag_value=PROVE_ALL,
              help="The non-perturbation proof: run bare (no capture kept) as well and require identical tokens, "
                   "digests and bytes, on step 0 (first: the anchor step) or on every step (all: a second pass over "
                   "the run; --prove alone means all).")  # fmt: skip
@click.option("--no-prove", is_flag=True, help="No proof: run instrumented only (the bundle then fails verify's "
                                              "non-perturbation check).")  # fmt: skip
@click.option("--resume", is_flag=True, help="Continue a killed run from its last completed step.")
@click.option("-q", "--quiet", is_flag=True, help="Nothing on stderr but errors: no progress, no report.")
@click.option("--json", "as_json", is_flag=True,
              help="Instead of streaming the text, print one JSON object at the end (bundle, ledger, prompt, tokens, "
                   "token_texts, text, stopped, non_perturbing, anchor_matched).")  # fmt: skip
def run(manifest: str, overrides: tuple[str, ...], out_dir: str | None, prove: str, no_prove: bool, resume: bool,
        quiet: bool, as_json: bool) -> None:  # fmt: skip
    """Run a manifest: stream the checkpoint, generate tokens, write the ledger and the bundle.

    The generated text goes to stdout as it is produced (token ids when the checkpoint ships no
    tokenizer); progress and the report go to stderr, one line per step when stderr is not a terminal."""
    from kimi_jax.run.console import to_stderr
    from kimi_jax.run.runner import run_manifest

    outcome = run_manifest(manifest, list(overrides), out_dir, prove=None if no_prove else prove, resume=resume,
                           echo=(lambda *_: None) if quiet else to_stderr, progress=not quiet,
                           text_out=None if as_json else sys.stdout)  # fmt: skip
    if as_json and outcome.ledger is not None:  # in a multi-process run, process 0 reports
        click.echo(json.dumps(outcome.summary(), ensure_ascii=False))


@main.command()
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a manifest field (repeatable).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Output directory (replaces output.dir).")
@click.option("--resume", is_flag=True, help="Continue a killed run from its last completed step.")
def prove(manifest: str, overrides: tuple[str, ...], out_dir: str | None, resume: bool) -> None:
    """Prove capture is non-perturbing on every step: bare and instrumented runs must agree on each.

    The same as ``kimi-jax run MANIFEST --prove all`` (run proves step 0 by default), named for what it checks."""
    from kimi_jax.run.runner import run_manifest

    run_manifest(manifest, list(overrides), out_dir, prove=PROVE_ALL, resume=resume, text_out=sys.stdout)


@main.group()
def anchor() -> None:
    """Frozen single-step anchors."""


@anchor.command("freeze")
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a manifest field (repeatable).")
@click.option("--out", "out_file", type=click.Path(dir_okay=False), help="Anchor file (default: the manifest's anchor).")
def anchor_freeze(manifest: str, overrides: tuple[str, ...], out_file: str | None) -> None:
    """Run step 0 twice, require bitwise-identical results, write the anchor file."""
    from kimi_jax.run.runner import freeze_anchor

    path, values, writer = freeze_anchor(manifest, list(overrides), out_file)
    if writer:
        click.echo(f"anchor frozen to {path}: token {values['token']}, logit {values['logit']}, "
                   f"{values['bytes_read']:,} bytes; hidden {values['hidden_digest']}; logits {values['logits_digest']}")


@main.command()
@click.option("--preset", type=click.Choice(SYNTH_PRESETS), default="tiny", show_default=True)
@click.option("--layout", type=click.Choice(SYNTH_LAYOUTS), default="kimi-k2.5", show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--weight-shape-dtype", type=click.Choice(["I32", "I64"]), default="I32", show_default=True,
              help="dtype of the int4 weight_shape tensors (real K2.5 files use I32; compressed-tensors writes I64).")  # fmt: skip
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True)
def synth(preset: str, layout: str, seed: int, weight_shape_dtype: str, out_dir: str) -> None:
    """Write a deterministic synthetic checkpoint in a real on-disk layout."""
    from kimi_jax.storage.synth import synth_checkpoint

    if Path(out_dir).exists():
        raise click.UsageError(f"{out_dir} already exists; choose a new directory")
    path = synth_checkpoint(out_dir, preset=preset, layout=layout, seed=seed, weight_shape_dtype=weight_shape_dtype)
    click.echo(f"wrote {layout} {preset} checkpoint (seed {seed}) to {path}")


@main.command()
@click.argument("checkpoint", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON (keys layers, bytes_per_layer, predicted_bytes_per_token).")
def inspect(checkpoint: str, as_json: bool) -> None:
    """Show layers, experts, formats, bytes per layer and the predicted bytes per decoded token."""
    from kimi_jax.storage.checkpoint import open_checkpoint
    from kimi_jax.storage.report import format_report, inspect_report

    report = inspect_report(open_checkpoint(checkpoint))
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))


@main.command()
@click.argument("checkpoint", type=click.Path(file_okay=False, exists=True))
@click.option("--out", "out_file", type=click.Path(dir_okay=False),
              help="Digest file to write (default: CHECKPOINT/checkpoint.b3.json).")  # fmt: skip
@click.option("--workers", type=click.IntRange(min=1), default=4, show_default=True, help="Tensors hashed at once.")
@click.option("--segment-bytes", "segments", type=click.IntRange(min=64, max=1 << 30), default=1 << 20,
              show_default=True, help="Non-expert tensors get a digest per segment of whole rows of about this "
                                      "size, so processes that each read a share of them check it.")  # fmt: skip
@click.option("--progress/--no-progress", default=True, show_default=True)
def digest(checkpoint: str, out_file: str | None, workers: int, segments: int, progress: bool) -> None:
    """BLAKE3 of every tensor's bytes into a digest file, and one content root over it.

    Runs read from a checkpoint with a digest file check every tensor against it. A killed run
    continues where it stopped (finished tensors are journalled beside the output)."""
    import time

    from kimi_jax.progress import progress_bar
    from kimi_jax.storage.checkpoint import open_checkpoint
    from kimi_jax.storage.digests import compute_digests

    index = open_checkpoint(checkpoint)
    bar = progress_bar(sum(rec.nbytes for h in index.shards for rec in h.tensors), "digest", "B", enabled=progress,
                       unit_scale=True)  # fmt: skip
    started = time.perf_counter()

    def advance(done: int, total: int) -> None:
        bar.update(done - bar.n)

    try:
        path, table, hashed = compute_digests(index, Path(out_file) if out_file else None, workers, advance,
                                              on_note=lambda line: click.echo(line, err=True),
                                              segments=segments)  # fmt: skip
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    click.echo(f"wrote {path}: {len(table.tensors)} tensors, content root {table.root}")
    click.echo(f"hashed {hashed:,} bytes in {seconds:.2f} s with {workers} worker(s)"
               + (f" ({hashed / seconds / 2**20:,.0f} MiB/s)" if hashed and seconds > 0 else ""))  # fmt: skip


@main.command()
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a manifest field (repeatable).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; beyond loopback needs --api-key-file.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="0: any free port.")
@click.option("--api-key-file", type=click.Path(dir_okay=False), help="A file holding the bearer token requests must send.")
@click.option("--runs", type=click.Path(file_okay=False), help="Where each request's bundle goes (default: output.dir).")
@click.option("--keep", type=click.IntRange(min=1), default=100, show_default=True, help="Bundles kept; older ones are removed.")
@click.option("--max-batch", type=click.IntRange(1, 64), default=8, show_default=True, help="Requests decoded together.")
@click.option("--max-queue", type=click.IntRange(0, 1024), default=16, show_default=True,
              help="Requests waiting to join the batch; more get 429.")
@click.option("--time-limit", type=click.FloatRange(min=1), default=600.0, show_default=True,
              help="Seconds a request may take from arrival; then it is cancelled (no bundle).")
@click.option("--notes", is_flag=True, help="Render each bundle's technical note (note.pdf): seconds per request; "
                                            "kimi-jax note renders it later from the bundle alone.")
def serve(manifest: str, overrides: tuple[str, ...], host: str, port: int, api_key_file: str | None, runs: str | None,
          keep: int, max_batch: int, max_queue: int, time_limit: float, notes: bool) -> None:
    """An OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, /v1/models); every answer
    leaves a bundle that kimi-jax verify checks."""
    from kimi_jax.serve.command import serve as serve_command

    serve_command(manifest, list(overrides), host, port, api_key_file, runs, keep, max_batch, max_queue, time_limit,
                  notes)


@main.command()
@click.argument("which", type=click.Choice(["manifest", "ledger", "ledger-sequences"]))
def schema(which: str) -> None:
    """Print a published JSON Schema (ledger: a one-prompt run's; ledger-sequences: a prompts: run's)."""
    if which == "ledger":
        from kimi_jax.ledger.ledger import LEDGER_SCHEMA

        click.echo(json.dumps(LEDGER_SCHEMA, indent=2))
        return
    if which == "ledger-sequences":
        from kimi_jax.ledger.sequences import MULTI_SCHEMA

        click.echo(json.dumps(MULTI_SCHEMA, indent=2))
        return
    from kimi_jax.manifest import manifest_json_schema

    click.echo(json.dumps(manifest_json_schema(), indent=2))


# -- bundles: verify, compare, archive --------------------------------------------------------


@main.command()
@click.argument("path", type=click.Path(exists=True))
@click.option("--replay", is_flag=True,
              help="Also re-run the bundle's manifest against the checkpoint it names and require every measured "
                   "value to match (wall-clock and page-cache fields excepted); only when every offline check "
                   "passed, writing only into your own cache.")  # fmt: skip
@click.option("--allow-large", is_flag=True,
              help="Let --replay generate the full-shape synthetic preset (a sparse 595 GB checkpoint) in your cache.")
def verify(path: str, replay: bool, allow_large: bool) -> None:
    """Check a run bundle without the model. PATH: a bundle folder, a bundle archive or a receipt.json.

    Prints each numbered check as OK, FAILED or SKIPPED and a summary; exits 1 if any check failed."""
    from kimi_jax.verify.checklist import verify_bundle

    report = verify_bundle(path, replay=replay, on_check=lambda c: click.echo(c.line()), allow_large=allow_large)
    click.echo(report.summary())
    sys.exit(0 if report.ok else 1)


@main.command()
@click.argument("a", type=click.Path(exists=True))
@click.argument("b", type=click.Path(exists=True))
def compare(a: str, b: str) -> None:
    """Compare two manifests (will their runs be identical?) or two bundles (where do they differ?).

    Exits 0 when identical (bitwise identical runs expected, or bundles with equal tokens and digests), else 1."""
    from kimi_jax.verify.compare import compare_paths, format_comparison

    result = compare_paths(a, b)
    click.echo(format_comparison(result))
    sys.exit(0 if result.identical else 1)


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--out", "out_file", type=click.Path(dir_okay=False),
              help="Archive file to write (default: BUNDLE.tar.gz beside the bundle).")  # fmt: skip
def archive(bundle: str, out_file: str | None) -> None:
    """Pack a bundle into one deterministic .tar.gz (the same bundle always gives the same bytes)."""
    from kimi_jax.ledger.archive import archive_bundle
    from kimi_jax.ledger.checksums import hash_file

    path = archive_bundle(bundle, out_file)
    click.echo(f"wrote {path} (BLAKE3 {hash_file(path)})")


@main.command()
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a manifest field (repeatable).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Run output directory (replaces output.dir); the vindex goes beside it, in OUTPUT.vindex/.")  # fmt: skip
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show progress bars on stderr.")
def vindex(manifest: str, overrides: tuple[str, ...], out_dir: str | None, progress: bool) -> None:
    """Singular-value statistics of every expert (phase 1), router spectra (phase 2) and routing
    statistics (phase 3), streamed and resumable; writes OUTPUT.vindex/ beside the run bundle OUTPUT/."""
    from kimi_jax.manifest import load_manifest
    from kimi_jax.vindex.plan import plan_vindex
    from kimi_jax.vindex.runner import run_vindex

    plan = plan_vindex(load_manifest(manifest, list(overrides), out_dir))
    run_vindex(plan, progress=progress, echo=click.echo)


# The explorer's command is defined with its page, which it serves.
main.add_command(explore_command)
main.add_command(note_command)

if __name__ == "__main__":
    main()
