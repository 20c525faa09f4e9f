"""Weights onto a device mesh: each process reads only the bytes its devices hold.

Every stored tensor comes off storage in a *staging* layout: its leading axis (rows of a matrix,
experts of a stack, token rows of the embedding) is cut into one block per mesh device, in process
order, and each process reads only its devices' blocks, as one contiguous byte range per tensor.
A block past the end of the tensor is zeros and is never read. So across all processes every
byte of a tensor is read exactly once: N processes read about 1/N of each layer, and the totals
equal a single-device run's. One jitted call per layer then moves the staged arrays into the
layout the layer functions compute in (:mod:`kimi_jax.model.mesh`). That is the only traffic
between hosts for weights, and there is none when the rows a device computes with are the rows it
staged (a mesh with ``expert: 1``); along the ``expert`` axis the replicated weights are gathered.

Routed experts: the distinct experts the router picked are dealt round-robin to the devices
(:func:`deal_expert_slots`), so each process reads and computes about 1/N of them; a slot nobody
was dealt is zeros. Small metadata tensors that no layer computes with (an int4 weight's
``weight_shape``) are read whole by the process that reads that weight's first rows, and checked
there.

Placements, each a :class:`~kimi_jax.model.source.WeightSource`: :class:`StreamedPlacement`
reads each layer when it is needed (on the engine's prefetch thread, so the next layer's reads and
host-to-device copies overlap this layer's compute), and keeps across steps the layers and head the
residency budget names (``storage.resident_bytes``: the same choice as on one device, each process
keeping its devices' share; experts are dealt to the devices anew each step, so there is no expert
cache); :class:`ResidentPlacement` reads every layer once, up front, and keeps all experts of a
layer as one stack in expert-id order.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from kimi_jax.model import layers
from kimi_jax.model.mesh import (
    MeshShape,
    build_mesh,
    gather_counts,
    host_value,
    leaf_spec,
    replicate,
    replicated,
    staging_sharding,
)
from kimi_jax.model.params import ExpertStack, HeadParams, head_params, layer_params
from kimi_jax.model.slots import deal_expert_slots
from kimi_jax.model.source import StepBytes, WeightSource
from kimi_jax.model.weights import WeightPolicy
from kimi_jax.records import ByteCounts
from kimi_jax.storage.checkpoint import EXPERT_PROJS, CheckpointIndex, WeightEntry
from kimi_jax.storage.formats import METADATA_PARTS
from kimi_jax.storage.reader import ShardReader
from kimi_jax.storage.residency import ResidencyPlan
from kimi_jax.storage.safetensors_header import TensorRecord


@dataclasses.dataclass(frozen=True)
class Staged:
    """Weights on this process's devices in the staging layout, and how they become parameters."""

    entries: dict[str, WeightEntry]  # by the name the parameters know the weight by
    keys: tuple[tuple[str, str], ...]  # (weight name, stored part) of each staged array
    rows: tuple[int, ...]
    targets: tuple[NamedSharding, ...]  # the compute layout of each
    arrays: tuple[jax.Array, ...]
    build: Callable[[dict], Any]  # canonical name -> weight, to the layer's or the head's parameters
    layer: int | None = None  # the layer staged (None: the head)


class MeshReads:
    """This process's reads for a mesh, and the arrays they become. Counts go to ``reader``."""

    def __init__(self, index: CheckpointIndex, mesh: Mesh, reader: ShardReader, dtype, policy: WeightPolicy):
        self.index, self.cfg, self.mesh, self.reader, self.dtype = index, index.config, mesh, reader, dtype
        self.policy = policy
        self.devices = list(mesh.devices.flat)  # process order (mesh.mesh_devices)
        me = jax.process_index()
        local = [i for i, d in enumerate(self.devices) if d.process_index == me]
        self.first, self.stop = local[0], local[-1] + 1  # this process's contiguous device block
        self.staging = staging_sharding(mesh)

    # -- staging ---------------------------------------------------------------------------------

    def _block(self, rows: int) -> int:
        return -(-rows // len(self.devices))

    def _stage(self, rows_of_mine: dict[int, np.ndarray], block: int, like: tuple[tuple[int, ...], Any]) -> jax.Array:
        """A staged global array [devices * block, ...] from this process's device blocks."""
        tail, dtype = like
        pieces = []
        for i in range(self.first, self.stop):
            piece = rows_of_mine.get(i)
            if piece is None or piece.shape[0] < block:
                full = np.zeros((block, *tail), dtype)
                if piece is not None:
                    full[: piece.shape[0]] = piece
                piece = full
            pieces.append(jax.device_put(piece, self.devices[i]))
        return jax.make_array_from_single_device_arrays((len(self.devices) * block, *tail), self.staging, pieces)

    def _read_rows(self, records: list[TensorRecord], layer: int | None) -> list[jax.Array]:
        """Stage each record by rows: this process reads its devices' rows of each, in one call."""
        wanted, plans = [], []
        for rec in records:
            block = self._block(rec.shape[0])
            start, stop = min(self.first * block, rec.shape[0]), min(self.stop * block, rec.shape[0])
            plans.append((block, start, stop))
            if stop > start:
                wanted.append((rec, start, stop))
        arrays = iter(self.reader.read_shares(wanted, layer=layer))
        staged = []
        for rec, (block, start, stop) in zip(records, plans):
            mine = next(arrays) if stop > start else None
            blocks = {}
            if mine is not None:
                for i in range(self.first, self.stop):
                    lo, hi = i * block - start, min((i + 1) * block, stop) - start
                    if hi > lo:
                        blocks[i] = mine[max(lo, 0) : hi]
            staged.append(self._stage(blocks, block, (rec.shape[1:], rec.numpy_dtype)))
        return staged

    def _owns_first_rows(self, rec: TensorRecord) -> bool:
        return self.first * self._block(rec.shape[0]) == 0

    # -- layers ----------------------------------------------------------------------------------

    def stage_weights(self, entries: dict[str, WeightEntry], layer: int | None, build: Callable[[dict], Any]) -> Staged:
        """Read this process's share of ``entries`` (by the name the parameters know each by) and copy
        it onto its devices. Process-local (no collective), so it may run on the engine's prefetch
        thread; :meth:`assemble` finishes it."""
        compute = [(name, part, rec) for name, e in entries.items() for part, rec in e.parts.items()
                   if part not in METADATA_PARTS]  # fmt: skip
        staged = self._read_rows([rec for _, _, rec in compute], layer)
        self._check_metadata(list(entries.values()), layer)
        heads = self.cfg.num_attention_heads
        targets = tuple(NamedSharding(self.mesh, leaf_spec(name.split("."), rec.shape, self.mesh, heads))
                        for name, _, rec in compute)  # fmt: skip
        return Staged(entries, tuple((name, part) for name, part, _ in compute), tuple(rec.shape[0] for *_, rec in compute),
                      targets, tuple(staged), build, layer)  # fmt: skip

    def assemble(self, staged: Staged) -> Any:
        """Staged weights in their compute layouts, built into parameters. A collective: every process
        calls it at the same point of the run, so it runs on the thread that runs the layers."""
        arrays = dict(zip(staged.keys, _unstage(staged.rows, staged.targets)(staged.arrays)))
        # weight_shape was checked where it was read (_check_metadata)
        tensors = {name: self.policy.decode(e, {p: arrays[(name, p)] for p in e.parts if p not in METADATA_PARTS},
                                            self.index, check=False) for name, e in staged.entries.items()}  # fmt: skip
        return staged.build(tensors)

    def _check_metadata(self, entries: list[WeightEntry], layer: int | None) -> None:
        mine = [e for e in entries if "weight_shape" in e.parts and self._owns_first_rows(e.parts["weight_packed"])]
        if mine:
            parts = self.reader.read_weights(mine, layer=layer)
            for e in mine:
                e.check_weight_shape(parts[e.name])

    def stage_layer(self, layer: int) -> Staged:
        return self.stage_weights(self.index.layers[layer].base, layer,
                                  lambda tensors: layer_params(self.cfg, layer, tensors))  # fmt: skip

    def stage_head(self) -> Staged:
        return self.stage_weights(self.index.head, None, lambda tensors: head_params(self.cfg, tensors))

    def expert_stack(self, layer: int, stack_ids: list[int | None]) -> ExpertStack:
        """The stack ``stack_ids`` (None: a zero slot) of ``layer``; this process reads only the
        experts in its devices' slots."""
        experts = self.index.layers[layer].experts
        block = len(stack_ids) // len(self.devices)
        mine = {s: e for s, e in enumerate(stack_ids) if e is not None and self.first * block <= s < self.stop * block}
        entries = [w for e in mine.values() for w in experts[e].values()]
        parts = self.reader.read_weights(entries, layer=layer)
        for w in entries:
            w.check_weight_shape(parts[w.name])
        like = experts[0]
        fields: dict[str, dict[str, jax.Array]] = {}
        for proj in EXPERT_PROJS:
            entry = like[proj]
            fields[proj] = {}
            for part, rec in entry.parts.items():
                if part in METADATA_PARTS:
                    continue
                blocks = {}
                for i in range(self.first, self.stop):
                    rows = [parts[experts[mine[s]][proj].name][part] if s in mine else np.zeros(rec.shape, rec.numpy_dtype)
                            for s in range(i * block, (i + 1) * block)]  # fmt: skip
                    blocks[i] = np.stack(rows)
                fields[proj][part] = self._stage(blocks, block, (rec.shape, rec.numpy_dtype))
        # Staged is already the compute layout: each device computes the experts its process read.
        return ExpertStack(**{proj: self.policy.decode(like[proj], fields[proj], self.index, check=False)
                              for proj in EXPERT_PROJS})  # fmt: skip

    def embed_row(self, token: int) -> TensorRecord:
        """The embedding's row ``token`` under its own name (NAME[ROW]), as one device reads it: the
        digest file has a digest per row."""
        entry = self.index.embed.parts["weight"]
        return dataclasses.replace(entry.rows(token, token + 1), stored_name=f"{entry.stored_name}[{token}]")

    def embed(self, tokens: list[int]) -> jax.Array:
        """Rows of the distinct tokens, each read by one process; x [T, hidden] replicated."""
        entry = self.index.embed.parts["weight"]
        distinct = sorted(set(tokens))
        rows = [self.embed_row(t) for t in distinct]
        block = self._block(len(distinct))
        mine = [(i, k) for i in range(self.first, self.stop) for k in range(i * block, min((i + 1) * block, len(distinct)))]
        read = self.reader.read_records([rows[k] for _, k in mine], layer=None,
                                        labels=[f"embed_tokens.weight[{distinct[k]}]" for _, k in mine])  # fmt: skip
        blocks: dict[int, list[np.ndarray]] = {}
        for (i, _), arr in zip(mine, read):
            blocks.setdefault(i, []).append(arr)
        staged = self._stage({i: np.concatenate(b) for i, b in blocks.items()}, block, (entry.shape[1:], entry.numpy_dtype))
        position = {t: k for k, t in enumerate(distinct)}
        order = np.asarray([position[t] for t in tokens], dtype=np.int32)
        return _gather_rows(replicated(self.mesh), self.dtype)(staged, order)


@functools.lru_cache(maxsize=256)
def _unstage(rows: tuple[int, ...], targets: tuple[NamedSharding, ...]):
    """Staged arrays -> their first ``rows`` rows, in the compute layouts ``targets``."""
    return jax.jit(lambda staged: tuple(a[:n] for a, n in zip(staged, rows)), out_shardings=targets)


@functools.lru_cache(maxsize=16)
def _gather_rows(target: NamedSharding, dtype):
    return jax.jit(lambda table, order: jnp.take(table, order, axis=0).astype(dtype), out_shardings=target)


class _MeshExperts:
    """A MoE layer's routed experts on the mesh, for one step (an
    :class:`~kimi_jax.model.step.ExpertSource`): planned on the host, dealt to the devices; nothing is
    read ahead (the deal needs the router's picks)."""

    fused = False

    def __init__(self, placement: StreamedPlacement, layer: int):
        self.placement, self.layer, self.seconds = placement, layer, 0.0

    def read_ahead(self, params: Any, x: jax.Array) -> None:
        pass

    def plan(self, picks: np.ndarray) -> tuple[list[int | None], np.ndarray]:
        self.placement.picked[self.layer] = sorted({int(e) for e in np.asarray(picks).reshape(-1)})
        return self.placement.plan_experts(picks)

    def stack(self, stack_ids: list | None) -> ExpertStack:
        started = time.perf_counter()
        stack = self.placement.expert_stack(self.layer, stack_ids)
        self.seconds += time.perf_counter() - started
        return stack

    def done(self, routing: layers.Routing) -> None:
        pass  # counted from the picks the plan saw


class StreamedPlacement(WeightSource):
    """Each layer read from storage when it is needed, but the layers and head the residency budget
    keeps; see the module docstring.

    ``stage_layer``/``stage_head`` read and copy onto the devices (safe on a prefetch thread);
    ``assemble`` turns the result into parameters on the thread that runs the layers."""

    placement = "streamed"
    keeps_experts = False  # routed experts come from storage in every step

    def __init__(self, reads: MeshReads, residency: ResidencyPlan):
        super().__init__(reads.index)
        self.reads, self.residency, self.mesh = reads, residency, reads.mesh
        self.picked: dict[int, list[int]] = {}  # this step: each MoE layer's distinct experts
        self._kept: dict[int | None, Any] = {}  # layer (None: the head) -> parameters kept across steps

    def begin_step(self) -> None:
        self.reads.reader.begin_step()

    def bytes_so_far(self) -> int:
        return self.reads.reader.step.total

    def embed(self, tokens: list[int]) -> jax.Array:
        return self.reads.embed(tokens)

    def stage_layer(self, layer: int) -> Any:
        return self._kept.get(layer) or self.reads.stage_layer(layer)

    def stage_head(self) -> Any:
        return self._kept.get(None) or self.reads.stage_head()

    def assemble(self, staged: Any) -> Any:
        if not isinstance(staged, Staged):
            return staged  # kept parameters
        params = self.reads.assemble(staged)
        if staged.layer in self.residency.layers or (staged.layer is None and self.residency.head):
            self._kept[staged.layer] = params
        return params

    def routed_experts(self, layer: int) -> _MeshExperts:
        return _MeshExperts(self, layer)

    def plan_experts(self, idx: np.ndarray) -> tuple[list[int | None], np.ndarray]:
        return deal_expert_slots(idx, self.cfg.n_routed_experts, len(self.reads.devices))

    def expert_stack(self, layer: int, stack_ids: list[int | None]) -> ExpertStack:
        return self.reads.expert_stack(layer, stack_ids)

    def logits(self, head: HeadParams, hidden: jax.Array) -> np.ndarray:
        """Final norm and the vocabulary-split head; the logits gathered whole to every host."""
        return host_value(layers.final_logits(self.cfg, head, hidden))

    def gather(self, hidden: jax.Array, caches: list | None) -> tuple[jax.Array, list | None]:
        """Activations come out split over the model axis: gathered whole (a collective)."""
        return replicate(hidden, self.mesh), replicate(caches, self.mesh) if caches is not None else None

    def end_step(self, tokens: list[int]) -> StepBytes:
        """One step's :class:`~kimi_jax.records.ByteCounts` per layer (None: embedding rows and head),
        over every process (a collective), and what each process read, per layer.

        ``used`` is what a one-device run would count for the same routing (the layer's non-expert
        weights and its distinct experts; the embedding rows and the head); ``from_storage`` is what
        the processes read; the rest was on the devices already (``from_memory``)."""
        index = self.index
        # the weights digest names what the step used, as on one device, wherever it came from: kept
        # layers and a resident stack's experts are served from memory, checked when they were read,
        # and the shares, embedding rows and experts other processes read, checked there
        self.reads.reader.count_served(
            [self.reads.embed_row(t) for t in set(tokens)]
            + [p for lm in index.layers for w in lm.base.values() for p in w.parts.values()]
            + [p for layer, picked in self.picked.items() for e in picked
               for w in index.layers[layer].experts[e].values() for p in w.parts.values()]
            + [p for w in index.head.values() for p in w.parts.values()])  # fmt: skip
        counters = self.reads.reader.end_step()
        keys: list[int | None] = [None, *range(len(index.layers))]
        rows = gather_counts([counters.per_layer.get(k, 0) for k in keys]
                             + [counters.per_layer_overread.get(k, 0) for k in keys])  # fmt: skip
        per_process = {k: [row[i] for row in rows] for i, k in enumerate(keys)}
        embed_row = index.embed_row_bytes()
        used = {None: len(set(tokens)) * embed_row + sum(e.nbytes for e in index.head.values())}
        for layer, lm in enumerate(index.layers):
            used[layer] = lm.base_bytes + sum(lm.expert_bytes(e) for e in self.picked.get(layer, []))
        counts = {}
        for i, k in enumerate(keys):
            read, experts = sum(per_process[k]), len(self.picked.get(k, [])) if k is not None else 0
            counts[k] = ByteCounts(used=used[k], from_memory=used[k] - read, from_storage=read,
                                   overread=sum(row[len(keys) + i] for row in rows), experts_used=experts,
                                   experts_from_memory=experts if self.keeps_experts else 0)  # fmt: skip
        self.picked = {}
        return StepBytes(counts, per_process, counters)


class ResidentPlacement(StreamedPlacement):
    """Every layer read once, before the first step, and kept sharded on the devices.

    A MoE layer keeps all its experts as one stack in expert-id order (split over the expert axis),
    so a step reads nothing but the embedding rows and its slots are the router's expert ids."""

    placement = "resident"
    keeps_experts = True

    def __init__(self, reads: MeshReads, residency: ResidencyPlan):
        super().__init__(reads, residency)
        cfg = reads.cfg
        self._layers = [reads.assemble(reads.stage_layer(layer)) for layer in range(cfg.num_hidden_layers)]
        devices = len(reads.devices)
        every = list(range(cfg.n_routed_experts)) + [None] * (-cfg.n_routed_experts % devices)
        self._experts = {layer: reads.expert_stack(layer, every) for layer in range(cfg.num_hidden_layers)
                         if self.experts(layer) is not None}  # fmt: skip
        self._head = reads.assemble(reads.stage_head())
        jax.block_until_ready((self._layers, self._experts, self._head))

    def stage_layer(self, layer: int) -> Any:
        return self._layers[layer]

    def stage_head(self) -> Any:
        return self._head

    def plan_experts(self, idx: np.ndarray) -> tuple[list[int | None], np.ndarray]:
        return list(range(self.cfg.n_routed_experts)), np.asarray(idx, dtype=np.int32)

    def expert_stack(self, layer: int, stack_ids: list[int | None]) -> ExpertStack:
        return self._experts[layer]


def make_placement(index: CheckpointIndex, shape: MeshShape, reader: ShardReader, residency: ResidencyPlan,
                   policy: WeightPolicy, dtype) -> StreamedPlacement:  # fmt: skip
    """The mesh ``shape``'s placement, reading through ``reader``; what it read before step 0 (a
    resident placement) is gathered from every process into ``load_bytes_per_process``."""
    reads = MeshReads(index, build_mesh(shape), reader, dtype, policy)
    placement = (ResidentPlacement if shape.placement == "resident" else StreamedPlacement)(reads, residency)
    placement.load_bytes_per_process = [row[0] for row in gather_counts([reader.run.total])]
    return placement


__all__ = ["Staged", "MeshReads", "StreamedPlacement", "ResidentPlacement", "make_placement"]
