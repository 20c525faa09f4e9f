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
class RunPlan:
    manifest: Manifest
    index: CheckpointIndex
    prompt: tuple[int, ...]
    source: CheckpointSource | None = None  # how the bytes are read: local or remote, digest-checked or not
    tokenizer: Tokenizer | None = None  # None: the checkpoint ships none
    prompt_text: str | None = None  # what the prompt ids encode: prompt.text, or the rendered chat
    decoding: Decoding = Decoding()
    # What stays in memory and whether ranges read leave the page cache: the manifest's budget and
    # page-cache choice resolved once (``auto`` measures memory), so every run of the plan agrees.
    residency: ResidencyPlan | None = None

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
    try:
        tokenizer = load_tokenizer(index.root, index.config.vocab_size)  # a remote checkpoint's are mirrored there
        prompt, prompt_text = _prompt_tokens(manifest, index, tokenizer)
    except (TokenizerError, ManifestError) as e:
        raise e if index.source is None else relocated(e, index.root, index.source) from None
    problems = prompt_problems(manifest, index.config, prompt, manifest.generate.max_new_tokens)
    if manifest.generate.stop is not None and tokenizer is None:
        problems.append(manifest.error("generate.stop", f"stop strings need the generated text, but the checkpoint "
                                                        f"{index.location} ships no tokenizer"))  # fmt: skip
    if problems:
        raise ManifestError("\n".join(str(p) for p in problems))
    residency = budget_plan(index, storage.resident_bytes, storage.page_cache, len(prompt) + manifest.generate.max_new_tokens)
    return RunPlan(manifest, index, tuple(prompt), source, tokenizer, prompt_text, _decoding(manifest, index, tokenizer),
                   residency)  # fmt: skip


def replan(base: RunPlan, manifest: Manifest) -> RunPlan:
    """The plan of ``manifest`` (another prompt and generation, the same checkpoint, compute and
    storage as ``base``'s) on ``base``'s opened checkpoint, tokenizer and residency budget: what the
    server does for each request, checked as :func:`prepare_run` checks a run, without opening the
    checkpoint again."""
    index, tokenizer = base.index, base.tokenizer
    prompt, prompt_text = _prompt_tokens(manifest, index, tokenizer)
    problems = prompt_problems(manifest, index.config, prompt, manifest.generate.max_new_tokens)
    if problems:
        raise ManifestError("\n".join(str(p) for p in problems))
    return dataclasses.replace(base, manifest=manifest, prompt=tuple(prompt), prompt_text=prompt_text,
                               decoding=_decoding(manifest, index, tokenizer))  # fmt: skip


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


def _prompt_tokens(manifest: Manifest, index: CheckpointIndex, tokenizer: Tokenizer | None) -> tuple[list[int], str | None]:
    """The prompt's token ids, and the text they encode (None for a prompt given as ids)."""
    prompt = manifest.prompt
    if prompt.tokens is not None:
        return list(prompt.tokens), None
    field = "prompt.text" if prompt.text is not None else "prompt.chat"
    if tokenizer is None:
        raise manifest.error(field, f"the checkpoint {index.location} ships no tokenizer (tiktoken.model or "
                                    "tokenizer.json); give the prompt as prompt.tokens")  # fmt: skip
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


def _decoding(manifest: Manifest, index: CheckpointIndex, tokenizer: Tokenizer | None) -> Decoding:
    """Token choice and stop rules: EOS (config.json and the tokenizer) and, for chat prompts, the
    template's end-of-turn token (neither with ``ignore_eos``); stop strings."""
    gen = manifest.generate
    stop: list[tuple[int, str]] = []
    if not gen.ignore_eos:
        eos = {index.config.eos_token_id, tokenizer.named_token("eos_token") if tokenizer else None}
        stop += [(t, "eos") for t in sorted(t for t in eos if t is not None)]
    if manifest.prompt.chat is not None and tokenizer is not None and not gen.ignore_eos:
        end = end_of_turn_token(tokenizer, manifest.prompt.chat_template_kwargs)
        if end is not None and end not in [t for t, _ in stop]:
            stop.append((end, "end_of_turn"))
    sampling = Sampling(**gen.sampling.model_dump()) if gen.sampling is not None else None
    return Decoding(sampling, tuple(stop), tuple(gen.stop or ()), tokenizer)


def load_plan(manifest_path: str, overrides: list[str] | None = None, out_dir: str | None = None) -> RunPlan:
    return prepare_run(load_manifest(manifest_path, overrides or [], out_dir))
