"""Lay the note out as a PDF with fpdf2, deterministically, and draw its charts as vector paths.

Fonts: DejaVu Sans and DejaVu Sans Mono as matplotlib ships them (``mpl-data/fonts/ttf``, found
without importing matplotlib). fpdf2 embeds the subset of glyphs used; every string passes through
:func:`kimi_jax.note.safe_text.escape` first, so a character without a glyph is printed as
``\\u{HEX}``, never as a blank box.

Determinism: the creation date is fixed (:data:`FIXED_DATE`: a bundle records no time before its
receipt, which is written after the note), fpdf2's file identifier is the MD5 of the document's
own bytes, and font subsetting keeps the font's timestamp, so the same bundle and the same
software (kimi-jax, fpdf2, fonttools, the font files; named in the PDF's Producer field) give the
same bytes.
"""

from __future__ import annotations

import datetime
import functools
import importlib.util
import math
from pathlib import Path
from typing import Callable

from kimi_jax.errors import KimiJaxError
from kimi_jax.note.content import Badge, Bullets, Chart, Heading, Note, Para, Table
from kimi_jax.note.safe_text import escape, font_codepoints

FIXED_DATE = datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc)
FONTS = {"Sans": "DejaVuSans.ttf", "SansB": "DejaVuSans-Bold.ttf", "SansI": "DejaVuSans-Oblique.ttf",
         "Mono": "DejaVuSansMono.ttf"}  # fmt: skip
# Line colours of the charts (one per step, then repeated with a dash pattern).
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))  # fmt: skip
BODY_PT, SMALL_PT = 9.5, 7.5


class NoteError(KimiJaxError):
    """The note cannot be rendered (a missing font or PDF library)."""


@functools.lru_cache(maxsize=1)
def font_dir() -> Path:
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or spec.origin is None:
        raise NoteError("the note's fonts (DejaVu Sans, shipped with matplotlib) are not installed: "
                        "pip install matplotlib")  # fmt: skip
    folder = Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf"
    missing = [name for name in FONTS.values() if not (folder / name).is_file()]
    if missing:
        raise NoteError(f"{folder}: missing {', '.join(missing)}; the note needs matplotlib's DejaVu fonts")
    return folder


@functools.lru_cache(maxsize=1)
def covered() -> frozenset[int]:
    """Code points both the text font and the monospaced font have glyphs for."""
    folder = font_dir()
    return font_codepoints(str(folder / FONTS["Sans"])) & font_codepoints(str(folder / FONTS["Mono"]))


def safe(text: str) -> str:
    return escape(text, covered())


def renderer_versions() -> str:
    """The software whose versions decide the note's bytes, for the PDF's Producer field."""
    from importlib.metadata import PackageNotFoundError, version

    def v(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "?"

    return f"kimi-jax {v('kimi-jax')}; fpdf2 {v('fpdf2')}; fonttools {v('fonttools')}; DejaVu from matplotlib {v('matplotlib')}"


def _pdf(note: Note):
    try:
        from fpdf import FPDF
    except ImportError:
        raise NoteError("the note needs fpdf2: pip install fpdf2") from None

    class NotePDF(FPDF):
        def footer(self) -> None:
            self.set_y(-12)
            self.set_font("Sans", size=SMALL_PT)
            self.set_text_color(110)
            self.cell(0, 5, safe(f"{note.badge}  ·  page {self.page_no()} of {{nb}}"), align="C")

    pdf = NotePDF(format="A4", unit="mm")
    pdf.set_creation_date(FIXED_DATE)
    pdf.set_producer(renderer_versions())
    pdf.set_creator("kimi-jax note")
    pdf.set_title(safe(note.title))
    pdf.set_subject(safe(note.subtitle))
    pdf.set_lang("en")
    folder = font_dir()
    pdf.add_font("Sans", "", str(folder / FONTS["Sans"]))
    pdf.add_font("Sans", "B", str(folder / FONTS["SansB"]))
    pdf.add_font("Sans", "I", str(folder / FONTS["SansI"]))
    pdf.add_font("Mono", "", str(folder / FONTS["Mono"]))
    pdf.set_margins(18, 16, 18)
    pdf.set_auto_page_break(True, margin=18)
    return pdf


def render_pdf(note: Note) -> bytes:
    pdf = _pdf(note)
    pdf.add_page()
    pdf.set_font("Sans", "B", 15)
    pdf.multi_cell(0, 7, safe(note.title), align="L", new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("Sans", "", 8.5)
    pdf.set_text_color(90)
    pdf.multi_cell(0, 4.5, safe(note.subtitle), align="L", new_x="LMARGIN", new_y="NEXT")
    pdf.set_text_color(0)
    pdf.ln(3)
    for block in note.blocks:
        _BLOCKS[type(block)](pdf, block)
    return bytes(pdf.output())


def _heading(pdf, block: Heading) -> None:
    if pdf.will_page_break(22):
        pdf.add_page()
    pdf.ln(2.5)
    pdf.set_font("Sans", "B", 12)
    pdf.multi_cell(0, 6.5, safe(block.text), align="L", new_x="LMARGIN", new_y="NEXT")
    pdf.ln(1)


def _para(pdf, block: Para) -> None:
    if block.style == "mono":
        pdf.set_font("Mono", "", SMALL_PT)
        pdf.multi_cell(0, 3.8, safe(block.text), align="L", new_x="LMARGIN", new_y="NEXT")
    else:
        pdf.set_font("Sans", block.style, BODY_PT)
        pdf.multi_cell(0, 4.6, safe(block.text), align="L", new_x="LMARGIN", new_y="NEXT")
    pdf.ln(1.5)


def _bullets(pdf, block: Bullets) -> None:
    pdf.set_font("Sans", "", BODY_PT)
    for item in block.items:
        x = pdf.l_margin
        pdf.set_x(x)
        pdf.cell(5, 4.6, "•")
        pdf.multi_cell(pdf.w - pdf.r_margin - x - 5, 4.6, safe(item), align="L", new_x="LMARGIN", new_y="NEXT")
        pdf.ln(0.8)
    pdf.ln(1)


def _table(pdf, block: Table) -> None:
    from fpdf.fonts import FontFace

    if pdf.will_page_break(20):
        pdf.add_page()
    pdf.set_font("Sans", "I", SMALL_PT + 0.5)
    pdf.multi_cell(0, 4.2, safe(block.caption), align="L", new_x="LMARGIN", new_y="NEXT")
    pdf.ln(0.5)
    pdf.set_font("Sans", "", SMALL_PT + 0.5)
    width = pdf.w - pdf.l_margin - pdf.r_margin
    mono = FontFace(family="Mono", size_pt=SMALL_PT)
    head = FontFace(family="Sans", emphasis="BOLD", fill_color=(232, 236, 241))
    with pdf.table(col_widths=[w * width for w in block.widths], width=width, line_height=4.0, padding=1.0,
                   headings_style=head, text_align="LEFT", first_row_as_headings=True,
                   borders_layout="HORIZONTAL_LINES", cell_fill_color=(246, 248, 250),
                   cell_fill_mode="ROWS") as table:  # fmt: skip
        row = table.row()
        for text in block.header:
            row.cell(safe(text))
        for values in block.rows:
            row = table.row()
            for n, text in enumerate(values):
                row.cell(safe(text), style=mono if n in block.mono else None)
    pdf.ln(2.5)


def _badge(pdf, block: Badge) -> None:
    pdf.ln(1)
    pdf.set_font("Sans", "B", SMALL_PT + 0.5)
    pdf.set_fill_color(240, 243, 247)
    pdf.multi_cell(0, 6, safe(block.text), fill=True, align="C", new_x="LMARGIN", new_y="NEXT")
    pdf.ln(2)


def nice_step(top: float, ticks: int = 5) -> float:
    """A round tick spacing (1, 2 or 5 times a power of ten) giving about ``ticks`` ticks up to ``top``."""
    raw = max(top, 1e-12) / ticks
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


BYTE_UNITS = ((1024**3, "GiB"), (1024**2, "MiB"), (1024, "KiB"), (1, "B"))


def byte_unit(top: float) -> tuple[int, str]:
    return next(((size, name) for size, name in BYTE_UNITS if top >= size), BYTE_UNITS[-1])


def axis(top: float, unit: str) -> tuple[float, Callable[[float], str]]:
    """Tick spacing and tick labels: round numbers of KiB, MiB or GiB for bytes, plain otherwise."""
    if unit == "bytes":
        size, name = byte_unit(top)
        return nice_step(top / size) * size, lambda v: f"{v / size:g} {name}" if v else "0"
    return nice_step(top), lambda v: f"{v:g}"


def _chart(pdf, block: Chart) -> None:
    height, left, bottom = 62.0, 17.0, 9.0
    if pdf.will_page_break(height + 22):
        pdf.add_page()
    x0, top = pdf.l_margin + left, pdf.get_y() + 9
    width = pdf.w - pdf.r_margin - x0
    y_base = top + height - bottom
    plot_h = height - bottom - 2
    values = [v for _, series in block.series for v in series]
    layers = max((len(s) for _, s in block.series), default=0)
    step, label_of = axis(max(values, default=1.0) or 1.0, block.y_label)
    y_top = step * math.ceil((max(values, default=1.0) or 1.0) / step)
    to_y = lambda v: y_base - plot_h * (v / y_top)  # noqa: E731
    # legend
    pdf.set_font("Sans", "", SMALL_PT)
    x = x0
    for n, (label, _) in enumerate(block.series):
        pdf.set_fill_color(*PALETTE[n % len(PALETTE)])
        pdf.rect(x, top - 6.5, 3, 3, style="F")
        pdf.text(x + 4, top - 4, safe(label))
        x += 6 + pdf.get_string_width(safe(label))
        if x > pdf.w - pdf.r_margin - 20:
            break
    # axes and grid
    pdf.set_draw_color(200)
    pdf.set_line_width(0.1)
    pdf.set_text_color(60)
    for k in range(int(round(y_top / step)) + 1):
        y = to_y(k * step)
        pdf.line(x0, y, x0 + width, y)
        label = safe(label_of(k * step))
        pdf.text(x0 - 1.5 - pdf.get_string_width(label), y + 1, label)
    slot = width / max(layers, 1)
    every = max(1, math.ceil(layers / 16))
    for i in range(0, layers, every):
        label = str(i)
        pdf.text(x0 + slot * (i + 0.5) - pdf.get_string_width(label) / 2, y_base + 4, label)
    pdf.text(x0 + width / 2 - 4, y_base + 8, "layer")
    pdf.set_draw_color(80)
    pdf.set_line_width(0.25)
    pdf.line(x0, y_base, x0 + width, y_base)
    pdf.line(x0, y_base, x0, top)
    # data
    if block.kind == "bars":
        bar = slot * 0.8 / max(len(block.series), 1)
        for n, (_, series) in enumerate(block.series):
            pdf.set_fill_color(*PALETTE[n % len(PALETTE)])
            for i, v in enumerate(series):
                if v > 0:
                    pdf.rect(x0 + slot * (i + 0.1) + n * bar, to_y(v), bar, y_base - to_y(v), style="F")
    else:
        pdf.set_line_width(0.45)
        for n, (_, series) in enumerate(block.series):
            pdf.set_draw_color(*PALETTE[n % len(PALETTE)])
            if n >= len(PALETTE):
                pdf.set_dash_pattern(dash=1.2, gap=0.8)
            points = [(x0 + slot * (i + 0.5), to_y(v)) for i, v in enumerate(series)]
            if len(points) > 1:
                pdf.polyline(points)
            for px, py in points:
                pdf.set_fill_color(*PALETTE[n % len(PALETTE)])
                pdf.circle(px, py, 0.55, style="F")
            pdf.set_dash_pattern()
    pdf.set_draw_color(0)
    pdf.set_fill_color(255)
    pdf.set_text_color(0)
    pdf.set_line_width(0.2)
    pdf.set_y(top + height)
    pdf.set_font("Sans", "I", SMALL_PT + 0.5)
    pdf.multi_cell(0, 4.2, safe(block.caption), align="L", new_x="LMARGIN", new_y="NEXT")
    pdf.ln(2)


_BLOCKS = {Heading: _heading, Para: _para, Bullets: _bullets, Table: _table, Chart: _chart, Badge: _badge}
