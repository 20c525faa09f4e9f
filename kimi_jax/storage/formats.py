"""The stored weight formats, in one table: which stored tensors make up a logical weight, and
which of them a matmul computes with.

A logical weight (``layers.3.mlp.experts.7.down_proj.weight``) is stored as one of:

* ``plain``: the tensor itself (BF16, F32...), under ``weight``;
* ``int4``: compressed-tensors pack-quantized, ``weight_packed`` (eight 4-bit values per int32
  word), ``weight_scale`` (one scale per group) and ``weight_shape`` (the unpacked shape, checked
  when read, never computed with);
* ``fp8``: E4M3 ``weight`` with block scales ``weight_scale_inv``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Literal

WeightFormat = Literal["plain", "int4", "fp8"]


@dataclasses.dataclass(frozen=True)
class StoredFormat:
    name: WeightFormat
    compute_parts: tuple[str, ...]  # what the weight containers hold and the matmuls read
    metadata_parts: tuple[str, ...] = ()  # describe the weight; read and checked, never computed with

    @property
    def parts(self) -> frozenset[str]:
        """The set of stored part names that identifies the format."""
        return frozenset(self.compute_parts + self.metadata_parts)


FORMATS: dict[str, StoredFormat] = {
    "plain": StoredFormat("plain", ("weight",)),
    "int4": StoredFormat("int4", ("weight_packed", "weight_scale"), ("weight_shape",)),
    "fp8": StoredFormat("fp8", ("weight", "weight_scale_inv")),
}
# Parts that no format computes with, whatever the format.
METADATA_PARTS: frozenset[str] = frozenset(p for f in FORMATS.values() for p in f.metadata_parts)


def format_of(part_names: Iterable[str]) -> StoredFormat | None:
    """The format whose stored parts are exactly ``part_names``, or None."""
    names = frozenset(part_names)
    return next((f for f in FORMATS.values() if f.parts == names), None)


__all__ = ["WeightFormat", "StoredFormat", "FORMATS", "METADATA_PARTS", "format_of"]
