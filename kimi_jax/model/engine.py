"""The engine: one layer loop over a weight source, and the decode loop around it.

A step embeds its input (the source reads only the embedding rows it needs), then runs every
layer: the source stages the next layer's non-expert weights on a background thread while this
one computes (kept in memory when the residency budget holds them), may start reading the experts
an early router predicts, and the layer runs (:func:`~kimi_jax.model.step.layer_step`) with the
layer's routed experts from the source. Then the head, and the token is chosen (greedy, or as the
run's decoding says). One device or a mesh, streamed or kept: only the source differs
(:mod:`kimi_jax.model.source`, :mod:`kimi_jax.model.placement`). When the source holds every weight
and the KV cache is on, a decode step is the same loop traced once
(:func:`~kimi_jax.model.step.whole_model_step`).

Capture values come back from the same jitted calls whether or not they are kept; a bare run
never fetches them. Each layer's and step's record is built once, after the step, when its byte
counts are known.
"""

from __future__ import annotations

import contextlib
import functools
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kimi_jax.errors import ResumeError
from kimi_jax.model import layers
from kimi_jax.model.jax_setup import long_lived_frozen
from kimi_jax.model.source import LocalSource, WeightSource
from kimi_jax.model.step import layer_step, whole_model_step
from kimi_jax.model.weights import DTYPES, WeightPolicy
from kimi_jax.records import ByteCounts, LayerRecord, StepRecord
from kimi_jax.settings import EXACT
from kimi_jax.storage.checkpoint import CheckpointIndex
from kimi_jax.storage.reader import ShardReader, return_freed_buffers
from kimi_jax.storage.residency import ResidencyPlan, plan_residency

# Called after each layer with (step, layer, bytes read so far this step): progress display.
OnLayer = Callable[[int, int, int], None]


class LayerOutput(NamedTuple):
    """What one layer produced in one step, before its bytes are counted."""

    routing: layers.Routing | None  # None for a dense layer
    capture: dict
    read_s: float  # getting its weights (the non-expert ones and the experts)
    compute_s: float


def _joined(chunks: list[list[LayerOutput]]) -> list[LayerOutput]:
    """Each layer's outputs over the passes of a chunked prompt: the routing of every position in
    order, the capture of the last pass (the step's last position) with every row's norms, the
    times summed."""
    if len(chunks) == 1:
        return chunks[0]
    joined = []
    for outs in zip(*chunks):
        routing = None if outs[0].routing is None else layers.Routing(*(jnp.concatenate(parts)
                                                                        for parts in zip(*(o.routing for o in outs))))
        capture = {**outs[-1].capture, **{k: jnp.concatenate([o.capture[k] for o in outs])
                                           for k in ("norms_in", "norms_out")}}  # fmt: skip
        joined.append(LayerOutput(routing, capture, sum(o.read_s for o in outs), sum(o.compute_s for o in outs)))
    return joined


def make_source(index: CheckpointIndex, reader: ShardReader, residency: ResidencyPlan, expert_cache: str,
                policy: WeightPolicy, dtype, speculate: bool, mesh=None) -> WeightSource:  # fmt: skip
    """The weights' source for one device, or for the mesh ``mesh`` (a :class:`~kimi_jax.model.mesh.MeshShape`)."""
    if mesh is None:
        return LocalSource(index, reader, residency, expert_cache, policy, dtype, speculate)
    from kimi_jax.model.placement import make_placement  # builds a device mesh: only for a mesh run

    return make_placement(index, mesh, reader, residency, policy, dtype)


class Engine:
    """Runs one checkpoint. ``generate`` decodes tokens; see :class:`StepRecord`.

    With ``mesh`` (a :class:`~kimi_jax.model.mesh.MeshShape`) the same layer functions run on a
    device mesh: the weights come from a placement that reads only this process's share, and byte
    counts are gathered from every process."""

    def __init__(self, index: CheckpointIndex, dtype: str = "float32", prefetch: bool = True, io_retries: int = 3,
                 keep_capture: bool = True, reader: ShardReader | None = None, dequant: str = EXACT,
                 matmul: str = "widened", residency: ResidencyPlan | None = None, expert_cache: str = "lru",
                 speculate: bool = False, mesh=None, prefill_chunk: int | None = None):  # fmt: skip
        """``dequant`` is compute.dequant, ``matmul`` compute.matmul; ``prefill_chunk`` (with the KV
        cache) runs a prompt longer than it in passes of that many positions; ``residency``
        (:func:`~kimi_jax.storage.residency.plan_residency`, default: keep nothing) says what stays in
        memory and whether ranges read leave the page cache, ``expert_cache`` is the policy of the
        expert cache within it, and ``speculate`` reads the experts an early router predicts ahead."""
        self.index, self.cfg, self.keep_capture, self.prefetch = index, index.config, keep_capture, prefetch
        self.prefill_chunk = prefill_chunk
        self.dtype = DTYPES[dtype]
        # A given reader (remote, digest-checked) replaces the plain local one; the engine only calls its interface.
        self.reader = reader if reader is not None else ShardReader(retries=io_retries)
        residency = residency if residency is not None else plan_residency(index, 0)
        self.reader.drop_after_read = residency.drop_page_cache
        if self.reader.drop_after_read:
            return_freed_buffers()  # a checkpoint larger than memory: freed read buffers go back at once
        self.policy = WeightPolicy(dequant, matmul)
        self.source: WeightSource = make_source(index, self.reader, residency, expert_cache, self.policy, self.dtype,
                                                speculate, mesh)  # fmt: skip
        self.mesh = self.source.mesh
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kimi-jax-prefetch")

    @classmethod
    def from_plan(cls, plan: Any, keep_capture: bool = True) -> "Engine":
        """The engine a plan describes: its checkpoint, with the manifest's compute and storage settings
        and the plan's resolved ``residency``.

        ``plan`` is a run plan or a vindex plan: anything with ``index``, ``manifest`` and
        ``residency``; a run plan's ``source`` (remote, digest-checked) supplies the reader; without
        one, shards are read locally."""
        m = plan.manifest
        source = getattr(plan, "source", None)
        reader = source.reader(m.storage.io_retries) if source is not None else None
        return cls(plan.index, m.compute.dtype, m.storage.prefetch, m.storage.io_retries, keep_capture=keep_capture,
                   reader=reader, dequant=m.compute.dequant, matmul=m.compute.matmul, residency=plan.residency,
                   expert_cache=m.storage.expert_cache, speculate=m.storage.speculate,
                   mesh=getattr(plan, "mesh", None), prefill_chunk=m.generate.prefill_chunk)  # fmt: skip

    @property
    def load_bytes_per_process(self) -> list[int] | None:
        """What each process read before step 0 (a resident mesh placement), else None."""
        return self.source.load_bytes_per_process

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.source.close()
        self.reader.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- one forward pass --------------------------------------------------------------------

    def _submit(self, stage: Callable, *args) -> Future:
        """``stage(*args)`` and its seconds, on the prefetch thread (or now, without prefetch)."""

        def timed():
            started = time.perf_counter()
            return stage(*args), time.perf_counter() - started

        if self.prefetch:
            return self._pool.submit(timed)
        done: Future = Future()
        done.set_result(timed())
        return done

    def forward(self, tokens: list[int], positions: np.ndarray, caches: list | None,
                on_layer: Callable[[int, int], None] | None = None, every_row: bool | None = None,
                head: bool = True, rows: list | None = None):  # fmt: skip
        """Run ``tokens`` at ``positions`` through every layer; returns (hidden, logits, [LayerOutput],
        caches): the hidden state and logits at the last position, or at every row with ``every_row``
        (the default when the caches are :class:`~kimi_jax.model.layers.BatchedLatentCache`, each row
        a sequence's next token). ``on_layer(layer, bytes read so far this step)`` is called after each layer.
        Without ``head`` the head is neither read nor run (logits None): a prompt's chunk before its last.
        ``rows`` (one device) gets every row's hidden state as well, whatever ``every_row`` says: the
        same computation, kept (a multi-token-prediction layer drafts from every prompt row)."""
        cfg, source = self.cfg, self.source
        x = source.embed(tokens)
        pos = jnp.asarray(positions, dtype=jnp.int32)
        if every_row is None:
            every_row = bool(caches) and isinstance(caches[0], layers.BatchedLatentCache)
        if caches is not None and source.fused_ready() and rows is None:
            return self._forward_fused(x, pos, caches, on_layer, every_row)
        outputs: list[LayerOutput] = []
        new_caches = [] if caches is not None else None
        pending = self._submit(source.stage_layer, 0)
        for layer in range(cfg.num_hidden_layers):
            staged, read_s = pending.result()
            if layer + 1 < cfg.num_hidden_layers:
                pending = self._submit(source.stage_layer, layer + 1)
            elif head:
                pending = self._submit(source.stage_head)
            params = source.assemble(staged)
            experts = source.experts(layer)
            if experts is not None:
                experts.read_ahead(params, x)
            started = time.perf_counter()
            x, cache, routing, capture = layer_step(cfg, params, x, pos, caches[layer] if caches else None, experts)
            x.block_until_ready()
            fetch_s = experts.seconds if experts is not None else 0.0
            compute_s = time.perf_counter() - started - fetch_s
            if experts is not None:
                experts.done(routing)
            if new_caches is not None:
                new_caches.append(cache)
            outputs.append(LayerOutput(routing, capture, read_s + fetch_s, compute_s))
            del params
            if on_layer:
                on_layer(layer, source.bytes_so_far())
        hidden = x if every_row else x[-1]
        if rows is not None:
            rows.append(np.asarray(x))
        logits = np.asarray(source.logits(source.assemble(pending.result()[0]), hidden)) if head else None
        hidden, new_caches = source.gather(hidden, new_caches)
        return np.asarray(hidden), logits, outputs, new_caches

    def _forward_fused(self, x: jax.Array, pos: jax.Array, caches: list, on_layer: Callable[[int, int], None] | None,
                       every_row: bool = False):  # fmt: skip
        """:meth:`forward` as one program for the layers and one for the head: the weights are taken
        from memory (and counted as used), the programs run, and the picks returned give each layer's
        expert bytes. Layers are not timed apart: the program's time is the step's."""
        bases, stacks, head = self.source.fused_weights()
        hidden, caches, routings, captures = whole_model_step(self.cfg, bases, stacks, x, pos, tuple(caches),
                                                              every_row=every_row)  # fmt: skip
        logits = self.source.logits(head, hidden)
        # One transfer for every layer's picks (and the capture, when kept) instead of one per array. A
        # bare run fetches only the picks, which the byte accounting needs, as the layer-by-layer run does.
        if self.keep_capture:
            routings, captures = jax.device_get((routings, captures))
        else:
            picks = jax.device_get([None if r is None else r.idx for r in routings])
            routings = [None if r is None else r._replace(idx=idx) for r, idx in zip(routings, picks)]
        outputs = []
        for layer, (routing, capture) in enumerate(zip(routings, captures)):
            if routing is not None:
                self.source.count_fused(layer, routing.idx)
            outputs.append(LayerOutput(routing, capture, 0.0, 0.0))
            if on_layer:
                on_layer(layer, self.source.bytes_so_far())
        return np.asarray(hidden), logits, outputs, list(caches)

    def layer_record(self, layer: int, out: LayerOutput, io: ByteCounts, per_process: dict | None,
                     row: int | None = None) -> LayerRecord:  # fmt: skip
        """The record of one layer of a step; with ``row``, of the sequence at that row of a batch. A
        bare run leaves the capture arrays on the device: same programs, nothing fetched."""
        keep, routing, capture = self.keep_capture, out.routing, out.capture
        norm_in, norm_out = ((capture["norm_in"], capture["norm_out"]) if row is None
                             else (capture["norms_in"][row], capture["norms_out"][row])) if keep else (None, None)
        rows = slice(None) if row is None else slice(row, row + 1)
        return LayerRecord(
            layer=layer, kind=self.index.layers[layer].kind,
            norm_in=float(norm_in) if keep else None, norm_out=float(norm_out) if keep else None,
            experts=np.asarray(routing.idx)[rows].tolist() if keep and routing else None,
            routing_weights=np.asarray(routing.weights_norm)[rows].tolist() if keep and routing else None,
            router_scores=np.asarray(routing.scores)[rows].tolist() if keep and routing else None,
            bytes_read=io.used, read_s=out.read_s, compute_s=out.compute_s, io=io,
            bytes_per_process=None if per_process is None else per_process.get(layer),
        )  # fmt: skip

    # -- generation --------------------------------------------------------------------------

    def empty_caches(self, prompt_len: int, max_new_tokens: int) -> list:
        return layers.LatentCache.for_run(self.cfg, prompt_len + max_new_tokens, self.dtype)

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
                raise ResumeError("resuming a kv_cache run needs the caches of its last completed step")
            caches = self.empty_caches(len(prompt), max_new_tokens)
        caches = caches if kv_cache else None
        with long_lived_frozen() as freeze:
            for step in range(len(steps), max_new_tokens):
                if step > 0:
                    freeze()  # once: what the first step built (weights kept, programs, the index) is long-lived
                record, caches = self.step(step, context, kv_cache and step > 0, caches, on_layer, decoding)
                steps.append(record)
                if on_step:
                    on_step(record)
                context.append(record.token)
                if decoding is not None and decoding.stop_reason([s.token for s in steps]):
                    break
        return steps

    def step(self, step: int, context: list[int], decode_one: bool, caches: list | None,
             on_layer: OnLayer | None, decoding, rows: list | None = None) -> tuple[StepRecord, list | None]:  # fmt: skip
        """One step: the whole context (the prompt, or full recompute) or only its last token (KV cache);
        ``rows`` gets every row's hidden state, chunk by chunk (see :meth:`forward`)."""
        started = time.perf_counter()
        self.source.begin_step()
        if decode_one:
            tokens, positions = [context[-1]], np.array([len(context) - 1])
        else:
            tokens, positions = list(context), np.arange(len(context))
        step_on_layer = functools.partial(on_layer, step) if on_layer else None
        chunk = self.prefill_chunk if caches is not None and self.prefill_chunk else len(tokens)
        with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
            passes = []
            for start in range(0, len(tokens), chunk):  # a long prompt: one pass per chunk of positions
                *result, caches = self.forward(tokens[start : start + chunk], positions[start : start + chunk], caches,
                                               step_on_layer, head=start + chunk >= len(tokens), rows=rows)  # fmt: skip
                passes.append(result)
        hidden, logits, outputs = passes[-1][0], passes[-1][1], _joined([p[2] for p in passes])
        by_layer, per_process, counters = self.source.end_step(tokens)
        layer_records = [self.layer_record(i, out, by_layer.get(i, ByteCounts()), per_process)
                         for i, out in enumerate(outputs)]  # fmt: skip
        io = ByteCounts.total(by_layer.values())
        # the first maximum: ties go to the lowest id
        token = int(np.argmax(logits)) if decoding is None else decoding.choose(step, logits)
        record = StepRecord(
            index=step, context=list(context), token=token, logit=float(logits[token]), logits=logits, hidden=hidden,
            layers=layer_records, bytes_read=io.used, bytes_per_layer={k: v.used for k, v in by_layer.items()},
            wall_s=time.perf_counter() - started, caches=caches, storage=counters.content(), io=io,
            bytes_per_process=None if per_process is None else [sum(c) for c in zip(*per_process.values())],
        )  # fmt: skip
        return record, caches


__all__ = ["Engine", "OnLayer", "LayerOutput", "make_source"]
