"""tools/capacity.py: the byte figures come from the shapes and add up to the published per-token total."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[1] / "tools" / "capacity.py"


def _capacity(*args: str) -> dict:
    out = subprocess.run([sys.executable, str(TOOL), "--json", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_components_add_up_to_the_reference_bytes_per_token():
    report = _capacity()
    # kimi-format.md 6.2, computed there independently from the published component sizes
    assert report["per_token_bytes"] == 32_986_531_072
    gib = {k: round(v / 2**30, 2) for k, v in report["components"].items()}
    assert gib == {"attention": 11.49, "dense_mlp": 0.74, "routed_experts": 11.07, "shared_experts": 4.92,
                   "routers": 0.31, "head": 2.19}  # fmt: skip


def test_reads_scale_with_hosts_and_imbalance_slows_the_largest_host():
    even = {(r["setup"], r["hosts"]): r for r in _capacity("--hosts", "1", "4", "--nvme-gbs", "2")["rows"]}
    nvme = "N hosts, local NVMe, CPU compute"
    one, four = even[(nvme, 1)], even[(nvme, 4)]
    assert one["read_s"] == round(32_986_531_072 / 2e9, 3)
    assert abs(four["read_s"] - one["read_s"] / 4) < 0.002
    skewed = {(r["setup"], r["hosts"]): r for r in _capacity("--hosts", "4", "--nvme-gbs", "2",
                                                             "--expert-share-excess", "2")["rows"]}  # fmt: skip
    # the largest host reads twice its even share of the experts: 11.07 GiB / 4 more
    extra = skewed[(nvme, 4)]["read_s"] - four["read_s"]
    assert abs(extra - 11_890_863_360 / 4 / 2e9) < 0.002
