"""Text from a ledger printed safely: nothing a stranger's token can hold reaches the page raw.

Control and format characters (C0, C1, bidirectional overrides, zero-width joiners, line and
paragraph separators), private-use and unassigned code points, and every character the note's
fonts have no glyph for are written as ``\\u{HEX}``. What is left prints as itself.
"""

from __future__ import annotations

import functools
import unicodedata
from pathlib import Path

_HIDDEN_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}


@functools.lru_cache(maxsize=4)
def font_codepoints(path: str) -> frozenset[int]:
    """The code points a TrueType font maps to a glyph (its best cmap)."""
    from fontTools.ttLib import TTFont

    with TTFont(Path(path), lazy=True) as font:
        return frozenset(font.getBestCmap())


def escape(text: str, covered: frozenset[int]) -> str:
    """``text`` with every character that would not print as itself written ``\\u{HEX}``."""
    out = []
    for ch in text:
        code = ord(ch)
        if ch == " " or (unicodedata.category(ch) not in _HIDDEN_CATEGORIES and code in covered
                         and not ch.isspace()):  # fmt: skip
            out.append(ch)
        else:
            out.append(f"\\u{{{code:x}}}")
    return "".join(out)
