#!/usr/bin/env python3
"""Capacity plan for Kimi K2.5 decoding (batch 1): time per token and memory per host.

    python tools/capacity.py                       # the table in docs/scaling.md
    python tools/capacity.py --nvme-gbs 6.5 --hosts 1 2 4 8 --json
    python tools/capacity.py --device-check device-check.json   # use a GPU's measured H2D bandwidth

Every byte figure is computed from the model's shapes (kimi-format.md section 6); their sum is the
32,986,531,072 bytes one decoded token reads. Bandwidths are arguments: the defaults say which
were measured on this project's machines and which are datasheet assumptions (see
docs/scaling.md). Time per token is the slowest of the three things that overlap (every
process's reads, its compute, and moving the weights across PCIe when they stream to a GPU) plus
the latency of the activation collectives, which does not overlap.
"""

from __future__ import annotations

import argparse
import json
import sys

# -- Kimi K2.5 text model (kimi-format.md 1.2) ---------------------------------------------------
HIDDEN, Q_LORA, KV_LORA, ROPE, NOPE, V_HEAD, HEADS = 7168, 1536, 512, 64, 128, 128, 64
DENSE_INTER, MOE_INTER, EXPERTS, TOP_K, GROUP = 18432, 2048, 384, 8, 32
LAYERS, DENSE_LAYERS, VOCAB = 61, 1, 163840
BF16, F32, INT32 = 2, 4, 4
CHECKPOINT_BYTES = 595_148_192_736  # every shard, text and vision (kimi-format.md 3.4)


def component_bytes() -> dict[str, int]:
    """Bytes of each kind of weight a decoded token reads (one position, batch 1)."""
    attention = BF16 * (Q_LORA * HIDDEN + Q_LORA + HEADS * (NOPE + ROPE) * Q_LORA + (KV_LORA + ROPE) * HIDDEN
                        + KV_LORA + HEADS * (NOPE + V_HEAD) * KV_LORA + HIDDEN * HEADS * V_HEAD)  # fmt: skip
    layer_norms = 2 * BF16 * HIDDEN
    # int4 pack-quantized: 8 nibbles per int32 word, one BF16 scale per 32 inputs, 2 x int32 weight_shape
    def int4(out: int, inp: int) -> int:
        return out * inp // 8 * INT32 + out * (inp // GROUP) * BF16 + 2 * INT32

    expert = 2 * int4(MOE_INTER, HIDDEN) + int4(HIDDEN, MOE_INTER)
    moe_layers = LAYERS - DENSE_LAYERS
    return {
        "attention": LAYERS * (attention + layer_norms),
        "dense_mlp": DENSE_LAYERS * 3 * BF16 * DENSE_INTER * HIDDEN,
        "routed_experts": moe_layers * TOP_K * expert,
        "shared_experts": moe_layers * 3 * BF16 * MOE_INTER * HIDDEN,
        "routers": moe_layers * (BF16 * EXPERTS * HIDDEN + F32 * EXPERTS),
        "head": BF16 * VOCAB * HIDDEN + BF16 * HIDDEN + BF16 * HIDDEN,  # lm_head, one embedding row, final norm
    }


def per_token_bytes() -> int:
    return sum(component_bytes().values())


def resident_bytes() -> int:
    """Everything the text model needs on the devices when resident (the embedding table stays on
    storage: a step reads only its rows)."""
    return CHECKPOINT_BYTES - 942_287_840 - BF16 * VOCAB * HIDDEN  # minus vision tower/projector and embed_tokens


def gpu_streaming_bytes() -> int:
    """Device memory for streaming: the head plus the two largest layers' active weights (the one
    computing and the one being copied in)."""
    comp = component_bytes()
    moe_layers = LAYERS - DENSE_LAYERS
    attention = comp["attention"] // LAYERS
    dense = attention + comp["dense_mlp"] // DENSE_LAYERS
    moe = attention + (comp["routed_experts"] + comp["shared_experts"] + comp["routers"]) // moe_layers
    return comp["head"] + dense + max(dense, moe)


# -- the plan ------------------------------------------------------------------------------------


def plan(args) -> list[dict]:
    comp = component_bytes()
    token = per_token_bytes()
    experts = comp["routed_experts"]
    shared = token - experts  # split by rows over every process: an even 1/N
    rows = []

    def row(setup: str, hosts: int, read_s: float, compute_s: float, transfer_s: float, collectives: int,
            latency_us: float, memory: str, bound_by: str | None = None) -> None:  # fmt: skip
        parts = {"read": read_s, "compute": compute_s, "transfer": transfer_s}
        wall = max(parts.values()) + collectives * latency_us * 1e-6
        rows.append({"setup": setup, "hosts": hosts, "token_s": round(wall, 3),
                     "read_s": round(read_s, 3), "compute_s": round(compute_s, 3), "transfer_s": round(transfer_s, 3),
                     "collectives_s": round(collectives * latency_us * 1e-6, 3),
                     "bound_by": bound_by or max(parts, key=parts.get), "memory_per_host": memory})  # fmt: skip

    # Activation collectives per token on a mesh: a gather after every row-split matrix feeding a
    # full-width op (about 6 per layer) plus the expert combine.
    per_layer = 7
    for n in args.hosts:
        share = max(args.expert_share_excess / n, 1 / n) if n > 1 else 1.0
        host_bytes = shared / n + experts * share
        collectives = LAYERS * per_layer if n > 1 else 0
        memory = f"{args.layer_ram_gib:.1f} GiB RAM (two layers' shares); the checkpoint on every host's NVMe"
        row("N hosts, local NVMe, CPU compute", n, host_bytes / (args.nvme_gbs * 1e9), args.cpu_compute_s / n, 0.0,
            collectives, args.network_latency_us, memory)  # fmt: skip
        row("N hosts, local NVMe, one GPU each", n, host_bytes / (args.nvme_gbs * 1e9), host_bytes / (args.hbm_gbs * 1e9),
            host_bytes / (args.h2d_gbs * 1e9), collectives, args.network_latency_us,
            memory + f"; GPU: {gpu_streaming_bytes() / n / 2**30:.1f} GiB")  # fmt: skip
        store = min(n * args.link_gbs, args.store_gbs) * 1e9
        row("N hosts, shared network store, CPU compute", n, max(token / store, host_bytes / (args.link_gbs * 1e9)),
            args.cpu_compute_s / n, 0.0, collectives, args.network_latency_us,
            f"{args.layer_ram_gib:.1f} GiB RAM; the checkpoint once, on the store")  # fmt: skip
    # One GPU streaming every layer from host RAM (the checkpoint held in RAM or the page cache).
    row("1 GPU streaming from host RAM", 1, token / (args.ram_gbs * 1e9), token / (args.hbm_gbs * 1e9),
        token / (args.h2d_gbs * 1e9), 0, 0.0,
        f"host RAM >= {CHECKPOINT_BYTES / 2**30:.0f} GiB (the checkpoint, in RAM or the page cache); GPU: "
        f"{gpu_streaming_bytes() / 2**30:.1f} GiB (the head and two layers' active weights, double-buffered)")  # fmt: skip
    # 8 GPUs in one node, every weight resident: each GPU reads its share of the active bytes from HBM.
    gpus = 8
    row("8-GPU node, resident", 1, 0.0, (shared / gpus + experts / gpus) / (args.hbm_gbs * 1e9), 0.0,
        LAYERS * per_layer, args.nvlink_latency_us,
        f"{resident_bytes() / gpus / 2**30:.0f} GiB per GPU for the weights (plus the replicated router and norms)",
        bound_by="compute (HBM reads)")  # fmt: skip
    return rows


def markdown(rows: list[dict]) -> str:
    out = ["| setup | hosts | s / token | reads | compute | PCIe | collectives | bound by | memory per host |",
           "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        out.append(f"| {r['setup']} | {r['hosts']} | **{r['token_s']:.3f}** | {r['read_s']:.3f} | {r['compute_s']:.3f} | "
                   f"{r['transfer_s']:.3f} | {r['collectives_s']:.3f} | {r['bound_by']} | {r['memory_per_host']} |")  # fmt: skip
    return "\n".join(out)


def parse(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hosts", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--nvme-gbs", type=float, default=3.0, help="one host's NVMe read bandwidth, GB/s (assumed: PCIe 4 NVMe)")
    p.add_argument("--link-gbs", type=float, default=1.25, help="one host's network link to the store, GB/s (assumed: 10 GbE)")
    p.add_argument("--store-gbs", type=float, default=2.5, help="the network store's total read bandwidth, GB/s (assumed)")
    p.add_argument("--network-latency-us", type=float, default=200.0,
                   help="one small collective between hosts over TCP, microseconds (assumed)")  # fmt: skip
    p.add_argument("--cpu-compute-s", type=float, default=101.5,
                   help="compute of one token on one host, s (measured: benchmarks/RESULTS.md scale, 2-core Xeon, float32)")  # fmt: skip
    p.add_argument("--expert-share-excess", type=float, default=1.0,
                   help="the largest process's expert share x N (1.0 = ideal; benchmarks/scaleout.py measures it)")  # fmt: skip
    p.add_argument("--layer-ram-gib", type=float, default=5.1,
                   help="RAM of one streaming process, GiB (measured: scale benchmark peak RSS, one host)")  # fmt: skip
    p.add_argument("--ram-gbs", type=float, default=20.0, help="host RAM read bandwidth, GB/s (assumed)")
    p.add_argument("--h2d-gbs", type=float, default=25.0, help="host-to-GPU copy bandwidth, GB/s (assumed: PCIe 5 x16, pageable)")
    p.add_argument("--hbm-gbs", type=float, default=4800.0, help="GPU memory bandwidth, GB/s (H200 datasheet)")
    p.add_argument("--nvlink-latency-us", type=float, default=15.0, help="one small NVLink collective, microseconds (assumed)")
    p.add_argument("--device-check", help="a tools/device-check JSON summary: take the measured H2D bandwidth from it")
    p.add_argument("--json", action="store_true", help="print JSON instead of a Markdown table")
    args = p.parse_args(argv)
    if args.device_check:
        with open(args.device_check) as f:
            summary = json.load(f)
        args.h2d_gbs = summary["host_to_device"]["streamed_gbs"]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    rows = plan(args)
    if args.json:
        print(json.dumps({"per_token_bytes": per_token_bytes(), "components": component_bytes(), "rows": rows}, indent=1))
    else:
        print(f"Kimi K2.5, batch 1: {per_token_bytes():,} bytes read per decoded token\n")
        print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
