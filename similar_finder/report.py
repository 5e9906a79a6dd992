"""Reports built from data, rendered to Markdown and to self-contained HTML.

A :class:`Report` is a list of blocks (headings, bullet lists, tables as
DataFrames, images, notes); ``to_markdown()`` links the images,
``to_html()`` embeds them, and ``save(folder)`` writes ``report.md`` and
``report.html`` atomically. Nothing is parsed back from Markdown.
"""
from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ._io import atomic_write

_STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
          "td,th{border:1px solid #ccc;padding:3px 8px}img{max-width:100%}")


@dataclass
class Report:
    title: str
    blocks: list[tuple[str, object]] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> "Report":
        self.blocks.append(("heading", (level, text)))
        return self

    def bullets(self, items) -> "Report":
        self.blocks.append(("bullets", [str(i) for i in items]))
        return self

    def text(self, text: str) -> "Report":
        self.blocks.append(("text", text))
        return self

    def table(self, frame: pd.DataFrame, *, index: bool = False, floatfmt=".3f") -> "Report":
        self.blocks.append(("table", (frame, index, floatfmt)))
        return self

    def image(self, name: str, caption: str = "") -> "Report":
        """A picture in the report's folder, by file name."""
        self.blocks.append(("image", (name, caption or Path(name).stem)))
        return self

    def to_markdown(self) -> str:
        lines = [f"# {self.title}", ""]
        for kind, value in self.blocks:
            if kind == "heading":
                lines += ["#" * value[0] + " " + value[1], ""]
            elif kind == "bullets":
                lines += [f"- {item}" for item in value] + [""]
            elif kind == "text":
                lines += [value, ""]
            elif kind == "table":
                frame, index, floatfmt = value
                lines += [frame.to_markdown(index=index, floatfmt=floatfmt), ""]
            elif kind == "image":
                lines += [f"![{value[1]}]({value[0]})", ""]
        return "\n".join(lines)

    def to_html(self, folder: Path) -> str:
        """HTML with every image embedded (read from ``folder``), so the file travels alone."""
        parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(self.title)}</title>",
                 f"<style>{_STYLE}</style>", f"<h1>{html.escape(self.title)}</h1>"]
        for kind, value in self.blocks:
            if kind == "heading":
                parts.append(f"<h{value[0]}>{html.escape(value[1])}</h{value[0]}>")
            elif kind == "bullets":
                parts.append("<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in value) + "</ul>")
            elif kind == "text":
                parts.append(f"<p>{html.escape(value)}</p>")
            elif kind == "table":
                frame, index, floatfmt = value
                parts.append(_html_table(frame, index, floatfmt))
            elif kind == "image":
                parts.append(embedded_image(Path(folder) / value[0], value[1]))
        return "\n".join(parts)

    def save(self, folder: str | Path, stem: str = "report") -> tuple[Path, Path]:
        folder = Path(folder)
        markdown, page = folder / f"{stem}.md", folder / f"{stem}.html"
        with atomic_write(markdown) as handle:
            handle.write(self.to_markdown())
        with atomic_write(page) as handle:
            handle.write(self.to_html(folder))
        return markdown, page


def _html_table(frame: pd.DataFrame, index: bool, floatfmt) -> str:
    """A table with the same number formats as its Markdown twin (``floatfmt``: one, or one per column)."""
    formats = floatfmt if isinstance(floatfmt, (tuple, list)) else [floatfmt] * len(frame.columns)
    shown = frame.copy()
    for column, fmt in zip(frame.columns, formats):
        if pd.api.types.is_float_dtype(frame[column]):
            shown[column] = frame[column].map(lambda x, f=fmt: format(x, f))
    return shown.to_html(index=index, border=0)


def embedded_image(path: Path, alt: str = "") -> str:
    """An ``<img>`` carrying a PNG or JPEG in a data URI."""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    kind = "jpeg" if Path(path).suffix.lower() in (".jpg", ".jpeg") else "png"
    return f'<img src="data:image/{kind};base64,{data}" alt="{html.escape(alt)}">'
