"""What the README promises a newcomer, held to the code: the test command is .ci/run's, every
command and exit code is in its tables, and the demo's log is the size it says."""

from __future__ import annotations

import re
from pathlib import Path

from kimi_jax.cli import main
from kimi_jax.run.distributed import EXIT_PEER_LOST

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def test_the_readme_test_command_is_what_ci_runs():
    block = re.search(r"Install the test extras and run the tests.*?```sh\n(.*?)\n```", README, re.S).group(1)
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert block.strip() == ci


def test_every_command_and_exit_code_is_in_the_readme():
    commands = set(main.commands)
    listed = set(re.findall(r"^\| `kimi-jax ([a-z]+)", README, re.M))
    assert commands == listed, commands ^ listed
    table = README[README.index("Every command exits with one of these codes"):]
    documented = {int(c) for c in re.findall(r"^\| (\d+) \|", table, re.M)}
    cli = (REPO / "kimi_jax" / "cli.py").read_text()
    used = {int(c) for c in re.findall(r"sys\.exit\((\d+)\)", cli)} | {0, 1, EXIT_PEER_LOST}
    used |= {int(c) for c in re.findall(r"^EXIT_\w+ = (\d+)", cli, re.M)}  # codes the CLI names
    used |= {int(c) for c in re.findall(r"sys\.exit\(0 if [^)]* else (\d+)\)", cli)}
    assert used <= documented, used - documented


def demo_log_bytes() -> tuple[int, int]:
    """The demo's stderr sizes the README quotes (cold start, programs cached)."""
    found = re.search(r"demo's stderr in\s+a log is about 2 KB of plain lines: ([\d,]+) bytes from a cold start, "
                      r"([\d,]+) with", README)  # fmt: skip
    return tuple(int(v.replace(",", "")) for v in found.groups())
