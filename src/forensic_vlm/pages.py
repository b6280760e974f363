"""Building blocks of the self-contained HTML pages (the report and the triage page).

A page has no script and reaches no network: figures and thumbnails are data URIs and the Korean
font is embedded, cut down to the characters the page uses. Every string is escaped here, since
paths and messages come from the evidence.
"""

from __future__ import annotations

import base64
import functools
import html
import io
import logging
from pathlib import Path

from forensic_vlm.fonts import korean_font_path
from forensic_vlm.images import load_checked_image


def escape(value: object) -> str:
    return html.escape(str(value), quote=True)


def html_table(header: list[str], rows: list[list[object]], raw: bool = False) -> str:
    """A table; cells are escaped unless ``raw`` (cells already made of HTML)."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c if raw else escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def png_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def thumbnail(path: Path, sha256: str, size: int, data: bytes | None = None) -> str:
    """A JPEG thumbnail as a data URI, made after the file's sha256 is checked again (``data``:
    its bytes as read from an evidence container)."""
    return "data:image/jpeg;base64," + base64.b64encode(jpeg_bytes(path, sha256, size, data)).decode()


def jpeg_bytes(path: Path, sha256: str, size: int, data: bytes | None = None, *, quality: int = 80) -> bytes:
    """The image as JPEG in memory, at most ``size`` pixels a side, after its sha256 is checked
    again; nothing is written anywhere."""
    image = load_checked_image(path, sha256, data)
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


STYLE = (
    "body{font-family:'NanumGothicEmbedded',system-ui,sans-serif;margin:2rem auto;max-width:1200px;"
    "color:#222;padding:0 1rem}table{border-collapse:collapse;margin:.5rem 0 1rem}th,td{border:1px solid #ccc;"
    "padding:.3rem .6rem;text-align:left;vertical-align:top}th{background:#f3f3f3}.ci{color:#666;font-size:.9em}"
    ".note{color:#555}.row{display:flex;flex-wrap:wrap;gap:1rem}figure{margin:.5rem 0}img{max-width:100%}"
    ".gallery{display:flex;flex-wrap:wrap;gap:.8rem}.card{width:220px;font-size:.8em;word-break:break-all}"
)


def html_page(title: str, body: str) -> str:
    """The whole page: the embedded font, the style sheet, the body."""
    style = _embedded_font(html.unescape(title + body)) + STYLE
    return (
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{escape(title)}</title>"
        f"<link rel=icon href='data:,'><style>{style}</style></head><body>{body}</body></html>\n"
    )


@functools.cache
def web_font_bytes() -> bytes:
    """NanumGothic whole, as browsers accept it: the file ships empty VTT source tables (TSI*),
    which Chromium's font sanitizer rejects, so they are dropped (they only serve font editors)."""
    from fontTools.ttLib import TTFont

    font = TTFont(str(korean_font_path()))
    tags = font.keys()  # a TTFont is not iterable over its tags
    for tag in [tag for tag in tags if tag.startswith("TSI")]:
        del font[tag]
    buffer = io.BytesIO()
    font.save(buffer)
    return buffer.getvalue()


def _embedded_font(text: str) -> str:
    """NanumGothic, cut down to the characters of the page, as a data URI: Korean renders on a
    machine with no Korean font installed, for tens of kB instead of the font's 4.7 MB."""
    from fontTools import subset

    logging.getLogger("fontTools").setLevel(logging.ERROR)  # it lists every table it drops
    options = subset.Options()
    font = subset.load_font(str(korean_font_path()), options)
    subsetter = subset.Subsetter(options)
    subsetter.populate(text=text)
    subsetter.subset(font)
    buffer = io.BytesIO()
    font.save(buffer)
    data = base64.b64encode(buffer.getvalue()).decode()
    return f"@font-face{{font-family:'NanumGothicEmbedded';src:url(data:font/ttf;base64,{data}) format('truetype')}}"
