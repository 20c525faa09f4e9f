"""The streaming engine: one layer's parameters in memory at a time, only the routed experts read.

For each step the engine embeds the input (reading only the embedding rows it needs), then for
each layer: reads the layer's non-expert weights (already prefetched on a background thread while
the previous layer computed), runs attention and the router, reads the distinct experts any
position picked, runs them, and drops the layer. Then it reads the head and chooses the token
(greedy, or as the run's decoding says). Capture values come back from the same jitted calls
whether or not they are kept.
"""

from __future__ import annotations

import functools
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from kimi_jax.model import layers
from kimi_jax.model.forward import layer_step
from kimi_jax.model.params import ExpertStack, HeadParams, expert_stack, head_params, layer_params
from kimi_jax.model.quant import Fp8Weight, Int4Weight
from kimi_jax.records import LayerRecord, StepRecord
from kimi_jax.storage.codecs import EXACT, check_dequant_mode
from kimi_jax.storage.checkpoint import CheckpointIndex, WeightEntry
from kimi_jax.storage.reader import ReadCounters, ShardReader
from kimi_jax.storage.safetensors_header import TensorRecord

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Rows of the lm_head per logits call: 16384 x 7168 BF16 is 235 MB, 470 MB once widened.
HEAD_CHUNK_ROWS = 16384
# Called after each layer with (step, layer, bytes read so far this step): progress display.
OnLayer = Callable[[int, int, int], None]


def decode_weight(entry: WeightEntry, parts: dict[str, np.ndarray], index: CheckpointIndex,
                  dequant: str = EXACT) -> Any:  # fmt: skip
    """Stored parts -> a plain array or a quantized container that stays packed until the matmul
    and is then dequantized in mode ``dequant`` (see :mod:`kimi_jax.storage.codecs`)."""
    if entry.format == "plain":
        return parts["weight"]
    if entry.format == "int4":
        entry.check_weight_shape(parts)
        return Int4Weight(parts["weight_packed"], parts["weight_scale"], in_features=entry.shape[1],
                          group_size=index.config.quant.group_size, dequant=dequant)  # fmt: skip
    return Fp8Weight(parts["weight"], parts["weight_scale_inv"], block_size=index.config.quant.fp8_block_size,
                     dequant=dequant)  # fmt: skip


class _ExpertReads:
    """``fetch_experts`` for one layer backed by the reader: each distinct expert picked is read once,
    and the time spent reading is kept apart, so a layer's compute time excludes it."""

    def __init__(self, engine: Engine, layer: int):
        self.engine, self.layer, self.seconds = engine, layer, 0.0

    def __call__(self, stack_ids: list[int]) -> ExpertStack:
        started = time.perf_counter()
        experts = self.engine.index.layers[self.layer].experts
        distinct = dict.fromkeys(stack_ids)  # padding repeats an id; order kept: sorted ids first
        loaded = self.engine._read([w for e in distinct for w in experts[e].values()], self.layer)
        stack = expert_stack(self.engine.cfg, self.layer, stack_ids, loaded)
        self.seconds += time.perf_counter() - started
        return stack


class Engine:
    """Streams one checkpoint. ``generate`` decodes tokens; see :class:`StepRecord`."""

    def __init__(self, index: CheckpointIndex, dtype: str = "float32", prefetch: bool = True, io_retries: int = 3,
                 keep_capture: bool = True, reader: ShardReader | None = None, dequant: str = EXACT):  # fmt: skip
        self.index = index
        self.keep_capture = keep_capture
        self.cfg = index.config
        self.dtype = DTYPES[dtype]
        self.dequant = check_dequant_mode(dequant)
        self.prefetch = prefetch
        # A given reader (remote, digest-checked) replaces the plain local one; the engine only calls its interface.
        self.reader = reader if reader is not None else ShardReader(retries=io_retries)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kimi-jax-prefetch")

    @classmethod
    def from_plan(cls, plan: Any, keep_capture: bool = True) -> "Engine":
        """The engine a plan describes: its checkpoint, with the manifest's compute and storage settings.

        ``plan`` is a run plan or a vindex plan: anything with ``index`` and ``manifest``, and a run
        plan's ``source`` (remote, digest-checked) supplies the reader; without one, shards are read locally."""
        m = plan.manifest
        source = getattr(plan, "source", None)
        reader = source.reader(m.storage.io_retries) if source is not None else None
        return cls(plan.index, m.compute.dtype, m.storage.prefetch, m.storage.io_retries, keep_capture=keep_capture,
                   reader=reader, dequant=m.compute.dequant)  # fmt: skip

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.reader.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- loading -----------------------------------------------------------------------------

    def _read(self, entries: list[WeightEntry], layer: int | None) -> dict[str, Any]:
        parts = self.reader.read_weights(entries, layer=layer)
        return {e.name: decode_weight(e, parts[e.name], self.index, self.dequant) for e in entries}

    def _load_base(self, layer: int):
        started = time.perf_counter()
        lm = self.index.layers[layer]
        tensors = self._read(list(lm.base.values()), layer)
        return layer_params(self.cfg, layer, tensors), time.perf_counter() - started

    def _load_head(self):
        started = time.perf_counter()
        tensors = self._read(list(self.index.head.values()), None)
        if "lm_head.weight" not in tensors:  # tied embeddings
            tensors["lm_head.weight"] = tensors["embed_tokens.weight"]
        return head_params(self.cfg, tensors), time.perf_counter() - started

    def _logits(self, head: HeadParams, hidden: jax.Array) -> np.ndarray:
        """Logits in vocabulary chunks: the head (2.3 GB in BF16 for Kimi) is never widened to
        float32 or copied whole; only one chunk at a time is."""
        lm_head = head.lm_head
        vocab = lm_head.shape[0]
        if not isinstance(lm_head, np.ndarray) or vocab <= HEAD_CHUNK_ROWS:
            return np.asarray(layers.final_logits(self.cfg, head, hidden))
        chunks = [layers.final_logits(self.cfg, HeadParams(head.norm, lm_head[i : i + HEAD_CHUNK_ROWS]), hidden)
                  for i in range(0, vocab, HEAD_CHUNK_ROWS)]  # fmt: skip
        return np.concatenate([np.asarray(c) for c in chunks])

    def _embed(self, tokens: list[int]) -> jax.Array:
        """Read only the embedding rows of the distinct tokens in ``tokens``."""
        entry = self.index.embed.parts["weight"]
        row = entry.nbytes // entry.shape[0]
        distinct = sorted(set(tokens))
        records = [TensorRecord(f"{entry.stored_name}[{t}]", entry.shard, entry.offset + t * row, row, entry.dtype,
                                (entry.shape[1],)) for t in distinct]  # fmt: skip
        rows = self.reader.read_records(records, layer=None, labels=[f"embed_tokens.weight[{t}]" for t in distinct])
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
        pending = self._submit(self._load_base, 0)
        records: list[LayerRecord] = []
        new_caches = [] if caches is not None else None
        for layer in range(cfg.num_hidden_layers):
            params, read_s = pending.result()
            is_last = layer + 1 == cfg.num_hidden_layers
            pending = self._submit(self._load_head) if is_last else self._submit(self._load_base, layer + 1)
            cache = caches[layer] if caches is not None else None
            expert_reads = _ExpertReads(self, layer)
            started = time.perf_counter()
            x, cache, routing, capture = layer_step(cfg, params, x, pos, cache, expert_reads)
            x.block_until_ready()
            compute_s = time.perf_counter() - started - expert_reads.seconds
            if new_caches is not None:
                new_caches.append(cache)
            records.append(self._layer_record(layer, routing, capture, read_s + expert_reads.seconds, compute_s))
            del params
            if on_layer:
                on_layer(layer, self.reader.step.total)
        head, _ = pending.result()
        hidden = x[-1]
        logits = self._logits(head, hidden)
        per_layer = self.reader.step.per_layer
        for rec in records:
            rec.bytes_read = per_layer.get(rec.layer, 0)
        return np.asarray(hidden), np.asarray(logits), records, new_caches

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
        for step in range(len(steps), max_new_tokens):
            started = time.perf_counter()
            self.reader.begin_step()
            if kv_cache and step > 0:
                tokens, positions = [context[-1]], np.array([len(context) - 1])
            else:
                tokens, positions = list(context), np.arange(len(context))
            step_on_layer = functools.partial(on_layer, step) if on_layer else None
            hidden, logits, layers, caches = self.forward(tokens, positions, caches, step_on_layer)
            counters: ReadCounters = self.reader.end_step()
            # the first maximum: ties go to the lowest id
            token = int(np.argmax(logits)) if decoding is None else decoding.choose(step, logits)
            record = StepRecord(step, list(context), token, float(logits[token]), logits, hidden, layers,
                                counters.total, dict(counters.per_layer), time.perf_counter() - started, caches,
                                counters.content())  # fmt: skip
            steps.append(record)
            if on_step:
                on_step(record)
            context.append(token)
            if decoding is not None and decoding.stop_reason([s.token for s in steps]):
                break
        return steps
