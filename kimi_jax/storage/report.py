"""``kimi-jax inspect``: what a checkpoint holds and what one decoded token will read."""

from __future__ import annotations

from collections import Counter
from typing import Any

from kimi_jax.storage.checkpoint import CheckpointIndex


def inspect_report(index: CheckpointIndex) -> dict[str, Any]:
    cfg = index.config
    layers = []
    for layer in index.layers:
        formats = Counter(w.format for w in layer.base.values())
        for projs in layer.experts:
            formats.update(w.format for w in projs.values())
        layers.append({
            "layer": layer.index,
            "kind": layer.kind,
            "experts": len(layer.experts),
            "bytes": layer.total_bytes,
            "base_bytes": layer.base_bytes,
            "expert_bytes": layer.expert_bytes(0) if layer.experts else 0,
            "formats": dict(sorted(formats.items())),
            "shards": sorted({p.shard.name for w in layer.base.values() for p in w.parts.values()}
                             | {p.shard.name for e in layer.experts for w in e.values() for p in w.parts.values()}),
        })  # fmt: skip
    head_bytes = sum(w.nbytes for w in index.head.values())
    return {
        "checkpoint": str(index.root),
        "layout": index.layout,
        "shards": len(index.shards),
        "tensors_indexed": sum(len(w.parts) for w in index.weights.values()),
        "tensors_skipped": len(index.skipped),
        "config_digest": cfg.digest(),
        "tensor_list_digest": index.tensor_list_digest(),
        "model": {
            "layers": cfg.num_hidden_layers, "dense_layers": sum(1 for l in index.layers if l.kind == "dense"),
            "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size, "heads": cfg.num_attention_heads,
            "routed_experts": cfg.n_routed_experts, "experts_per_token": cfg.num_experts_per_tok,
            "quantization": cfg.quant.kind,
        },  # fmt: skip
        "layers": layers,
        "bytes_per_layer": [entry["bytes"] for entry in layers],
        "embedding_bytes": index.embed.nbytes,
        "embedding_row_bytes": index.embed_row_bytes(),
        "head_bytes": head_bytes,
        "total_tensor_bytes": sum(w.nbytes for w in index.weights.values()),
        "predicted_bytes_per_token": index.predicted_bytes_per_token(),
    }


def format_report(report: dict[str, Any]) -> str:
    m = report["model"]
    lines = [
        f"checkpoint  {report['checkpoint']}",
        f"layout      {report['layout']}  ({report['shards']} shards, {report['tensors_indexed']} tensors, "
        f"{report['tensors_skipped']} skipped)",
        f"model       {m['layers']} layers ({m['dense_layers']} dense), hidden {m['hidden_size']}, vocab "
        f"{m['vocab_size']}, {m['heads']} heads, {m['routed_experts']} experts top-{m['experts_per_token']}, "
        f"quantization {m['quantization']}",
        "",
        f"{'layer':>5} {'kind':<5} {'experts':>7} {'bytes':>16} {'per expert':>12}  formats",
    ]
    for entry in report["layers"]:
        fmts = ", ".join(f"{k} x{v}" for k, v in entry["formats"].items())
        lines.append(f"{entry['layer']:>5} {entry['kind']:<5} {entry['experts']:>7} {entry['bytes']:>16,} "
                     f"{entry['expert_bytes']:>12,}  {fmts}")  # fmt: skip
    lines += [
        "",
        f"embedding   {report['embedding_bytes']:,} bytes ({report['embedding_row_bytes']:,} per row)",
        f"head        {report['head_bytes']:,} bytes (final norm + lm_head)",
        f"total       {report['total_tensor_bytes']:,} bytes of text-model tensors",
        f"predicted   {report['predicted_bytes_per_token']:,} bytes read per decoded token "
        f"({report['predicted_bytes_per_token'] / 2**30:.2f} GiB): non-expert weights + top-"
        f"{m['experts_per_token']} experts per MoE layer + one embedding row + head",
    ]
    return "\n".join(lines)
