"""Drafts from the checkpoint's multi-token-prediction layer (DeepSeek-V3's MTP module).

DeepSeek-V3 ships, after its decoder layers, one more layer trained to predict the token after
next. For position i it takes the main model's hidden state h_i (after the final norm) and the
embedding of the token at i + 1:

    x_i = eh_proj([enorm(embed(t_{i+1})); hnorm(norm(h_i))])

runs one decoder layer (attention with its own latent cache, at position i; a MoE feed-forward with
its own routed experts), and its head (``shared_head.norm``, ``shared_head.head``) gives logits for
t_{i+2}. The concatenation order and the norms follow vLLM's and SGLang's DeepSeek MTP modules; its
embedding and head are the layer's own copies (DeepSeek-V3's equal the main model's).

The layer's cache needs every earlier position, so the drafter sees every row the main model
computed: the prompt's rows after step 0 (:meth:`Engine.step` ``rows``), the accepted rows of each
verification pass. A draft of n tokens chains the layer on its own output (vLLM's way with one MTP
layer): row i + 1 takes the layer's raw output at row i and the token just drafted. Those chained
rows are overwritten by the true ones once the main model has verified them, as rejected drafts'
rows are in the main cache (a position is written before any row attends to it).

Drafts change no token (verification is lossless, :mod:`kimi_jax.model.drafts`); they change only
how many tokens a pass makes. What drafting costs is counted as a step of its own source: the layer's
non-expert weights, its inputs and its head are kept after the first read; its routed experts
stream, or are kept with the run's when its budget keeps every expert.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from kimi_jax.config import ModelConfig
from kimi_jax.errors import CheckpointError
from kimi_jax.model.drafts import DraftCost
from kimi_jax.model.layers import LatentCache, linear, rms_norm
from kimi_jax.model.params import MTPInputParams
from kimi_jax.model.source import LocalSource
from kimi_jax.model.step import layer_step
from kimi_jax.records import ByteCounts
from kimi_jax.storage.checkpoint import LayerMap
from kimi_jax.storage.residency import ResidencyPlan


@functools.partial(jax.jit, static_argnums=(0, 4))
def mtp_input(cfg: ModelConfig, p: MTPInputParams, embedded: jax.Array, hidden: jax.Array, from_model: bool):
    """The MTP layer's input rows: ``eh_proj([enorm(embedded); hnorm(hidden)])``, where ``hidden`` is
    the main model's (normed first with its final norm, ``from_model``) or the MTP layer's own output."""
    eps = cfg.rms_norm_eps
    hidden = rms_norm(hidden, p.norm, eps) if from_model else hidden
    joined = jnp.concatenate([rms_norm(embedded, p.enorm, eps), rms_norm(hidden, p.hnorm, eps)], axis=-1)
    return linear(joined, p.eh_proj)


class MTPDrafter:
    """Drafts for one sequence of ``engine``'s run (one device) from its checkpoint's MTP layer;
    ``capacity``: the positions the run can reach (prompt, tokens to generate, drafts)."""

    wants_rows = True  # the main model's hidden state at every row it computes

    def __init__(self, engine, capacity: int):
        index, mtp = engine.index, engine.index.mtp
        if mtp is None:
            raise CheckpointError(f"{index.location}: no multi-token-prediction layer to draft from")
        self.cfg, self.layer, self.dtype = index.config, mtp.layer.index, engine.dtype
        # An index of the MTP layer alone at its own number: its embedding and head in the head's roles.
        placeholders = tuple(LayerMap(i, "dense", {}, ()) for i in range(self.layer))
        own = dataclasses.replace(index, weights={"embed_tokens.weight": mtp.embed, **mtp.head},
                                  layers=(*placeholders, mtp.layer), mtp=None)  # fmt: skip
        every_expert = sum(mtp.layer.expert_bytes(e) for e in range(len(mtp.layer.experts)))
        keep_experts = every_expert if getattr(engine.source, "experts_kept", False) else 0
        plan = ResidencyPlan(budget=mtp.layer.base_bytes + sum(w.nbytes for w in mtp.head.values()) + keep_experts,
                             layers=frozenset({self.layer}), head=True, expert_capacity=keep_experts,
                             drop_page_cache=engine.reader.drop_after_read)  # fmt: skip
        self.source = LocalSource(own, engine.reader, plan, "lru", engine.policy, engine.dtype)
        # the parameters of mtp_input by role: the main model's final norm, and the layer's inputs
        self.inputs = {"norm": index.weights["norm.weight"],
                       **{role: mtp.inputs[f"layers.{self.layer}.{role}.weight"] for role in ("enorm", "hnorm", "eh_proj")}}  # fmt: skip
        self.cache = LatentCache.empty(self.cfg, capacity, engine.dtype)
        self._rows: list[tuple[int, np.ndarray, int]] = []  # (position, main hidden, next token) not yet run
        self.last_logits: list[np.ndarray] = []  # the MTP head's logits behind each draft of the last proposal

    def close(self) -> None:
        self.source.close()

    def observe(self, start: int, hidden: np.ndarray, next_tokens: list[int]) -> None:
        """The main model's hidden states at positions ``start``, ``start + 1``, ... and the token that
        followed each (verified): rows of the MTP cache, run with the next proposal."""
        self._rows += [(start + i, hidden[i], int(t)) for i, t in enumerate(next_tokens)]

    def propose(self, context: list[int], n: int) -> tuple[list[int], DraftCost | None]:
        """Up to ``n`` drafted tokens after ``context`` (greedy over the MTP head), and their cost."""
        if n <= 0 or not self._rows:
            return [], None
        started = time.perf_counter()
        src, cfg = self.source, self.cfg
        src.begin_step()
        named = src.store.kept("mtp-inputs", list(self.inputs.values()), self.layer)
        p = MTPInputParams(**{role: named[w.name] for role, w in self.inputs.items()})
        base, head = src.assemble(src.stage_layer(self.layer)), src.stage_head()
        positions = [r[0] for r in self._rows]
        x = mtp_input(cfg, p, src.embed([r[2] for r in self._rows]),
                      jnp.asarray(np.stack([r[1] for r in self._rows])).astype(self.dtype), True)  # fmt: skip
        drafts: list[int] = []
        self.last_logits = []
        passes, at = 0, positions[-1]
        tokens = [r[2] for r in self._rows]
        while True:
            experts = src.experts(self.layer)
            x, self.cache, routing, _ = layer_step(cfg, base, x, jnp.asarray(positions, jnp.int32), self.cache, experts)
            if experts is not None:
                experts.done(routing)
            passes += 1
            self.last_logits.append(src.logits(head, x[-1]))
            drafts.append(int(np.argmax(self.last_logits[-1])))
            if len(drafts) == n:
                break
            at += 1
            positions = [at]
            tokens.append(drafts[-1])
            x = mtp_input(cfg, p, src.embed([drafts[-1]]), x[-1:], False)
        self._rows = []
        by_layer, _, _ = src.end_step(tokens)
        return drafts, DraftCost(passes, ByteCounts.total(by_layer.values()), time.perf_counter() - started)


__all__ = ["mtp_input", "MTPDrafter"]
