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
