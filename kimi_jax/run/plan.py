"""From a manifest to a validated run plan: everything that can be wrong is found before compute."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from kimi_jax.config import ModelConfig
from kimi_jax.errors import CheckpointError, ManifestError, TokenizerError
from kimi_jax.fileio import write_failure
from kimi_jax.manifest import Manifest, load_manifest
from kimi_jax.platform_info import mesh_label
from kimi_jax.storage.checkpoint import CheckpointIndex
from kimi_jax.storage.digests import DigestFileError
from kimi_jax.storage.remote import RemoteSettings, relocated
from kimi_jax.storage.residency import ResidencyPlan, budget_plan
from kimi_jax.storage.source import CheckpointSource, open_source
from kimi_jax.storage.synth import ensure_synthetic
from kimi_jax.text.chat import end_of_turn_token, render_chat
from kimi_jax.text.decoding import Decoding
from kimi_jax.text.sampling import Sampling
from kimi_jax.text.tokenizer import Tokenizer, load_tokenizer


@dataclasses.dataclass(frozen=True)
class PlannedSequence:
    """One prompt of a ``prompts:`` run: its ids, the text they encode and how its tokens are chosen."""

    prompt: tuple[int, ...]
    prompt_text: str | None
    decoding: Decoding
    field: str  # where the manifest gives it: prompts.N


@dataclasses.dataclass(frozen=True)
class RunPlan:
    manifest: Manifest
    index: CheckpointIndex
    prompt: tuple[int, ...]
    source: CheckpointSource | None = None  # how the bytes are read: local or remote, digest-checked or not
    tokenizer: Tokenizer | None = None  # None: the checkpoint ships none
    prompt_text: str | None = None  # what the prompt ids encode: prompt.text, or the rendered chat
    decoding: Decoding = Decoding()
    # A prompts: run's sequences, in the manifest's order (sequence 0 is also prompt, prompt_text
    # and decoding above: the anchor step); empty for a one-prompt run.
    sequences: tuple[PlannedSequence, ...] = ()
    # What stays in memory and whether ranges read leave the page cache: the manifest's budget and
    # page-cache choice resolved once (``auto`` measures memory), so every run of the plan agrees.
    residency: ResidencyPlan | None = None

    @property
    def shares_passes(self) -> bool:
        """Its tokens are made in shared passes over the weights (prompts:, generate.drafts), which a
        version-3 ledger records (kimi_jax.run.sequences)."""
        return bool(self.sequences) or self.manifest.generate.drafts is not None

    @property
    def mesh(self):
        """The manifest's ``compute.mesh`` as a :class:`~kimi_jax.model.mesh.MeshShape`, or None for one device."""
        from kimi_jax.model.mesh import MeshShape  # imports JAX; a plan is also read without it

        section = self.manifest.compute.mesh
        return None if section is None else MeshShape(section.expert, section.model, section.placement)

    @property
    def kernels(self) -> dict | None:
        """For ``compute.matmul: kernels``: the CPU kernels' set and instruction set, or why they are
        unavailable (the XLA products then run); None for the other products."""
        if self.manifest.compute.matmul != "kernels":
            return None
        from kimi_jax.model.kernels import run_record  # loads the compiled library

        return run_record()

    @property
    def kernels_label(self) -> str | None:
        """The kernels that ran, as the platform fingerprint names them (they can change bits)."""
        k = self.kernels
        return f"{k['kernel_set']} {k['isa']}" if k and k["kernel_set"] else None

    @property
    def mesh_label(self) -> str | None:
        """The mesh as the platform fingerprint names it, or None for one device."""
        section = self.manifest.compute.mesh
        return None if section is None else mesh_label(section.expert, section.model, section.placement)


def resolve_checkpoint(manifest: Manifest) -> Path | str:
    model = manifest.model
    if model.checkpoint is not None:
        return model.checkpoint if isinstance(model.checkpoint, str) else Path(model.checkpoint)
    syn = model.synthetic
    return ensure_synthetic(syn.preset, layout=syn.layout, seed=syn.seed, cache_dir=model.cache_dir)


def prepare_run(manifest: Manifest) -> RunPlan:
    """Open the checkpoint and check the manifest against it; raise before any compute."""
    where = "model.checkpoint" if manifest.model.checkpoint is not None else "model.synthetic"
    storage = manifest.storage
    try:
        source = open_source(resolve_checkpoint(manifest), manifest.model.cache_dir, storage.verify_digests,
                             storage.digest_file, remote_settings(manifest))  # fmt: skip
    except DigestFileError as e:  # the manifest's field only when the manifest named the file
        raise manifest.error("storage.digest_file" if storage.digest_file is not None else where, str(e)) from None
    except CheckpointError as e:
        raise manifest.error(where, str(e)) from None
    except OSError as e:  # generating a synthetic checkpoint into the cache failed
        if write_failure(e) is None:
            raise
        raise manifest.error(where, f"cannot write the synthetic checkpoint into {manifest.model.cache_dir}: "
                                    f"{write_failure(e)}; set model.cache_dir or $KIMI_JAX_CACHE to a writable "
                                    "folder") from None  # fmt: skip
    index = source.index
    entries = [("prompt", manifest.prompt)] if manifest.prompts is None else \
        [(f"prompts.{i}", p) for i, p in enumerate(manifest.prompts)]  # fmt: skip
    try:
        tokenizer = load_tokenizer(index.root, index.config.vocab_size)  # a remote checkpoint's are mirrored there
        prompts = [_prompt_tokens(manifest, field, section, index, tokenizer) for field, section in entries]
    except (TokenizerError, ManifestError) as e:
        raise e if index.source is None else relocated(e, index.root, index.source) from None
    problems = [p for (field, _), (prompt, _) in zip(entries, prompts)
                for p in prompt_problems(manifest, index.config, prompt, manifest.generate.max_new_tokens,
                                         name=field, tokens_field=f"{field}.tokens")]  # fmt: skip
    problems += [manifest.error(field, f"stop strings need the generated text, but the checkpoint {index.location} "
                                       "ships no tokenizer")
                 for field, given in [("generate.stop", manifest.generate.stop)] +
                 [(f"{f}.stop", getattr(p, "stop", None)) for f, p in entries] if given is not None and tokenizer is None]  # fmt: skip
    problems += _batch_problems(manifest, entries) + _mtp_problems(manifest, index)
    if problems:
        raise ManifestError("\n".join(str(p) for p in problems))
    longest = max(len(prompt) for prompt, _ in prompts)
    # a pass holds the longest prompt (or a chunk of it), or a token and its drafts of every sequence
    drafts = manifest.generate.drafts.tokens if manifest.generate.drafts else 0
    rows = max(min(longest, manifest.generate.prefill_chunk or longest), len(prompts) * (1 + drafts))
    residency = budget_plan(index, storage.resident_bytes, storage.page_cache, longest + manifest.generate.max_new_tokens,
                            rows, len(prompts))  # fmt: skip
    sequences = [PlannedSequence(tuple(prompt), text, _decoding(manifest, index, tokenizer, section), field)
                 for (field, section), (prompt, text) in zip(entries, prompts)]  # fmt: skip
    first = sequences[0]
    return RunPlan(manifest, index, first.prompt, source, tokenizer, first.prompt_text, first.decoding,
                   tuple(sequences) if manifest.prompts is not None else (), residency)  # fmt: skip


def _batch_problems(manifest: Manifest, entries: list) -> list[ManifestError]:
    """What a run of shared passes (prompts:, generate.drafts) cannot do: its rows decode together
    from their latent caches on one device; a per-sequence seed replaces the sampling seed, which
    needs sampling; drafts verify one sequence's tokens."""
    gen = manifest.generate
    if manifest.prompts is None and gen.drafts is None:
        return []
    what = "prompts decode" if manifest.prompts is not None else "drafts are verified"
    problems = [manifest.error(f"{field}.seed", "a sequence's seed replaces generate.sampling.seed; set "
                                                "generate.sampling (absent: greedy, which draws nothing)")
                for field, p in entries if getattr(p, "seed", None) is not None and gen.sampling is None]  # fmt: skip
    if manifest.prompts is not None and gen.drafts is not None:
        problems.append(manifest.error("generate.drafts", "drafts verify one sequence's tokens; a prompts: run decodes "
                                                          "several without drafts (remove one of the two)"))  # fmt: skip
    if not gen.kv_cache:
        problems.append(manifest.error("generate.kv_cache", f"{what} together from the latent caches; set "
                                                            "generate.kv_cache: true"))  # fmt: skip
    if manifest.distributed is not None:  # a mesh of one process's devices serves them (check_mesh)
        problems.append(manifest.error("distributed", f"{what} in one process (prompts: and generate.drafts: any "
                                                      "mesh of its devices); run them without distributed:"))  # fmt: skip
    return problems


def _mtp_problems(manifest: Manifest, index) -> list[ManifestError]:
    """Drafts from a multi-token-prediction layer need the checkpoint to ship a whole one, and one
    device (the layer's experts are read by the process that drafts)."""
    drafts = manifest.generate.drafts
    if drafts is None or drafts.method != "mtp":
        return []
    problems = []
    if index.mtp is None:
        why = next((reason for _, reason in index.skipped if "cannot draft" in reason), None)
        problems.append(manifest.error("generate.drafts.method", f"mtp drafts from the checkpoint's multi-token-"
                                       f"prediction layer, but {index.location} "
                                       + (f"has an unusable one: {why}" if why else "ships none (DeepSeek-V3 ships one as "
                                          f"layers.{index.config.num_hidden_layers}; Kimi K2.5 ships none)")
                                       + "; use method: prompt-lookup"))  # fmt: skip
    if manifest.compute.mesh is not None:
        problems.append(manifest.error("generate.drafts.method", "mtp drafts run on one device; remove compute.mesh "
                                       "or use method: prompt-lookup"))  # fmt: skip
    return problems


def replan(base: RunPlan, manifest: Manifest) -> RunPlan:
    """The plan of ``manifest`` (another prompt and generation, the same checkpoint, compute and
    storage as ``base``'s) on ``base``'s opened checkpoint, tokenizer and residency budget: what the
    server does for each request, checked as :func:`prepare_run` checks a run, without opening the
    checkpoint again."""
    index, tokenizer = base.index, base.tokenizer
    if manifest.prompts is not None or manifest.generate.drafts is not None:
        raise ManifestError("a request is one prompt decoded without drafts (prompts: and generate.drafts are a "
                            "run's)")  # fmt: skip
    prompt, prompt_text = _prompt_tokens(manifest, "prompt", manifest.prompt, index, tokenizer)
    problems = prompt_problems(manifest, index.config, prompt, manifest.generate.max_new_tokens)
    if problems:
        raise ManifestError("\n".join(str(p) for p in problems))
    return dataclasses.replace(base, manifest=manifest, prompt=tuple(prompt), prompt_text=prompt_text,
                               decoding=_decoding(manifest, index, tokenizer, manifest.prompt), sequences=())  # fmt: skip


def remote_settings(manifest: Manifest) -> RemoteSettings:
    r, storage = manifest.storage.remote, manifest.storage
    if r is None:
        return RemoteSettings(retries=storage.io_retries)
    return RemoteSettings(max_in_flight=r.max_in_flight, timeout_s=r.timeout_s, retries=storage.io_retries,
                          request_bytes=r.request_mib << 20, cache_dir=Path(manifest.model.cache_dir) / "ranges",
                          cache_bytes=int(r.cache_gib * 2**30))  # fmt: skip


def prompt_problems(manifest: Manifest, cfg: ModelConfig, prompt: Sequence[int], max_new_tokens: int, *,
                    name: str = "prompt", tokens_field: str = "prompt.tokens",
                    length_field: str = "generate.max_new_tokens") -> list[ManifestError]:  # fmt: skip
    """What stops ``prompt`` from being run for ``max_new_tokens`` steps on a model ``cfg``: token
    ids outside the vocabulary (reported at ``tokens_field.I``) and more positions than
    ``max_position_embeddings`` (reported at ``length_field``)."""
    problems = [manifest.error(f"{tokens_field}.{i}", f"token id {token} is outside the vocabulary "
                                                      f"(vocab_size {cfg.vocab_size})")
                for i, token in enumerate(prompt) if token >= cfg.vocab_size]  # fmt: skip
    total = len(prompt) + max_new_tokens
    if total > cfg.max_position_embeddings:
        problems.append(manifest.error(length_field, f"{name} ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) "
                                                     f"= {total} positions exceeds max_position_embeddings "
                                                     f"{cfg.max_position_embeddings}"))  # fmt: skip
    return problems


def _prompt_tokens(manifest: Manifest, where: str, prompt, index: CheckpointIndex,
                   tokenizer: Tokenizer | None) -> tuple[list[int], str | None]:  # fmt: skip
    """The token ids of the prompt section ``prompt`` (at field ``where``), and the text they
    encode (None for a prompt given as ids)."""
    if prompt.tokens is not None:
        return list(prompt.tokens), None
    field = f"{where}.text" if prompt.text is not None else f"{where}.chat"
    if tokenizer is None:
        raise manifest.error(field, f"the checkpoint {index.location} ships no tokenizer (tiktoken.model or "
                                    f"tokenizer.json); give the prompt as {where}.tokens")  # fmt: skip
    try:
        if prompt.text is not None:
            text, ids = prompt.text, tokenizer.encode(prompt.text)
        else:
            messages = [message.model_dump() for message in prompt.chat]  # without the fields not given
            text = render_chat(tokenizer, messages, add_generation_prompt=True,
                               template_kwargs=prompt.chat_template_kwargs, tools=prompt.tools)  # fmt: skip
            ids = tokenizer.encode(text, add_special_tokens=False)
    except TokenizerError as e:
        raise manifest.error(field, str(e)) from None
    if not ids:
        made = "the chat template rendered" if prompt.chat is not None else "the text is"
        raise manifest.error(field, f"{made} {len(text):,} characters that encode to no tokens; a prompt needs at "
                                    "least one token")  # fmt: skip
    return ids, text


def _decoding(manifest: Manifest, index: CheckpointIndex, tokenizer: Tokenizer | None, prompt) -> Decoding:
    """Token choice and stop rules of the prompt section ``prompt``: EOS (config.json and the
    tokenizer) and, for chat prompts, the template's end-of-turn token (neither with
    ``ignore_eos``); stop strings. A ``prompts:`` entry's own seed and stop strings replace the
    generate section's."""
    gen = manifest.generate
    seed, own_stop = getattr(prompt, "seed", None), getattr(prompt, "stop", None)
    stop: list[tuple[int, str]] = []
    if not gen.ignore_eos:
        eos = {index.config.eos_token_id, tokenizer.named_token("eos_token") if tokenizer else None}
        stop += [(t, "eos") for t in sorted(t for t in eos if t is not None)]
    if prompt.chat is not None and tokenizer is not None and not gen.ignore_eos:
        end = end_of_turn_token(tokenizer, prompt.chat_template_kwargs)
        if end is not None and end not in [t for t, _ in stop]:
            stop.append((end, "end_of_turn"))
    settings = None if gen.sampling is None else {**gen.sampling.model_dump(), **({"seed": seed} if seed is not None else {})}
    sampling = Sampling(**settings) if settings is not None else None
    return Decoding(sampling, tuple(stop), tuple(own_stop or gen.stop or ()), tokenizer)


def load_plan(manifest_path: str, overrides: list[str] | None = None, out_dir: str | None = None) -> RunPlan:
    return prepare_run(load_manifest(manifest_path, overrides or [], out_dir))
