"""The streaming engine: only the routed experts read, and only what the residency budget does not keep.

For each step the engine embeds the input (reading only the embedding rows it needs), then for
each layer: gets the layer's non-expert weights (kept in memory when the budget holds them, else
read on a background thread while the previous layer computed), optionally predicts the layer's
experts with its router applied early and starts reading them, runs attention and the router, gets
the distinct experts any position picked (expert cache, reads ahead, storage), runs them. Then the
head, and the token is chosen (greedy, or as the run's decoding says). Weights come from
:class:`~kimi_jax.storage.weight_store.WeightStore`, which counts every byte by source. Capture
values come back from the same jitted calls whether or not they are kept.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from kimi_jax.model import layers
from kimi_jax.model.forward import layer_step
from kimi_jax.model.matmul import StoredWeight
from kimi_jax.model.params import ExpertStack, HeadParams, expert_stack, head_params, layer_params
from kimi_jax.model.quant import Fp8Weight, Int4Weight
from kimi_jax.model.resident import resident_moe_layer, whole_model_step
from kimi_jax.model.speculation import predict_experts
from kimi_jax.records import ByteCounts, LayerRecord, StepRecord
from kimi_jax.storage.codecs import EXACT, check_dequant_mode
from kimi_jax.storage.checkpoint import CheckpointIndex, WeightEntry
from kimi_jax.storage.reader import ReadCounters, ShardReader, return_freed_buffers
from kimi_jax.storage.residency import ResidencyPlan, budget_plan, plan_residency
from kimi_jax.storage.safetensors_header import TensorRecord
from kimi_jax.storage.weight_store import WeightStore

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Called after each layer with (step, layer, bytes read so far this step): progress display.
OnLayer = Callable[[int, int, int], None]


def decode_weight(entry: WeightEntry, parts: dict[str, Any], index: CheckpointIndex, dequant: str = EXACT,
                  check: bool = True) -> Any:  # fmt: skip
    """Stored parts -> a plain array or a quantized container that stays packed until the matmul
    and is then dequantized in mode ``dequant`` (see :mod:`kimi_jax.storage.codecs`).

    ``check=False`` when an int4 weight's ``weight_shape`` was already checked where it was read (a
    mesh process reads only its share of a weight, and only one process reads the metadata)."""
    if entry.format == "plain":
        return parts["weight"]
    if entry.format == "int4":
        if check:
            entry.check_weight_shape(parts)
        return Int4Weight(parts["weight_packed"], parts["weight_scale"], in_features=entry.shape[1],
                          group_size=index.config.quant.group_size, dequant=dequant)  # fmt: skip
    return Fp8Weight(parts["weight"], parts["weight_scale_inv"], block_size=index.config.quant.fp8_block_size,
                     dequant=dequant)  # fmt: skip


def on_device(weight: Any, matmul: str) -> Any:
    """A decoded weight as device arrays (the reader's aligned buffers are adopted, not copied), a
    linear weight wrapped for stored-precision matmuls when ``matmul == "stored"``."""
    weight = jax.tree_util.tree_map(jax.device_put, weight)
    return StoredWeight(weight) if matmul == "stored" and len(weight.shape) == 2 else weight


@contextlib.contextmanager
def _long_lived_frozen():
    """Yields ``freeze()``: collect once, then move every object alive to the collector's permanent
    generation (``gc.freeze``) until the block ends. Python's full collections otherwise walk all of
    them every few steps: 80-150 ms pauses in a 70 ms decode step of the medium model. Frozen objects
    are still freed by reference counting. Left alone when the process has already frozen objects."""
    frozen = []

    def freeze() -> None:
        if not frozen and gc.get_freeze_count() == 0:
            gc.collect()
            gc.freeze()
            frozen.append(True)

    try:
        yield freeze
    finally:
        if frozen:
            gc.unfreeze()


class _ExpertReads:
    """``fetch_experts`` for one layer backed by the weight store: each distinct expert picked comes
    once (from the expert cache, a read ahead or storage), and the time spent getting them is kept
    apart, so a layer's compute time excludes it."""

    def __init__(self, engine: Engine, layer: int):
        self.engine, self.layer, self.seconds = engine, layer, 0.0

    def __call__(self, stack_ids: list[int]) -> ExpertStack:
        started = time.perf_counter()
        if self.engine.placement is not None:  # a mesh: this process's share, staged on its devices
            stack = self.engine.placement.expert_stack(self.layer, stack_ids)
        else:
            distinct = list(dict.fromkeys(stack_ids))  # padding repeats an id; order kept: sorted ids first
            stack = expert_stack(self.engine.cfg, self.layer, stack_ids, self.engine.store.experts(self.layer, distinct))
        self.seconds += time.perf_counter() - started
        return stack


class Engine:
    """Streams one checkpoint. ``generate`` decodes tokens; see :class:`StepRecord`.

    With ``mesh`` (a :class:`~kimi_jax.model.mesh.MeshShape`) the same layer functions run on a
    device mesh: the weights come from a placement (:mod:`kimi_jax.model.placement`) that reads
    only this process's share, and byte counts are gathered from every process."""

    def __init__(self, index: CheckpointIndex, dtype: str = "float32", prefetch: bool = True, io_retries: int = 3,
                 keep_capture: bool = True, reader: ShardReader | None = None, dequant: str = EXACT,
                 matmul: str = "widened", residency: ResidencyPlan | None = None, expert_cache: str = "lru",
                 speculate: bool = False, mesh=None):  # fmt: skip
        """``dequant`` is compute.dequant, ``matmul`` compute.matmul; ``residency``
        (:func:`~kimi_jax.storage.residency.plan_residency`, default: keep nothing) says what stays in
        memory, ``expert_cache`` is the policy of the expert cache within it, and ``speculate`` reads
        the experts an early router predicts ahead (``residency`` also says whether ranges read leave
        the page cache). ``mesh`` replaces the three: its placement says where the weights live."""
        self.index = index
        self.keep_capture = keep_capture
        self.cfg = index.config
        self.dtype = DTYPES[dtype]
        self.dequant = check_dequant_mode(dequant)
        self.prefetch = prefetch
        # A given reader (remote, digest-checked) replaces the plain local one; the engine only calls its interface.
        self.reader = reader if reader is not None else ShardReader(retries=io_retries)
        self.residency = residency if residency is not None else plan_residency(index, 0)
        self.reader.drop_after_read = self.residency.drop_page_cache
        if self.reader.drop_after_read:
            return_freed_buffers()  # a checkpoint larger than memory: freed read buffers go back at once
        dequant = self.dequant
        self.store = WeightStore(index, self.reader, self.residency, expert_cache,
                                 decode=lambda e, parts: on_device(decode_weight(e, parts, index, dequant), matmul))  # fmt: skip
        # When the budget holds every expert, each MoE layer's experts are read whole once, kept stacked,
        # and the layer runs as one program (kimi_jax.model.resident); reading ahead is then pointless.
        every_expert = sum(lm.total_bytes - lm.base_bytes for lm in index.layers)
        self.all_experts_resident = self.residency.expert_capacity >= every_expert
        self._expert_stacks: dict[int, ExpertStack] = {}
        self.speculate = speculate and not self.all_experts_resident
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kimi-jax-prefetch")
        self.mesh = self.placement = None
        self.load_bytes_per_process: list[int] | None = None  # read before step 0 (a resident placement)
        if mesh is not None:
            from kimi_jax.model.mesh import build_mesh, gather_counts
            from kimi_jax.model.placement import make_placement

            self.mesh = build_mesh(mesh)
            self.all_experts_resident = self.speculate = False
            decode = functools.partial(decode_weight, dequant=self.dequant)
            self.placement = make_placement(index, self.mesh, mesh.placement, self.reader, self.dtype, decode)
            self.load_bytes_per_process = [row[0] for row in gather_counts([self.reader.run.total])]

    @classmethod
    def from_plan(cls, plan: Any, keep_capture: bool = True, residency: ResidencyPlan | None = None) -> "Engine":
        """The engine a plan describes: its checkpoint, with the manifest's compute and storage settings.

        ``plan`` is a run plan or a vindex plan: anything with ``index`` and ``manifest``, and a run
        plan's ``source`` (remote, digest-checked) supplies the reader; without one, shards are read locally.
        ``residency`` defaults to the manifest's budget and page-cache choice resolved now (``auto``
        measures memory: a caller running the plan twice resolves it once and passes it)."""
        m = plan.manifest
        source = getattr(plan, "source", None)
        reader = source.reader(m.storage.io_retries) if source is not None else None
        residency = residency if residency is not None else budget_plan(plan.index, m.storage.resident_bytes,
                                                                          m.storage.page_cache)  # fmt: skip
        return cls(plan.index, m.compute.dtype, m.storage.prefetch, m.storage.io_retries, keep_capture=keep_capture,
                   reader=reader, dequant=m.compute.dequant, matmul=m.compute.matmul, residency=residency,
                   expert_cache=m.storage.expert_cache, speculate=m.storage.speculate,
                   mesh=getattr(plan, "mesh", None))  # fmt: skip

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.store.close()
        self.reader.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- loading -----------------------------------------------------------------------------

    def _load_base(self, layer: int):
        started = time.perf_counter()
        if self.placement is not None:
            return self.placement.stage_layer(layer), time.perf_counter() - started
        return layer_params(self.cfg, layer, self.store.base(layer)), time.perf_counter() - started

    def _assemble(self, loaded: Any) -> Any:
        """On a mesh, what the prefetch thread staged onto the devices, in its compute layout. That
        step is a collective, so it runs here, on the thread that runs the layers, in the same order
        in every process; the prefetch thread only reads and copies (process-local work)."""
        return self.placement.assemble(loaded) if self.placement is not None else loaded

    def _load_head(self):
        started = time.perf_counter()
        if self.placement is not None:
            return self.placement.stage_head(), time.perf_counter() - started
        tensors = dict(self.store.head())
        if "lm_head.weight" not in tensors:  # tied embeddings
            tensors["lm_head.weight"] = tensors["embed_tokens.weight"]
        return head_params(self.cfg, tensors), time.perf_counter() - started

    def _logits(self, head: HeadParams, hidden: jax.Array) -> np.ndarray:
        """Logits of the last position (:func:`~kimi_jax.model.layers.head_logits`: in vocabulary chunks
        unless the head is stored). On a mesh each device holds a vocabulary slice of the head; the
        slices are gathered."""
        if self.placement is not None:
            from kimi_jax.model.placement import logits_on_host

            return logits_on_host(self.cfg, head, hidden)
        return np.asarray(layers.head_logits(self.cfg, head, hidden))

    def _embed(self, tokens: list[int]) -> jax.Array:
        """Read only the embedding rows of the distinct tokens in ``tokens``."""
        if self.placement is not None:
            return self.placement.embed(tokens)
        entry = self.index.embed.parts["weight"]
        row = entry.nbytes // entry.shape[0]
        distinct = sorted(set(tokens))
        records = [TensorRecord(f"{entry.stored_name}[{t}]", entry.shard, entry.offset + t * row, row, entry.dtype,
                                (entry.shape[1],)) for t in distinct]  # fmt: skip
        rows = self.store.records(records, labels=[f"embed_tokens.weight[{t}]" for t in distinct])
        table = dict(zip(distinct, rows))
        return jnp.asarray(np.stack([table[t] for t in tokens])).astype(self.dtype)

    def _submit(self, fn: Callable, *args) -> Future:
        if self.prefetch:
            return self._pool.submit(fn, *args)
        done: Future = Future()
        done.set_result(fn(*args))
        return done

    # -- one forward pass --------------------------------------------------------------------

    def forward(self, tokens: list[int], positions: np.ndarray, caches: list | None,
                on_layer: Callable[[int, int], None] | None = None):  # fmt: skip
        """Run ``tokens`` at ``positions`` through every layer; returns (hidden_last, logits, layers, caches).

        ``on_layer(layer, bytes read so far this step)`` is called after each layer."""
        cfg = self.cfg
        x = self._embed(tokens)
        pos = jnp.asarray(positions, dtype=jnp.int32)
        if caches is not None and self._whole_model_in_memory():
            return self._forward_whole(x, pos, caches, on_layer)
        pending = self._submit(self._load_base, 0)
        records: list[LayerRecord] = []
        new_caches = [] if caches is not None else None
        for layer in range(cfg.num_hidden_layers):
            params, read_s = pending.result()
            is_last = layer + 1 == cfg.num_hidden_layers
            pending = self._submit(self._load_head) if is_last else self._submit(self._load_base, layer + 1)
            params = self._assemble(params)
            cache = caches[layer] if caches is not None else None
            moe = self.index.layers[layer].kind == "moe"
            if self.speculate and moe:
                self.store.speculate(layer, predict_experts(cfg, params, x))
            if self.all_experts_resident and moe:
                x, cache, routing, capture, fetch_s, compute_s = self._resident_moe(layer, params, x, pos, cache)
            else:
                expert_reads = _ExpertReads(self, layer)
                started = time.perf_counter()
                plan = self.placement.plan_slots(layer) if self.placement is not None else None
                x, cache, routing, capture = layer_step(cfg, params, x, pos, cache, expert_reads, plan)
                x.block_until_ready()
                fetch_s = expert_reads.seconds
                compute_s = time.perf_counter() - started - fetch_s
            if new_caches is not None:
                new_caches.append(cache)
            records.append(self._layer_record(layer, routing, capture, read_s + fetch_s, compute_s))
            del params
            if on_layer:
                on_layer(layer, self.reader.step.total)
        head = self._assemble(pending.result()[0])
        hidden = x[-1]
        logits = self._logits(head, hidden)
        if self.mesh is not None:  # activations come out split over the model axis: gather them
            from kimi_jax.model.mesh import replicate

            hidden = replicate(hidden, self.mesh)
            new_caches = replicate(new_caches, self.mesh) if new_caches is not None else None
        return np.asarray(hidden), np.asarray(logits), records, new_caches

    def _whole_model_in_memory(self) -> bool:
        """Every layer's weights, every expert and the head are in memory (read in an earlier step)."""
        layers_kept = len(self.residency.layers) == self.cfg.num_hidden_layers and self.residency.head
        moe = sum(lm.kind == "moe" for lm in self.index.layers)
        return self.all_experts_resident and layers_kept and len(self._expert_stacks) == moe and self.mesh is None

    def _forward_whole(self, x: jax.Array, pos: jax.Array, caches: list, on_layer: Callable[[int, int], None] | None):
        """:meth:`forward` as one program for the layers (:func:`~kimi_jax.model.resident.whole_model_step`)
        and the head: the weights are taken from memory (and counted as used), the programs run, and
        the picks returned give each layer's expert bytes. Layers are not timed apart: the program's time is the
        step's (``compute_s`` of each layer is 0)."""
        n = self.cfg.num_hidden_layers
        bases = tuple(layer_params(self.cfg, layer, self.store.base(layer)) for layer in range(n))
        stacks = tuple(self._expert_stacks.get(layer) for layer in range(n))
        head = self._load_head()[0]
        hidden, caches, routings, captures = whole_model_step(self.cfg, bases, stacks, x, pos, tuple(caches))
        logits = self._logits(head, hidden)
        # One transfer for every layer's picks (and the capture, when kept) instead of one per array. A
        # bare run fetches only the picks, which the byte accounting needs, as the layer-by-layer run does.
        if self.keep_capture:
            routings, captures = jax.device_get((routings, captures))
        else:
            picks = jax.device_get([None if r is None else r.idx for r in routings])
            routings = [None if r is None else r._replace(idx=idx) for r, idx in zip(routings, picks)]
        records = []
        for layer, (routing, capture) in enumerate(zip(routings, captures)):
            if routing is not None:
                self.store.count_all_experts(layer, routing.idx, False)
            records.append(self._layer_record(layer, routing, capture, 0.0, 0.0))
            if on_layer:
                on_layer(layer, self.reader.step.total)
        return np.asarray(hidden), logits, records, list(caches)

    def _resident_moe(self, layer: int, params: Any, x: jax.Array, pos: jax.Array, cache: Any):
        """A MoE layer whose experts are all kept, stacked, as one program (read whole the first time):
        returns (x, cache, routing, capture, seconds getting experts, seconds computing)."""
        started = time.perf_counter()
        stack = self._expert_stacks.get(layer)
        read_now = stack is None
        if read_now:
            n = self.cfg.n_routed_experts
            stack = self._expert_stacks[layer] = expert_stack(self.cfg, layer, list(range(n)), self.store.all_experts(layer))
        fetch_s = time.perf_counter() - started
        started = time.perf_counter()
        x, cache, routing, capture = resident_moe_layer(self.cfg, params, stack, x, pos, cache)
        x.block_until_ready()
        compute_s = time.perf_counter() - started
        self.store.count_all_experts(layer, routing.idx, read_now)
        return x, cache, routing, capture, fetch_s, compute_s

    def _layer_record(self, layer: int, routing: layers.Routing | None, capture: dict, read_s: float,
                      compute_s: float) -> LayerRecord:  # fmt: skip
        """A bare run leaves the capture arrays on the device: same programs, nothing fetched."""
        keep = self.keep_capture
        return LayerRecord(
            layer=layer, kind=self.index.layers[layer].kind,
            norm_in=float(capture["norm_in"]) if keep else None, norm_out=float(capture["norm_out"]) if keep else None,
            experts=np.asarray(routing.idx).tolist() if keep and routing else None,
            routing_weights=np.asarray(routing.weights_norm).tolist() if keep and routing else None,
            router_scores=np.asarray(routing.scores).tolist() if keep and routing else None,
            bytes_read=0, read_s=read_s, compute_s=compute_s,
        )  # fmt: skip

    # -- generation --------------------------------------------------------------------------

    def empty_caches(self, prompt_len: int, max_new_tokens: int) -> list:
        capacity = prompt_len + max_new_tokens
        return [layers.LatentCache.empty(self.cfg, capacity, self.dtype) for _ in range(self.cfg.num_hidden_layers)]

    def generate(self, prompt: list[int], max_new_tokens: int, kv_cache: bool,
                 on_step: Callable[[StepRecord], None] | None = None, done: list[StepRecord] | None = None,
                 caches: list | None = None, on_layer: OnLayer | None = None,
                 decoding=None) -> list[StepRecord]:  # fmt: skip
        """Decode up to ``max_new_tokens`` tokens.

        ``decoding`` (a :class:`kimi_jax.text.decoding.Decoding`) chooses each token from the step's
        logits and says when to stop; without it, greedy decoding (argmax, ties to the lowest id)
        for exactly ``max_new_tokens`` tokens. It runs on the host, after the layer programs.

        ``on_step(record)`` is called after each step, ``on_layer(step, layer, bytes read so far this
        step)`` after each layer.

        To resume, pass the completed steps as ``done`` and, with ``kv_cache``, the latent caches
        as they were after the last of them; decoding continues exactly where it stopped.
        """
        steps: list[StepRecord] = list(done or [])
        context = list(prompt) + [s.token for s in steps]
        if decoding is not None and decoding.stop_reason([s.token for s in steps]):
            return steps  # the run had already stopped when it was interrupted
        if kv_cache and caches is None:
            if steps:
                raise ValueError("resuming a kv_cache run needs the caches of its last completed step")
            caches = self.empty_caches(len(prompt), max_new_tokens)
        caches = caches if kv_cache else None
        with _long_lived_frozen() as freeze:
            return self._generate(steps, context, max_new_tokens, kv_cache, caches, on_step, on_layer, decoding, freeze)

    def _generate(self, steps, context, max_new_tokens, kv_cache, caches, on_step, on_layer, decoding,
                  freeze: Callable[[], None]) -> list[StepRecord]:  # fmt: skip
        for step in range(len(steps), max_new_tokens):
            if step > 0:
                freeze()  # once: what the first step built (weights kept, programs, the index) is long-lived
            started = time.perf_counter()
            self.store.begin_step()
            if kv_cache and step > 0:
                tokens, positions = [context[-1]], np.array([len(context) - 1])
            else:
                tokens, positions = list(context), np.arange(len(context))
            step_on_layer = functools.partial(on_layer, step) if on_layer else None
            with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
                hidden, logits, layers, caches = self.forward(tokens, positions, caches, step_on_layer)
            by_layer = self.store.end_step()
            counters: ReadCounters = self.reader.end_step()
            per_process: dict[int | None, list[int]] | None = None
            if self.placement is not None:  # the store served nothing: count the placement's reads, every process's
                by_layer, per_process = self.placement.byte_counts(counters, tokens)
                for rec in layers:
                    rec.bytes_per_process = per_process.get(rec.layer)
            io = ByteCounts()
            for counts in by_layer.values():
                io = io.add(counts)
            for rec in layers:
                rec.io = by_layer.get(rec.layer, ByteCounts())
                rec.bytes_read = rec.io.used
            # the first maximum: ties go to the lowest id
            token = int(np.argmax(logits)) if decoding is None else decoding.choose(step, logits)
            record = StepRecord(step, list(context), token, float(logits[token]), logits, hidden, layers,
                                io.used, {k: v.used for k, v in by_layer.items()}, time.perf_counter() - started,
                                caches, counters.content(), io,
                                None if per_process is None else [sum(c) for c in zip(*per_process.values())])  # fmt: skip
            steps.append(record)
            if on_step:
                on_step(record)
            context.append(token)
            if decoding is not None and decoding.stop_reason([s.token for s in steps]):
                break
        return steps
