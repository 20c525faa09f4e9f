"""Stage 0: the declarative YAML run manifest, read and checked before anything else happens.

``schema`` declares the sections and each field's effect on results (``fields``); ``origins``
reads the YAML and remembers where every value came from; ``errors`` turns schema failures into
``FILE:LINE: FIELD: message``; ``load`` is the entry point; ``identity`` is the digest that says
two manifests describe the same run.
"""

from kimi_jax.manifest.identity import identity_of, manifest_digest
from kimi_jax.manifest.load import (
    MANIFEST_SCHEMA_ID,
    load_manifest,
    load_recorded_manifest,
    manifest_json_schema,
    parse_manifest_dict,
    recorded_manifest,
)
from kimi_jax.manifest.origins import MANIFEST_VERSION
from kimi_jax.manifest.schema import CAPTURE_KINDS, Manifest, VindexSection, field_effect

__all__ = [
    "MANIFEST_VERSION", "MANIFEST_SCHEMA_ID", "CAPTURE_KINDS", "Manifest", "VindexSection", "load_manifest",
    "parse_manifest_dict", "recorded_manifest", "load_recorded_manifest", "manifest_json_schema", "manifest_digest", "identity_of",
    "field_effect",
]
