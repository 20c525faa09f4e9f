"""Error types. Every message names the file, field or tensor at fault and what was expected."""


class KimiJaxError(Exception):
    """Base class: the CLI prints these as one clean line and exits non-zero."""


class ManifestError(KimiJaxError):
    """A run manifest is malformed, or refers to something that does not fit it."""


class CheckpointError(KimiJaxError):
    """A checkpoint's config or tensors are missing, malformed or inconsistent."""


class StorageError(KimiJaxError):
    """Reading tensor bytes from a shard failed."""


class FormatError(KimiJaxError):
    """Quantized tensor data cannot be decoded as declared."""


class TokenizerError(KimiJaxError):
    """A checkpoint's tokenizer files or chat template are malformed or do not fit the model."""


class InputError(KimiJaxError):
    """A file given to kimi-jax is not a regular file, is larger than it can legitimately be, or is not
    the UTF-8 JSON it should be."""


class ResumeError(KimiJaxError):
    """A run cannot continue from what was given to resume it: the saved work does not belong to
    this run, or part of it is missing."""


class OutputError(KimiJaxError):
    """A folder kimi-jax writes to (a run's output, the cache) cannot be used: another run holds it,
    it is not ours to replace, or the disk is full or read-only."""
