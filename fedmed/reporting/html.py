"""One way to write fedmed's HTML pages, tables and figures.

The run report (:mod:`fedmed.server.report` and the sections it takes), ``fedmed explain``,
``fedmed calibrate``, ``fedmed evaluate``, ``fedmed-server --evaluate`` and the statistics
page are built from these few calls: one stylesheet, every cell escaped, figures saved the
same way. Hand-written rather than a template engine (Jinja2 is not a dependency): a page
is a title and a list of blocks, and the escaping lives here once. matplotlib is never
imported here (sites import modules that use this one and never draw).
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["CSS", "esc", "table", "image", "images", "page", "write_page", "save_figure", "figure_uri"]

CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%;display:block;margin:1em 0}
pre{background:#f7f7f7;padding:1em;overflow-x:auto}
.pair,.row{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}.pair img{max-width:48%;margin:0}
.row img{max-width:32%;margin:0}"""


def esc(value: Any) -> str:
    """``value`` as text safe inside HTML (quotes too)."""
    return html.escape(str(value))


def table(header: Sequence[Any] | None, rows: Iterable[Sequence[Any]]) -> str:
    """A table whose every cell is escaped; ``header=None`` leaves out the header row."""
    head = ("<thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr></thead>"
            if header is not None else "")
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table>{head}<tbody>{body}</tbody></table>"


def image(src: str | Path, alt: str) -> str:
    """An ``<img>`` of a file beside the page (its name only) or a ``data:`` URI."""
    name = src if isinstance(src, str) else src.name
    return f'<img src="{esc(name)}" alt="{esc(alt)}">'


def images(items: Iterable[tuple[str | Path, str]], *, kind: str = "pair") -> str:
    """Several images side by side: ``kind`` ``pair`` (two a row) or ``row`` (three)."""
    return f'<div class="{esc(kind)}">' + "".join(image(src, alt) for src, alt in items) + "</div>"


def page(title: str, blocks: Iterable[str], *, heading: str | None = None) -> str:
    """A whole document: the shared stylesheet, ``<h1>`` (``heading``, default ``title``), blocks."""
    return "\n".join([f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title>",
                      f"<style>{CSS}</style></head><body><h1>{esc(heading or title)}</h1>",
                      *blocks, "</body></html>"])


def write_page(path: str | Path, title: str, blocks: Iterable[str], *, heading: str | None = None) -> Path:
    """Write :func:`page` to ``path`` (UTF-8); returns the path."""
    path = Path(path)
    path.write_text(page(title, blocks, heading=heading), encoding="utf-8")
    return path


def save_figure(fig: Figure, path: str | Path, *, dpi: int = 110) -> Path:
    """``tight_layout`` then a PNG at ``path`` (folders made); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return path


def figure_uri(fig: Figure, *, dpi: int = 80) -> str:
    """The figure as a ``data:image/png`` URI, for a page that must be one file."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
