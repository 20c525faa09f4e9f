"""The declarative YAML run manifest (schema version 1).

A manifest says which checkpoint to stream (a real one on disk, or a synthetic one generated
on first use), how to compute and read it, which prompt to run, what to capture and where to
write the results::

    version: 1
    model:
      checkpoint: ../ckpt/kimi-k2.5      # or: synthetic: {preset: tiny, layout: kimi-k2.5, seed: 0}
    prompt:
      tokens: [163584]
    generate:
      max_new_tokens: 5
    output:
      dir: ../runs/demo

The schema is strict: unknown keys anywhere are errors, and types are not coerced (``"5"`` is
not an integer, ``1`` is not a boolean, ``5.0`` is not an integer). Every problem is reported
as ``FILE:LINE: FIELD: what was wrong and what was expected`` (or ``--set KEY=VALUE: FIELD: ...``
for a value that came from a command-line override), all problems of a manifest at once, in a
single :class:`~kimi_jax.errors.ManifestError`.

Relative paths in the file resolve against the manifest's own folder, ``~`` is expanded, and
the validated :class:`Manifest` holds absolute :class:`pathlib.Path` objects. ``--out``
replaces ``output.dir`` and resolves against the current working directory instead.

YAML is only ever read with PyYAML's ``SafeLoader``: tags such as ``!!python/object`` are
rejected, never executed.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from kimi_jax.errors import ManifestError
from kimi_jax.fileio import default_cache_dir
from kimi_jax.manifest.fields import Effect, added_later, effect_in, neutral, result
from kimi_jax.manifest.identity import identity_of, manifest_digest
from kimi_jax.manifest.origins import MANIFEST_VERSION, Origins, describe_value, split_field
from kimi_jax.settings import (
    AUTO,
    DEQUANT_MODES,
    MATMUL_MODES,
    ExpertPolicy,
    PageCacheMode,
    SynthLayout,
    SynthPreset,
    parse_size,
)

__all__ = [
    "CAPTURE_KINDS", "Manifest", "ModelSection", "SyntheticSection", "MeshSection", "ComputeSection",
    "DistributedSection", "StorageSection", "RemoteSection", "PromptSection", "ChatMessage", "GenerateSection",
    "SamplingSection", "OutputSection", "VindexSection", "field_effect",
]

Placement = Literal["streamed", "resident"]
DType = Literal["float32", "bfloat16"]
Dequant = Literal[DEQUANT_MODES]  # "exact" | "bf16-rounded"
CaptureKind = Literal["norms", "routing", "logits"]
MatmulMode = Literal[MATMUL_MODES]
CAPTURE_KINDS: tuple[str, ...] = ("norms", "routing", "logits")



# ---------------------------------------------------------------------------------------------
# Validators shared by the models.


def _fail(message: str) -> PydanticCustomError:
    # The message goes in through the context so braces in user text are never interpreted.
    return PydanticCustomError("manifest", "{message}", {"message": message})


def _base_dir(info: ValidationInfo) -> Path:
    ctx = info.context if isinstance(info.context, Mapping) else {}
    base = ctx.get("base_dir")
    return Path(base) if base is not None else Path.cwd()


def _check_paths(info: ValidationInfo) -> bool:
    ctx = info.context if isinstance(info.context, Mapping) else {}
    return bool(ctx.get("check_paths", True))


def _resolve_path(value: Any, info: ValidationInfo) -> Path:
    if isinstance(value, Path):  # programmatic use (parse_manifest_dict)
        path = value
    elif isinstance(value, str):
        if not value.strip():
            raise _fail("must be a non-empty path string")
        path = Path(value)
    else:
        raise _fail(f"expected a path string, got {describe_value(value)}")
    try:
        path = path.expanduser()
    except RuntimeError as exc:  # ~user that does not exist, or no home directory
        raise _fail(f"cannot expand '~' in {str(value)!r}: {exc}") from None
    if not path.is_absolute():
        path = _base_dir(info) / path
    return path.resolve()


REMOTE_SCHEMES = ("http://", "https://", "hf://", "s3://")


def _resolve_checkpoint(value: Any, info: ValidationInfo) -> Path | str:
    """A remote checkpoint URL stays a string; anything else is a local path."""
    if isinstance(value, str) and value.startswith(REMOTE_SCHEMES):
        if value.rstrip("/").count("/") < 2 or value.rstrip("/").endswith(":/"):
            raise _fail(f"checkpoint URL {value!r} names no host, bucket or repository")
        return value
    return _resolve_path(value, info)


def _check_checkpoint_dir(path: Path | str, info: ValidationInfo) -> Path | str:
    if isinstance(path, str) or not _check_paths(info):
        return path
    if not path.exists():
        raise _fail(f"checkpoint directory {path} does not exist")
    if not path.is_dir():
        raise _fail(f"checkpoint path {path} is not a directory")
    if not (path / "config.json").is_file():
        raise _fail(
            f"checkpoint directory {path} has no config.json "
            "(expected a checkpoint directory in Hugging Face layout)"
        )
    return path


def _check_version(value: Any) -> Any:
    # Literal[1] alone would accept true and 1.0; the version must be the integer 1.
    if type(value) is not int or value != MANIFEST_VERSION:
        raise _fail(
            f"unsupported manifest version {describe_value(value)}; "
            f"this kimi-jax reads manifest version {MANIFEST_VERSION}"
        )
    return value


ManifestPath = Annotated[Path, BeforeValidator(_resolve_path)]
CheckpointPath = Annotated[Path | str, BeforeValidator(_resolve_checkpoint), AfterValidator(_check_checkpoint_dir)]
TokenId = Annotated[int, Field(ge=0)]


class _Section(BaseModel):
    # allow_inf_nan=False: a NaN or infinite setting is refused here, at load, by name (it used to
    # pass, and surfaced as an internal error once the resolved manifest was written after the compute)
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


# ---------------------------------------------------------------------------------------------
# The schema.


class SyntheticSection(_Section):
    """A synthetic checkpoint, generated on first use into ``model.cache_dir``."""

    preset: SynthPreset = Field(description="Model size: tiny | small | full-shape | full-shape-routed (the real "
                                            "K2.5 shapes, sparse; -routed: random routers, norms and 8192 active "
                                            "tokens, so picks vary by token and layer).")
    layout: SynthLayout = Field(
        default="kimi-k2.5",
        description="Tensor naming and quantization layout of the generated checkpoint.",
    )
    seed: int = Field(default=0, ge=0, description="Seed of the generated weights.")


class ModelSection(_Section):
    """Exactly one of ``checkpoint`` / ``synthetic``."""

    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [
                {"required": ["checkpoint"], "properties": {"checkpoint": {"type": "string"}}},
                {"required": ["synthetic"], "properties": {"synthetic": {"type": "object"}}},
            ]
        }
    )

    checkpoint: CheckpointPath | None = Field(
        default=None,
        description="Checkpoint directory in Hugging Face layout (must contain config.json); "
        "relative to the manifest's folder, '~' expanded. Or a remote folder: http(s)://HOST/PATH/, "
        "hf://ORG/MODEL[@REVISION], s3://BUCKET/PREFIX (the 'remote' extra).",
    )
    synthetic: SyntheticSection | None = Field(
        default=None, description="Generate a synthetic checkpoint instead of reading one."
    )
    cache_dir: Annotated[ManifestPath | None, neutral("only where synthetic checkpoints are cached")] = Field(
        default=None,
        validate_default=True,
        description="Directory for generated synthetic checkpoints; "
        "default $KIMI_JAX_CACHE or ~/.cache/kimi-jax.",
    )

    @field_validator("cache_dir", mode="after")
    @classmethod
    def _default_cache_dir(cls, value: Path | None) -> Path:
        return default_cache_dir() if value is None else value

    @model_validator(mode="after")
    def _exactly_one_source(self) -> ModelSection:
        if self.checkpoint is not None and self.synthetic is not None:
            raise _fail("exactly one of model.checkpoint / model.synthetic may be set, got both")
        if self.checkpoint is None and self.synthetic is None:
            raise _fail("exactly one of model.checkpoint / model.synthetic must be set, got neither")
        return self


class MeshSection(_Section):
    """The device mesh (see kimi_jax/model/mesh.py): ``expert`` x ``model`` must equal the number
    of devices present, over all processes of a multi-process run."""

    expert: int = Field(default=1, ge=1, description="Devices along the expert-parallel axis (routed experts split).")
    model: int = Field(default=1, ge=1,
                       description="Devices along the tensor-parallel axis (attention heads, MLP features split).")  # fmt: skip
    placement: Placement = Field(
        default="streamed",
        description="streamed: each layer read when needed, each process reading only its devices' share; "
        "resident: every layer read once before step 0 and kept on the devices.",
    )


class ComputeSection(_Section):
    EFFECT: ClassVar[Effect] = result("the arithmetic of the run differs")

    dtype: Annotated[DType, result("activations are computed in a different precision")] = Field(
        default="float32",
        description="Activation dtype: float32 | bfloat16 (bfloat16 activations and matmul inputs, "
        "float32 accumulation, normalisation statistics, softmax, router and logits).",
    )
    dequant: Annotated[Dequant, result("quantized weights are dequantized differently (the exact float32 product, "
                                       "or that product rounded to bfloat16)")] = Field(
        default="exact",
        description="Quantized weights (int4, FP8): exact = the float32 product q * scale, nothing "
        "rounded after it; bf16-rounded = that product rounded to bfloat16, as compressed-tensors' "
        "decompressor and bf16 kernels produce it. In bfloat16 compute both give the same weights.",
    )
    matmul: Annotated[MatmulMode, result("the three products sum the same float32 products in different "
                                         "orders")] = added_later(
        "kernels",
        was="widened",
        description="How weights enter matmuls: kernels (the default: the CPU kernels multiply the stored "
        "precision, each dequantized weight times the activation rounded to float32 and summed in float32; "
        "XLA's stored products where a kernel does not take the call) | stored (XLA's products: BF16 meets "
        "the activation split into three bf16 parts, quantized weights are dequantized one small tile at a "
        "time) | widened (each weight widened whole to the activation dtype, then one matmul: the "
        "reference). All three equal the exact products up to float32 rounding of the sums.",
    )
    mesh: Annotated[MeshSection | None, result("a mesh adds the experts' partial sums across devices in another "
                                               "order, which also depends on the placement (which device holds "
                                               "which expert)")] = added_later(
        None,
        description="Run on a device mesh (optional); absent: one device.",
    )


def _check_resident_bytes(value: Any) -> int | str:
    if value == AUTO:
        return value
    if isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return parse_size(value)
        except ValueError as exc:
            raise _fail(str(exc)) from None
    raise _fail(f"expected a size such as 8GiB or 512MiB, a byte count, or 'auto'; got {describe_value(value)}")


class RemoteSection(_Section):
    max_in_flight: int = Field(default=8, ge=1, le=256, description="Range requests in flight at once (1..256).")
    timeout_s: float = Field(default=30.0, gt=0, description="Connect and read timeout of a request, seconds.")
    request_mib: int = Field(default=16, ge=1, le=1024, description="Longest single range request, MiB.")
    cache_gib: float = Field(
        default=0.0,
        ge=0,
        description="Local range cache bound in GiB (under model.cache_dir/ranges); 0 = no cache.",
    )


class StorageSection(_Section):
    EFFECT: ClassVar[Effect] = neutral(
        "storage settings change how and when bytes are read (prefetch, retries, page cache, residency budget, "
        "expert cache, speculative reads, digest checks), not which bytes a step uses or what is computed")

    evict_page_cache: bool = Field(
        default=False,
        description="Drop the shards from the OS page cache before the run (cold measurement).",
    )
    prefetch: bool = Field(
        default=True,
        description="Read the next layer's non-expert tensors on a background thread.",
    )
    io_retries: int = Field(
        default=3, ge=0, le=10, description="Retries of transient I/O errors (0..10)."
    )
    verify_digests: bool = added_later(
        True,
        description="Check every tensor read against the checkpoint's digest file when there is one "
        "(`kimi-jax digest`); false switches the check off.",
    )
    digest_file: ManifestPath | None = added_later(
        None,
        description="The digest file to check against; default checkpoint.b3.json beside the checkpoint.",
    )
    remote: RemoteSection | None = added_later(
        None,
        description="How a remote checkpoint (http(s)://, hf://, s3://) is read.",
    )
    resident_bytes: Annotated[int | str, BeforeValidator(_check_resident_bytes)] = added_later(
        AUTO,
        was=0,
        json_schema_extra={"anyOf": [{"type": "integer", "minimum": 0}, {"type": "string"}]},
        description="Memory for weights kept across steps, in stored precision: a size (8GiB, 512MiB, bytes), "
        "0 = stream everything every step, auto (the default) = the memory available at the start less the "
        "working set of a streamed step. Filled with every layer's non-expert weights, then the head, then "
        "an expert cache.",
    )
    expert_cache: ExpertPolicy = added_later(
        "lru",
        description="Eviction policy of the expert cache: lru | lfu (least frequently used).",
    )
    page_cache: PageCacheMode = added_later(
        "auto",
        description="Drop each range read from the OS page cache (drop), keep it (keep), or drop only when the "
        "shards are larger than the memory available at the start (auto): pages of a checkpoint that cannot "
        "stay cached make the kernel reclaim memory on every read.",
    )
    speculate: bool = added_later(
        False,
        description="Apply each MoE layer's router to the hidden state entering the layer and read the experts it "
        "predicts in the background while the layer's attention runs: pays off when reads are slow (cold "
        "disk, network mount), costs CPU when the shards are in the page cache.",
    )


class ChatMessage(_Section):
    role: str = Field(min_length=1, description="Who speaks: system | user | assistant | tool (what the template "
                                                "accepts).")
    content: str = Field(description="What is said.")
    tool_calls: list[dict[str, Any]] | None = added_later(
        None,
        description="An assistant message's tool calls, as the OpenAI API writes them ({id, type: function, "
        "function: {name, arguments}}); the template renders them.",
    )
    tool_call_id: str | None = added_later(None, description="A tool message: the call it answers.")
    name: str | None = added_later(None, description="The speaker's name, for templates that use one.")


class PromptSection(_Section):
    """Exactly one of ``tokens`` / ``text`` / ``chat``."""

    EFFECT: ClassVar[Effect] = result("the input tokens differ")

    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [
                {"required": ["tokens"], "properties": {"tokens": {"type": "array"}}},
                {"required": ["text"], "properties": {"text": {"type": "string"}}},
                {"required": ["chat"], "properties": {"chat": {"type": "array"}}},
            ]
        }
    )

    tokens: list[TokenId] | None = Field(
        default=None, min_length=1, description="Prompt token ids (non-empty, each >= 0)."
    )
    text: str | None = Field(
        default=None,
        min_length=1,
        description="Prompt text; needs a checkpoint that ships a tokenizer (tiktoken.model or tokenizer.json).",
    )
    chat: list[ChatMessage] | None = added_later(
        None,
        min_length=1,
        description="A conversation [{role, content}, ...], rendered with the checkpoint's chat template "
        "and its generation prompt.",
    )
    tools: list[dict[str, Any]] | None = added_later(
        None,
        description="Tools the chat template declares to the model (OpenAI's tools: [{type: function, function: "
        "{name, description, parameters}}]); only with prompt.chat.",
    )
    chat_template_kwargs: dict[str, bool | int | float | str] | None = added_later(
        None,
        description="Extra variables for the chat template (e.g. {thinking: false} for Kimi K2.5's instant mode).",
    )

    @model_validator(mode="after")
    def _exactly_one_prompt(self) -> PromptSection:
        given = [name for name in ("tokens", "text", "chat") if getattr(self, name) is not None]
        if len(given) > 1:
            both = f"both {given[0]} and {given[1]}" if len(given) == 2 else "tokens, text and chat"
            raise _fail(f"exactly one of prompt.tokens / prompt.text / prompt.chat may be set, got {both}")
        if not given:
            raise _fail("exactly one of prompt.tokens / prompt.text / prompt.chat must be set, got none")
        if self.tools is not None and self.chat is None:
            raise _fail("prompt.tools applies only to prompt.chat")
        if self.chat_template_kwargs is not None and self.chat is None:
            raise _fail("prompt.chat_template_kwargs applies only to prompt.chat")
        return self


class PromptEntry(PromptSection):
    """One prompt of a ``prompts:`` run: a prompt as ``prompt:`` takes it, and optionally this
    sequence's own sampling seed and stop strings."""

    seed: int | None = Field(
        default=None, ge=0, lt=2**64,
        description="This sequence's sampling seed, in place of generate.sampling.seed (needs generate.sampling).",
    )
    stop: list[Annotated[str, Field(min_length=1)]] | None = Field(
        default=None, min_length=1,
        description="This sequence's stop strings, in place of generate.stop (needs a tokenizer).",
    )


class SamplingSection(_Section):
    """Seeded sampling; leave ``generate.sampling`` out for greedy decoding."""

    temperature: float = Field(default=1.0, gt=0, le=100, description="Softmax temperature (> 0).")
    top_k: int = Field(default=0, ge=0, description="Keep only the k most likely tokens; 0 keeps all.")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Keep the smallest set reaching this probability; 1 keeps all.")
    min_p: float = Field(default=0.0, ge=0, le=1, description="Drop tokens less likely than min_p times the best; 0 keeps all.")
    seed: int = Field(default=0, ge=0, lt=2**64, description="Seed of the counter-based generator (0 <= seed < 2**64).")


class DraftsSection(_Section):
    """Lossless speculative decoding: drafted tokens verified in one pass (kimi_jax.model.drafts).
    Not ``storage.speculate``, which reads experts ahead and never changes a token."""

    method: Literal["prompt-lookup", "mtp"] = Field(
        default="prompt-lookup",
        description="Where drafts come from: prompt-lookup, the tokens that followed the last n-gram's most recent "
        "earlier occurrence in the context; mtp, the checkpoint's multi-token-prediction layer (DeepSeek-V3's "
        "layers.{num_hidden_layers}), chained for several drafts.",
    )
    tokens: int = Field(default=4, ge=1, le=16, description="Most tokens drafted per verification pass (1 to 16).")


class GenerateSection(_Section):
    EFFECT: ClassVar[Effect] = result("the tokens are chosen or stopped differently")

    max_new_tokens: Annotated[int, result("a different number of tokens is generated")] = Field(
        default=5, ge=1, description="Tokens to generate (>= 1).")
    kv_cache: Annotated[bool, result("decoding with the latent cache computes attention in the absorbed form, a "
                                     "different order of floating-point operations")] = Field(
        default=True, description="Decode from a cache of the MLA latent (the default); false recomputes the "
        "whole sequence every step, as in the technical note.")
    sampling: Annotated[SamplingSection | None, result("other sampling settings or another seed draw other "
                                                       "tokens")] = added_later(
        None,
        description="Seeded sampling {temperature, top_k, top_p, min_p, seed}; absent: greedy.",
    )
    stop: Annotated[list[Annotated[str, Field(min_length=1)]] | None,
                    result("stop strings can end the run at another step")] = added_later(
        None,
        min_length=1,
        description="Stop when the generated text contains one of these strings (needs a tokenizer).",
    )
    prefill_chunk: Annotated[int | None, result("a prompt run in chunks sums its products in other groupings "
                                                "(float32 rounding)")] = added_later(
        None,
        ge=1,
        description="With the KV cache: run a prompt longer than this in passes of this many positions, so a pass "
        "holds at most this many positions' activations and experts (each pass reads each layer's experts once). "
        "Absent: the whole prompt in one pass.",
    )
    drafts: Annotated[DraftsSection | None, result("a verification pass computes the drafts' rows with the last "
                                                   "token's, in other groupings: the tokens are plain decoding's, "
                                                   "the logits from step 1 differ by float32 rounding")] = added_later(
        None,
        description="Draft tokens and verify them in one pass over the weights, with the KV cache (lossless: the "
        "tokens are those of plain decoding); absent: one token per pass.",
    )
    ignore_eos: Annotated[bool, result("the end-of-sequence and end-of-turn tokens stop the run only without "
                                       "it")] = added_later(
        False,
        description="Keep generating past the end-of-sequence and end-of-turn tokens (fixed-length runs).",
    )


class DistributedSection(_Section):
    """A multi-process run (``jax.distributed``). Each field may instead come from the environment
    (KIMI_JAX_COORDINATOR, KIMI_JAX_NUM_PROCESSES, KIMI_JAX_PROCESS_ID); see
    kimi_jax/run/distributed.py. Where and how the run is launched is not part of its identity."""

    EFFECT: ClassVar[Effect] = neutral(
        "only how the processes of a run find each other (their number, like the machine, is part of the "
        "platform fingerprint)")

    coordinator: str | None = Field(default=None, description="HOST:PORT where process 0 listens for the others.")
    num_processes: int | None = Field(default=None, ge=1, description="How many processes take part.")
    process_id: int | None = Field(default=None, ge=0, description="This process's index, 0..num_processes-1.")
    timeout_s: float = Field(
        default=300.0, gt=0,
        description="Seconds without progress (or to connect) before a process gives up on its peers.",
    )  # fmt: skip

    @field_validator("coordinator", mode="after")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        host, _, port = (value or "").rpartition(":")
        if value is not None and not (host and port.isdigit() and 0 < int(port) < 65536):
            raise _fail(f"expected HOST:PORT (e.g. 10.0.0.1:8476), got {value!r}")
        return value

    @model_validator(mode="after")
    def _process_in_range(self) -> DistributedSection:
        if self.process_id is not None and self.num_processes is not None and self.process_id >= self.num_processes:
            raise _fail(f"process_id {self.process_id} is not below num_processes {self.num_processes}")
        return self


class OutputSection(_Section):
    EFFECT: ClassVar[Effect] = neutral("only where the bundle is written")

    dir: ManifestPath = Field(
        description="Run output directory (need not exist); relative to the manifest's folder."
    )


VINDEX_PHASES: tuple[int, ...] = (1, 2, 3)


def _unique_items(value: list[Any] | None, what: str) -> list[Any] | None:
    if value is None:
        return None
    seen: dict[Any, int] = {}
    for i, item in enumerate(value):
        if item in seen:
            raise _fail(f"duplicate {what} {item!r} at index {i} (first at index {seen[item]}); "
                        f"each {what} may appear at most once")
        seen[item] = i
    return value


class VindexSection(_Section):
    """``kimi-jax vindex``: singular-value statistics of the experts (phase 1), the routers
    (phase 2) and routing statistics (phase 3). Ranges are checked against the checkpoint
    before any compute."""

    EFFECT: ClassVar[Effect] = neutral("settings of `kimi-jax vindex`, not read by `kimi-jax run`")

    phases: list[Annotated[int, Field(ge=1, le=3)]] = Field(
        default_factory=lambda: list(VINDEX_PHASES),
        min_length=1,
        json_schema_extra={"uniqueItems": True},
        description="Which phases to run (unique, subset of 1, 2, 3): 1 expert down_proj "
        "spectra, 2 router spectra, 3 routing statistics.",
    )
    layers: list[Annotated[int, Field(ge=0)]] | None = Field(
        default=None,
        min_length=1,
        json_schema_extra={"uniqueItems": True},
        description="Layer indices to analyse (unique); null = every layer.",
    )
    experts: list[Annotated[int, Field(ge=0)]] | None = Field(
        default=None,
        min_length=1,
        json_schema_extra={"uniqueItems": True},
        description="Routed expert ids analysed in phase 1 (unique); null = every expert.",
    )
    top_singular_values: int = Field(
        default=16, ge=1, description="How many of the largest singular values to keep per matrix."
    )
    prompts: list[Annotated[list[TokenId], Field(min_length=1)]] | None = Field(
        default=None,
        min_length=1,
        description="Token-id prompts the engine runs for phase 3; default the manifest's "
        "prompt (or none when bundles are given).",
    )
    max_new_tokens: int | None = Field(
        default=None, ge=1, description="Tokens generated per phase-3 prompt; default generate.max_new_tokens."
    )
    bundles: list[ManifestPath] = Field(
        default_factory=list,
        description="Run-bundle directories whose ledger.json routing records phase 3 also "
        "reads; relative to the manifest's folder.",
    )

    @field_validator("phases", mode="after")
    @classmethod
    def _unique_phases(cls, value: list[int]) -> list[int]:
        return _unique_items(value, "phase")

    @field_validator("layers", mode="after")
    @classmethod
    def _unique_layers(cls, value: list[int] | None) -> list[int] | None:
        return _unique_items(value, "layer")

    @field_validator("experts", mode="after")
    @classmethod
    def _unique_experts(cls, value: list[int] | None) -> list[int] | None:
        return _unique_items(value, "expert id")


class Manifest(_Section):
    """A validated run manifest. Paths are absolute; see :func:`load_manifest`."""

    version: Annotated[Literal[1], BeforeValidator(_check_version),
                       result("another schema version may mean other settings")] = Field(
        description="Manifest schema version; must be 1."
    )
    model: Annotated[ModelSection, result("a different checkpoint computes different values")]
    compute: ComputeSection = Field(default_factory=ComputeSection)
    storage: StorageSection = Field(default_factory=StorageSection)
    # exactly one of prompt / prompts (checked where the file's lines are known: load.prompt_choice)
    prompt: PromptSection | None = Field(default=None, exclude_if=lambda value: value is None)
    prompts: Annotated[list[PromptEntry] | None, result("other prompts, or the same in another order, make other "
                                                       "sequences")] = added_later(
        None,
        min_length=1,
        description="Several prompts decoded together, each entry as prompt takes it (with its own seed and stop "
        "strings); exclusive with prompt.",
    )
    generate: GenerateSection = Field(default_factory=GenerateSection)
    capture: Annotated[list[CaptureKind], neutral("capture is proven non-perturbing (bare and instrumented "
                                                  "runs agree bitwise)")] = Field(
        default_factory=lambda: list(CAPTURE_KINDS),
        json_schema_extra={"uniqueItems": True},
        description="What to record: norms | routing | logits (unique); [] = bare run.",
    )
    anchor: Annotated[ManifestPath | None, neutral("the anchor is only compared with step 0, never fed into "
                                                   "compute")] = Field(
        default=None,
        description="Anchor JSON file (need not exist yet); relative to the manifest's folder.",
    )
    output: OutputSection
    distributed: DistributedSection | None = added_later(
        None,
        description="Multi-process settings (optional).",
    )
    vindex: VindexSection | None = added_later(
        None,
        description="Settings of `kimi-jax vindex` (optional).",
    )

    _source: Path | None = PrivateAttr(default=None)
    _origins: Origins | None = PrivateAttr(default=None)

    @field_validator("capture", mode="after")
    @classmethod
    def _unique_capture(cls, value: list[str]) -> list[str]:
        seen: set[str] = set()
        for i, item in enumerate(value):
            if item in seen:
                raise _fail(
                    f"duplicate entry {item!r} at index {i}; "
                    f"each of {', '.join(CAPTURE_KINDS)} may appear at most once"
                )
            seen.add(item)
        return value

    # -- provenance ----------------------------------------------------------------------------

    @property
    def source(self) -> Path | None:
        """The manifest file this was loaded from (absolute), or None for a dict."""
        return self._source

    def locate(self, field: str) -> str:
        """``FILE:LINE`` of a dotted field (``prompt.tokens.2``), or the ``--set``/``--out``
        text it came from. A field that is not written in the file (a default) gets the line
        of its nearest written ancestor."""
        origins = self._origins
        if origins is None:
            return "<manifest>"
        return origins.locate(split_field(field))[0]

    def error(self, field: str, message: str) -> ManifestError:
        """A :class:`ManifestError` ``FILE:LINE: FIELD: message`` for later stages to raise,
        e.g. ``manifest.error("prompt.tokens.2", "token id 999 is outside the vocabulary
        (vocab_size 512)")``."""
        return ManifestError(f"{self.locate(field)}: {field}: {message}")

    # -- identity ------------------------------------------------------------------------------

    def resolved_dict(self) -> dict[str, Any]:
        """The manifest with defaults filled and absolute paths as strings (JSON-ready); fields
        declared with :func:`~kimi_jax.manifest.fields.added_later` are left out at their defaults."""
        return self.model_dump(mode="json")

    def identity_dict(self) -> dict[str, Any]:
        return identity_of(self.resolved_dict())

    def digest(self) -> str:
        return manifest_digest(self.resolved_dict())


def field_effect(field: str) -> Effect | None:
    """What the manifest declares a different value of the dotted ``field`` does to a run (see
    :mod:`kimi_jax.manifest.fields`); None when nothing on its path declares it."""
    return effect_in(Manifest, split_field(field))
