"""Checkpoint index: every shard header parsed into a per-layer map of logical weights.

Tensor bytes are never touched here. The index knows, for each layer, which logical weights
exist, how each is stored (plain, int4 pack-quantized triple, or fp8 + block scales), where
every stored tensor sits (shard, absolute offset, size), and it checks all of that against the
shapes the config implies before anything is computed.

Canonical names drop the layout's prefix: ``layers.3.mlp.experts.7.down_proj.weight``,
``embed_tokens.weight``, ``norm.weight``, ``lm_head.weight``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import blake3

from kimi_jax.config import ModelConfig, load_model_config
from kimi_jax.errors import CheckpointError
from kimi_jax.fileio import read_json
from kimi_jax.shapes import expert_shapes, global_shapes, layer_shapes
from kimi_jax.storage.formats import WeightFormat, format_of
from kimi_jax.storage.layouts import KIMI_K25_PREFIX, TEXT_PREFIX, indexed_layout
from kimi_jax.storage.safetensors_header import (
    ShardHeader,
    TensorRecord,
    read_shard_header,
)

INDEX_FILE = "model.safetensors.index.json"
# Kimi K2.5's index lists about 200,000 tensors in about 20 MB; anything far larger is not an index.
MAX_INDEX_BYTES = 256 * 1024 * 1024

# Prefixes in the order we try them; the first that owns `layers.` names wins.
_TEXT_PREFIXES = (KIMI_K25_PREFIX, TEXT_PREFIX)
_HEAD_NAMES = {"language_model.lm_head.weight": "lm_head.weight", "lm_head.weight": "lm_head.weight"}
_SKIPPED_PREFIXES = ("vision_tower.", "mm_projector.", "language_model.vision_tower.")
# at most 6 digits: no real model has a million layers or experts, and int() of a huge digit run fails
_LAYER_RE = re.compile(r"^layers\.(\d{1,6})\.(.+)$")
_EXPERT_ID_RE = re.compile(r"^mlp\.experts\.(\d{1,6})\.")
_EXPERT_RE = re.compile(r"^mlp\.experts\.(\d{1,6})\.(gate_proj|up_proj|down_proj)\.weight$")
_PLAIN_DTYPES = {"BF16", "F32", "F16"}
EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class WeightEntry:
    """A logical tensor and the stored tensors that encode it.

    ``parts`` keys: plain ``weight`` (or the tensor itself for norms/biases); int4
    ``weight_packed``, ``weight_scale``, ``weight_shape``; fp8 ``weight``, ``weight_scale_inv``.
    """

    name: str
    format: WeightFormat
    shape: tuple[int, ...]
    parts: dict[str, TensorRecord]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts.values())

    def check_weight_shape(self, parts: dict) -> None:
        """An int4 weight's stored ``weight_shape`` tensor must name the shape its packed words and
        scales imply (it is data, so it is checked when read, not when indexed)."""
        if self.format != "int4":
            return
        stored = tuple(int(d) for d in parts["weight_shape"])
        if stored != self.shape:
            rec = self.parts["weight_shape"]
            raise CheckpointError(f"{rec.shard}: {rec.stored_name} holds {list(stored)}, but weight_packed and "
                                  f"weight_scale imply {list(self.shape)}")  # fmt: skip

    def describe(self) -> str:
        return ", ".join(f"{k} in {p.shard.name} @ {p.offset}" for k, p in self.parts.items())


@dataclasses.dataclass(frozen=True)
class LayerMap:
    index: int
    kind: Literal["dense", "moe"]
    base: dict[str, WeightEntry]  # everything except routed experts, canonical names
    experts: tuple[dict[str, WeightEntry], ...]  # expert id -> proj -> entry (MoE layers)

    # Summed once (the maps never change): a batch's byte accounting asks them per row and layer.
    @functools.cached_property
    def base_bytes(self) -> int:
        return sum(w.nbytes for w in self.base.values())

    @functools.cached_property
    def _expert_sizes(self) -> tuple[int, ...]:
        return tuple(sum(w.nbytes for w in projs.values()) for projs in self.experts)

    def expert_bytes(self, expert: int) -> int:
        return self._expert_sizes[expert]

    @property
    def total_bytes(self) -> int:
        return self.base_bytes + sum(self._expert_sizes)


@dataclasses.dataclass(frozen=True)
class MTPLayer:
    """A multi-token-prediction layer (DeepSeek-V3's ``layers.{num_hidden_layers}``): a decoder layer
    whose input is ``eh_proj([enorm(embed(next token)); hnorm(hidden)])``, with its own head."""

    layer: LayerMap  # the decoder layer, index num_hidden_layers
    inputs: dict[str, WeightEntry]  # enorm, hnorm, eh_proj, by canonical name
    head: dict[str, WeightEntry]  # its shared_head as the head roles: norm.weight, lm_head.weight
    embed: WeightEntry  # its copy of the embedding

    @property
    def nbytes(self) -> int:
        parts = [*self.inputs.values(), *self.head.values(), self.embed]
        return self.layer.total_bytes + sum(w.nbytes for w in parts)


@dataclasses.dataclass(frozen=True)
class CheckpointIndex:
    root: Path
    config: ModelConfig
    layout: str
    prefix: str
    shards: tuple[ShardHeader, ...]
    weights: dict[str, WeightEntry]
    layers: tuple[LayerMap, ...]
    skipped: tuple[tuple[str, str], ...]  # (stored name, why)
    # Where the bytes come from when not from ``root``: the URL of a remote checkpoint, whose
    # config, index and shard headers are cached in ``root`` (see storage/remote_index.py).
    source: str | None = None
    # The checkpoint's first multi-token-prediction layer, when it ships a whole one (drafts only:
    # it is not in ``weights``, so the tensor list and everything a plain run reads are unchanged).
    mtp: MTPLayer | None = None

    @property
    def location(self) -> str:
        """The checkpoint as the user named it: its URL when remote, else its directory."""
        return self.source or str(self.root)

    @property
    def embed(self) -> WeightEntry:
        return self.weights["embed_tokens.weight"]

    @property
    def head(self) -> dict[str, WeightEntry]:
        """The final norm and the lm_head, by canonical name; with tied embeddings (no stored
        lm_head) ``lm_head.weight`` is the embedding's entry."""
        return {"norm.weight": self.weights["norm.weight"],
                "lm_head.weight": self.weights.get("lm_head.weight", self.embed)}  # fmt: skip

    def embed_row_bytes(self) -> int:
        e = self.embed
        return e.nbytes // e.shape[0]

    def tensor_list_digest(self) -> str:
        """BLAKE3 over the sorted (name, dtype, shape, size) list: the checkpoint's tensor identity."""
        h = blake3.blake3()
        for w in sorted(self.weights.values(), key=lambda w: w.name):
            for part, rec in sorted(w.parts.items()):
                h.update(f"{w.name}|{part}|{rec.dtype}|{list(rec.shape)}|{rec.nbytes}\n".encode())
        return h.hexdigest()

    def predicted_bytes_per_token(self) -> int:
        """Bytes one decoded token reads: all non-expert weights, top-k experts per MoE layer,
        one embedding row, the final norm and the lm_head."""
        cfg = self.config
        total = self.embed_row_bytes() + sum(w.nbytes for w in self.head.values())
        if "lm_head.weight" not in self.weights:  # tied: the head is the embedding, counted once
            total -= self.embed_row_bytes()
        for layer in self.layers:
            total += layer.base_bytes
            if layer.kind == "moe":
                sizes = sorted(layer.expert_bytes(e) for e in range(len(layer.experts)))
                total += sum(sizes[-cfg.num_experts_per_tok :])
        return total


def open_checkpoint(root: str | Path) -> CheckpointIndex:
    """Index a checkpoint directory: config, every shard header, the per-layer map, checks."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise CheckpointError(f"{root}: checkpoint directory does not exist")
    cfg = load_model_config(root)
    weight_map = _read_weight_map(root)
    shard_paths = _shard_paths(root, weight_map)
    with ThreadPoolExecutor(max_workers=8) as pool:
        headers = tuple(pool.map(read_shard_header, shard_paths))
    return index_from_headers(root, cfg, headers, weight_map=weight_map)


def index_from_headers(root: Path, cfg: ModelConfig, headers: tuple[ShardHeader, ...], source: str | None = None,
                       weight_map: dict[str, str] | None | object = ...) -> CheckpointIndex:  # fmt: skip
    """The per-layer map and every check, from parsed shard headers (local or fetched remotely);
    ``root`` holds config.json and, when present, model.safetensors.index.json (``weight_map``:
    its weight_map when already read, None when there is none)."""
    if weight_map is ...:
        weight_map = _read_weight_map(root)
    records: dict[str, TensorRecord] = {}
    for header in headers:
        for rec in header.tensors:
            if rec.stored_name in records:
                other = records[rec.stored_name].shard.name
                raise CheckpointError(f"{rec.shard}: tensor {rec.stored_name!r} also appears in {other}")
            records[rec.stored_name] = rec
    _check_index_file(root, weight_map, records)

    prefix = _detect_prefix(root, records)
    canonical, skipped = _canonicalise(cfg, prefix, records)
    _check_config_fits_tensors(root, cfg, canonical)
    weights = _group_weights(canonical, cfg)
    layers = _build_layers(root, cfg, weights)
    _check_shapes(root, cfg, weights, layers)
    layout = indexed_layout(prefix, (w.format for w in weights.values()),
                            (w.parts["weight"].dtype for w in weights.values() if "weight" in w.parts))  # fmt: skip
    mtp = _build_mtp(root, cfg, prefix, records, skipped)
    return CheckpointIndex(root, cfg, layout, prefix, headers, weights, layers, tuple(skipped), source, mtp)


def shard_names(root: Path) -> list[str] | None:
    """Shard file names the index file lists (sorted), or None when there is no index file. Every
    name is checked to stay inside ``root`` (:func:`_read_weight_map`), remote mirrors included."""
    weight_map = _read_weight_map(root)
    return None if weight_map is None else sorted(set(weight_map.values()))


def _shard_paths(root: Path, weight_map: dict[str, str] | None) -> list[Path]:
    if weight_map is not None:
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (root / n).exists()]
        if missing:
            raise CheckpointError(f"{root / INDEX_FILE}: weight_map names missing shard file(s): "
                                  f"{', '.join(missing[:5])}")  # fmt: skip
        return [root / n for n in names]
    paths = sorted(root.glob("*.safetensors"))
    if not paths:
        raise CheckpointError(f"{root}: no *.safetensors shards found")
    return paths


def _read_weight_map(root: Path) -> dict[str, str] | None:
    """The index's ``weight_map`` ({tensor: shard file}), or None when the checkpoint has no index.

    Every shard path stays inside the checkpoint folder: a relative path without ``..``, whose
    folders are real folders inside it. The shard itself may be a symbolic link (Hugging Face
    caches link snapshots to blobs), which is followed only to a regular file (checked on open)."""
    index_file = root / INDEX_FILE
    if not index_file.exists() and not index_file.is_symlink():
        return None
    index = read_json(index_file, MAX_INDEX_BYTES, "checkpoint index", CheckpointError)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_file}: expected a JSON object with a 'weight_map' object "
                              "{tensor name: shard file}")  # fmt: skip
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise CheckpointError(f"{index_file}: weight_map[{name!r}] is {shard!r}; expected a shard file name")
        _check_inside(root, index_file, name, shard)
    return weight_map


def _check_inside(root: Path, index_file: Path, name: str, shard: str) -> None:
    parts = shard.split("/")
    if "\\" in shard or "\x00" in shard or shard.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise CheckpointError(f"{index_file}: weight_map puts {name!r} in {shard!r}; expected a relative path inside "
                              f"the checkpoint folder (no absolute path, no '.' or '..')")  # fmt: skip
    real = Path(os.path.realpath((root / shard).parent))
    if real != root and root not in real.parents:
        raise CheckpointError(f"{index_file}: weight_map puts {name!r} in {shard!r}, whose folder resolves to {real}, "
                              f"outside the checkpoint folder {root}")  # fmt: skip


def _check_index_file(root: Path, weight_map: dict[str, str] | None, records: dict[str, TensorRecord]) -> None:
    if weight_map is None:
        return
    index_file = root / INDEX_FILE
    for name, shard in weight_map.items():
        rec = records.get(name)
        if rec is None:
            raise CheckpointError(f"{index_file}: weight_map lists {name!r} in {shard}, but no shard holds it")
        if rec.shard != root / shard:
            raise CheckpointError(f"{index_file}: weight_map puts {name!r} in {shard}, found in {rec.shard.name}")
    unlisted = [n for n in records if n not in weight_map]
    if unlisted:
        raise CheckpointError(f"{index_file}: tensor {unlisted[0]!r} is in a shard but not in the weight_map")


def _detect_prefix(root: Path, records: dict[str, TensorRecord]) -> str:
    for prefix in _TEXT_PREFIXES:
        if any(n.startswith(prefix + "layers.") for n in records):
            return prefix
    raise CheckpointError(f"{root}: no decoder layers found (expected tensors named 'model.layers.N.*' "
                          "or 'language_model.model.layers.N.*')")  # fmt: skip


def _canonicalise(cfg: ModelConfig, prefix: str, records: dict[str, TensorRecord]):
    canonical: dict[str, TensorRecord] = {}
    skipped: list[tuple[str, str]] = []
    unknown: list[str] = []
    for name, rec in records.items():
        if name in _HEAD_NAMES:
            canonical[_HEAD_NAMES[name]] = rec
            continue
        if name.startswith(_SKIPPED_PREFIXES):
            skipped.append((name, "vision component (text path only)"))
            continue
        if not name.startswith(prefix):
            unknown.append(name)
            continue
        short = name[len(prefix) :]
        m = _LAYER_RE.match(short)
        if m and int(m.group(1)) >= cfg.num_hidden_layers:
            skipped.append((name, f"layer {m.group(1)} >= num_hidden_layers (multi-token-prediction head)"))
            continue
        if short.endswith("rotary_emb.inv_freq"):
            skipped.append((name, "stray rotary_emb.inv_freq buffer (recomputed from the config)"))
            continue
        canonical[short] = rec
    if unknown:
        shard = records[unknown[0]].shard
        raise CheckpointError(f"{shard}: tensor {unknown[0]!r} does not belong to the text model under prefix "
                              f"{prefix!r} ({len(unknown)} such tensors)")  # fmt: skip
    return canonical, skipped


_MTP_INPUTS = ("enorm.weight", "hnorm.weight", "eh_proj.weight")


def _build_mtp(root: Path, cfg: ModelConfig, prefix: str, records: dict[str, TensorRecord],
               skipped: list[tuple[str, str]]) -> MTPLayer | None:  # fmt: skip
    """The first multi-token-prediction layer (``layers.{num_hidden_layers}``) when the checkpoint ships
    a whole one whose tensors match the config's shapes; else None. Its tensors stay in ``skipped``
    either way (a plain run never reads them), with why an incomplete one cannot draft."""
    n = cfg.num_hidden_layers
    start = f"{prefix}layers.{n}."
    mine = {name[len(prefix):]: rec for name, rec in records.items()
            if name.startswith(start) and not name.endswith("rotary_emb.inv_freq")}  # fmt: skip
    if not mine:
        return None
    try:
        weights = _group_weights(mine, cfg)
        p, h = f"layers.{n}.", cfg.hidden_size
        own = {f"{p}{k}": shape for k, shape in [("enorm.weight", (h,)), ("hnorm.weight", (h,)),
                                                 ("eh_proj.weight", (h, 2 * h)), ("shared_head.norm.weight", (h,)),
                                                 ("shared_head.head.weight", (cfg.vocab_size, h)),
                                                 ("embed_tokens.weight", (cfg.vocab_size, h))]}  # fmt: skip
        body = {k: w for k, w in weights.items() if k not in own}
        (layer,) = _build_layers(root, cfg, body, range(n, n + 1))
        _check_shapes(root, cfg, {}, [layer], check_globals=False)
        problems = [f"{k} is missing" if k not in weights else f"{k} has shape {list(weights[k].shape)}, expected "
                    f"{list(shape)}" for k, shape in own.items() if weights.get(k) is None or weights[k].shape != shape]  # fmt: skip
        if problems:
            raise CheckpointError("; ".join(problems[:3]))
    except CheckpointError as e:
        why = f"multi-token-prediction layer {n} cannot draft: {str(e).splitlines()[-1][:300]}"
        skipped[:] = [(name, why if name.startswith(start) else reason) for name, reason in skipped]
        return None
    return MTPLayer(layer, {p + k: weights[p + k] for k in _MTP_INPUTS},
                    {"norm.weight": weights[p + "shared_head.norm.weight"],
                     "lm_head.weight": weights[p + "shared_head.head.weight"]}, weights[p + "embed_tokens.weight"])


def _check_config_fits_tensors(root: Path, cfg: ModelConfig, canonical: dict[str, TensorRecord]) -> None:
    """Before any per-layer or per-expert structure is built from config.json, its layer and expert
    counts must be ones the tensors present can fill (a config may not make us allocate for 10**9)."""
    layers, experts = set(), set()
    for name in canonical:
        m = _LAYER_RE.match(name)
        if m:
            layers.add(int(m.group(1)))
            e = _EXPERT_ID_RE.match(m.group(2))
            if e:
                experts.add(int(e.group(1)))
    if cfg.num_hidden_layers > len(layers):
        raise CheckpointError(f"{root / 'config.json'}: num_hidden_layers is {cfg.num_hidden_layers}, but the shards "
                              f"hold tensors of {len(layers)} decoder layer(s)")  # fmt: skip
    first_moe = next((i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)), None)
    if first_moe is not None and cfg.n_routed_experts > len(experts):
        # an id no layer holds is missing from every MoE layer, the first included
        missing = [e for e in range(min(cfg.n_routed_experts, len(experts) + 8)) if e not in experts][:8]
        raise CheckpointError(f"{root}: layer {first_moe} should have experts 0..{cfg.n_routed_experts - 1}; missing "
                              f"{missing}{' ...' if cfg.n_routed_experts > len(experts) + 8 else ''} (config.json "
                              f"n_routed_experts is {cfg.n_routed_experts}, the shards hold {len(experts)} expert "
                              "ids)")  # fmt: skip


def _group_weights(canonical: dict[str, TensorRecord], cfg: ModelConfig) -> dict[str, WeightEntry]:
    """Fold quantized component tensors (``weight_packed`` etc.) into one logical entry each."""
    by_module: dict[str, dict[str, TensorRecord]] = defaultdict(dict)
    singles: dict[str, TensorRecord] = {}
    for name, rec in canonical.items():
        module, _, leaf = name.rpartition(".")
        if leaf in ("weight_packed", "weight_scale", "weight_shape", "weight_scale_inv", "weight"):
            by_module[module][leaf] = rec
        else:
            singles[name] = rec
    weights: dict[str, WeightEntry] = {}
    for name, rec in singles.items():
        weights[name] = WeightEntry(name, "plain", rec.shape, {"weight": rec})
    for module, parts in by_module.items():
        name = f"{module}.weight"
        weights[name] = _make_weight(name, parts, cfg)
    return weights


def _make_weight(name: str, parts: dict[str, TensorRecord], cfg: ModelConfig) -> WeightEntry:
    keys = set(parts)
    shard = next(iter(parts.values())).shard
    fmt = format_of(keys)
    if fmt is None:
        raise CheckpointError(f"{shard}: {name}: unrecognised combination of stored tensors {sorted(keys)}")
    if fmt.name == "plain":
        rec = parts["weight"]
        if rec.dtype == "F8_E4M3":
            raise CheckpointError(f"{shard}: {name} is F8_E4M3 but has no weight_scale_inv")
        return WeightEntry(name, "plain", rec.shape, dict(parts))
    if fmt.name == "fp8":
        w, s = parts["weight"], parts["weight_scale_inv"]
        if w.dtype != "F8_E4M3" or s.dtype != "F32" or len(w.shape) != 2:
            raise CheckpointError(f"{shard}: {name}: expected F8_E4M3 weight with F32 weight_scale_inv, "
                                  f"found {w.dtype}{list(w.shape)} and {s.dtype}{list(s.shape)}")  # fmt: skip
        b0, b1 = cfg.quant.fp8_block_size
        want = (math.ceil(w.shape[0] / b0), math.ceil(w.shape[1] / b1))
        if s.shape != want:
            raise CheckpointError(f"{shard}: {name}.weight_scale_inv has shape {list(s.shape)}, expected "
                                  f"{list(want)} for a {list(w.shape)} weight in {b0}x{b1} blocks")  # fmt: skip
        return WeightEntry(name, "fp8", w.shape, {"weight": w, "weight_scale_inv": s})
    if cfg.quant.kind != "int4-pack":
        raise CheckpointError(f"{shard}: {name} is int4 pack-quantized but config.json declares no "
                              "compressed-tensors quantization_config")  # fmt: skip
    p, s, ws = parts["weight_packed"], parts["weight_scale"], parts["weight_shape"]
    g = cfg.quant.group_size
    if p.dtype != "I32" or len(p.shape) != 2 or s.dtype not in _PLAIN_DTYPES or len(s.shape) != 2:
        raise CheckpointError(f"{shard}: {name}: expected I32 weight_packed and BF16 weight_scale, "
                              f"found {p.dtype}{list(p.shape)} and {s.dtype}{list(s.shape)}")  # fmt: skip
    if ws.dtype not in ("I32", "I64") or ws.shape != (2,):
        raise CheckpointError(f"{shard}: {name}.weight_shape must be I32 or I64 of shape [2], "
                              f"found {ws.dtype}{list(ws.shape)}")  # fmt: skip
    in_features = s.shape[1] * g
    if p.shape[0] != s.shape[0] or p.shape[1] != math.ceil(in_features / 8):
        raise CheckpointError(f"{shard}: {name}: weight_packed {list(p.shape)} and weight_scale "
                              f"{list(s.shape)} disagree for group_size {g}")  # fmt: skip
    return WeightEntry(name, "int4", (p.shape[0], in_features), dict(parts))


def _build_layers(root: Path, cfg: ModelConfig, weights: dict[str, WeightEntry],
                  indices: range | None = None) -> tuple[LayerMap, ...]:  # fmt: skip
    """The maps of layers ``indices`` (default: the decoder's) from ``weights``, which hold no others."""
    indices = range(cfg.num_hidden_layers) if indices is None else indices
    per_layer: list[dict[str, WeightEntry]] = [dict() for _ in range(indices.stop)]
    experts: list[dict[int, dict[str, WeightEntry]]] = [defaultdict(dict) for _ in range(indices.stop)]
    for name, w in weights.items():
        m = _LAYER_RE.match(name)
        if not m:
            if name not in ("embed_tokens.weight", "norm.weight", "lm_head.weight"):
                raise CheckpointError(f"{_where(w)}: unexpected tensor {name!r} outside the decoder layers")
            continue
        layer, rest = int(m.group(1)), m.group(2)
        e = _EXPERT_RE.match(rest)
        if e:
            experts[layer][int(e.group(1))][e.group(2)] = w
        else:
            per_layer[layer][name] = w
    layers = []
    for i in indices:
        kind = cfg.layer_kind(i)
        found = experts[i]
        if kind == "dense" and found:
            raise CheckpointError(f"{_where(next(iter(found[min(found)].values())))}: layer {i} is dense per the "
                                  f"config (first_k_dense_replace={cfg.first_k_dense_replace}) but has routed experts")  # fmt: skip
        expert_maps: tuple[dict[str, WeightEntry], ...] = ()
        if kind == "moe":
            if sorted(found) != list(range(cfg.n_routed_experts)):
                missing = sorted(set(range(cfg.n_routed_experts)) - set(found))
                extra = sorted(set(found) - set(range(cfg.n_routed_experts)))
                raise CheckpointError(f"{root}: layer {i} should have experts 0..{cfg.n_routed_experts - 1}; "
                                      f"missing {missing[:8]}, unexpected {extra[:8]}")  # fmt: skip
            for e, projs in found.items():
                if set(projs) != set(EXPERT_PROJS):
                    raise CheckpointError(f"{root}: layer {i} expert {e} is missing "
                                          f"{sorted(set(EXPERT_PROJS) - set(projs))}")  # fmt: skip
            expert_maps = tuple(found[e] for e in range(cfg.n_routed_experts))
        layers.append(LayerMap(i, kind, per_layer[i], expert_maps))
    return tuple(layers)


def _where(w: WeightEntry) -> str:
    return str(next(iter(w.parts.values())).shard)


def _check_shapes(root: Path, cfg: ModelConfig, weights: dict[str, WeightEntry], layers,
                  check_globals: bool = True) -> None:  # fmt: skip
    problems: list[str] = []

    def check(name: str, shape: tuple[int, ...], have: dict[str, WeightEntry]) -> None:
        w = have.get(name)
        if w is None:
            problems.append(f"{root}: tensor {name!r} is missing (config implies shape {list(shape)})")
        elif w.shape != shape:
            problems.append(f"{_where(w)}: tensor {name!r} has shape {list(w.shape)}, "
                            f"config.json implies {list(shape)}")  # fmt: skip

    for name, shape in global_shapes(cfg).items() if check_globals else ():
        check(name, shape, weights)
    for layer in layers:
        want = layer_shapes(cfg, layer.index)
        for name, shape in want.items():
            check(name, shape, layer.base)
        for name in layer.base.keys() - want.keys():
            problems.append(f"{_where(layer.base[name])}: unexpected tensor {name!r} in {layer.kind} layer {layer.index}")
        for e, projs in enumerate(layer.experts):
            have = {w.name: w for w in projs.values()}
            for name, shape in expert_shapes(cfg, layer.index, e).items():
                check(name, shape, have)
        if len(problems) > 20:
            break
    if problems:
        more = "\n... and more" if len(problems) > 20 else ""
        raise CheckpointError("config.json and the tensors disagree:\n" + "\n".join(problems[:20]) + more)
