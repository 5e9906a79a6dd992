"""Pictures of the results, drawn with matplotlib's object API (no display needed).

Every function returns a ``matplotlib.figure.Figure`` (shown inline in a
notebook) and :func:`save_figure` writes one atomically, except
``recommendation_grid`` (a query and its results), which is composed with
Pillow for speed and written by :func:`save_grid`; ``image_rows`` (rows of
thumbnails, e.g. one per cluster), ``tsne_map`` (the library's
feature space in 2-D, from :func:`~similar_finder.reduce.tsne_embedding` or ``umap_embedding``), ``silhouette_curve`` (silhouette against k) and
``distance_histogram`` (nearest-neighbour distances with the threshold),
``threshold_tradeoff`` (what a labelled threshold trades), ``contact_sheet``
(a library's photos, a row per class) and ``score_bars`` (a comparison table as bars).
"""
from __future__ import annotations

import functools
import importlib.util
import os
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from ._io import atomic_path, atomic_write
from .images import ImageError, class_of, load_image
from .neighbors import sample_rows
from .thresholds import NO_RESULTS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

THUMB = 160  # pixels of a thumbnail in a grid
THUMB_CACHE = 1024  # decoded thumbnails a process keeps (160 px: 77 kB each)
TEXT_CACHE = 4096  # rendered caption lines a process keeps (2 kB each): distances repeat to 3 decimals
GRID_QUALITY = 88
GRID_PAD = 10
GRID_FONT = 12
GRID_RIGHT, GRID_WRONG = "seagreen", "firebrick"  # a result of the query's class, of another


def _figure(**kwargs) -> Figure:
    from matplotlib.figure import Figure  # deferred: the grid workers draw with Pillow only

    return Figure(**kwargs)


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 100) -> Path:
    path = Path(path)
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format=path.suffix.lstrip(".") or "png", dpi=dpi, bbox_inches="tight")
    return path


def _thumbnail(path: Path, size: int = THUMB) -> np.ndarray:
    try:
        return load_image(path, size)[0]
    except (ImageError, OSError):
        return np.full((size, size, 3), 200, np.uint8)  # a grey tile: the file went missing or bad


def recommendation_grid(query: str | os.PathLike, results: pd.DataFrame, images_root: str | os.PathLike,
                        *, title: str | None = None, query_label: str | None = None,
                        classes: bool = False) -> Image.Image:
    """The query, large, then each result with its distance (and class, when known) beneath, as one picture.

    ``results`` has ``path`` (relative to ``images_root``) and ``distance``
    columns, and optionally ``label``; ``classes=True`` labels each result with
    its class folder and frames it green or red against ``query_label``. An
    empty ``results`` draws a clear "No similar images found" panel.

    Composed with Pillow at a fixed layout (a PIL image, shown inline in a
    notebook; ``.save(path)`` writes it): run_all draws one per photo and
    approach, and matplotlib drawing each twice (``bbox_inches="tight"``) cost
    twenty times the decoding. :func:`compose_grid` is the same from plain values.
    """
    if "label" in results:
        labels = results["label"].tolist()
    else:
        labels = [class_of(p) for p in results["path"]] if classes else [None] * len(results)
    root = Path(images_root)
    return compose_grid(Path(query), [(root / path, float(distance), label or None) for path, distance, label
                                      in zip(results["path"], results["distance"], labels)],
                        title=title, query_label=query_label)


def compose_grid(query: Path, results, *, title: str | None = None, query_label: str | None = None) -> Image.Image:
    """:func:`recommendation_grid` from ``results`` as ``(photo path, distance, label or None)`` tuples.

    What makes it cheap enough to draw one per photo and approach: each photo is
    decoded once per process while it stays in the thumbnail cache, and each
    caption line is rendered once and pasted as a mask after (a result's
    distance, to 3 decimals, and its class repeat across thousands of grids).
    """
    n = max(len(results), 3)  # an empty answer still gets room for its message
    pad, big, cell = GRID_PAD, 2 * THUMB, THUMB + GRID_PAD
    title_h = GRID_FONT + 2 * pad + 4 if title else 0
    caption_h = 2 * (GRID_FONT + 4) + pad
    width, height = pad + big + 2 * pad + n * cell, title_h + caption_h + big + pad
    canvas = Image.new("RGB", (width, height), "white")
    if title:
        _paste_text(canvas, (width // 2, pad), title, GRID_FONT + 2, anchor="ma")
    top = title_h + caption_h
    canvas.paste(_thumbnail_image(Path(query), big), (pad, top))
    _paste_text(canvas, (pad + big // 2, top - 4), f"query: {Path(query).name}" +
                (f"\n({query_label})" if query_label else ""), GRID_FONT, anchor="md")
    left = pad + big + 2 * pad
    if not len(results):
        _paste_text(canvas, (left + n * cell // 2, top + big // 2), NO_RESULTS, GRID_FONT + 6, fill=GRID_WRONG,
                    anchor="mm")
    y = top + (big - THUMB) // 2
    draw = ImageDraw.Draw(canvas)
    for i, (path, distance, label) in enumerate(results):
        x = left + i * cell
        canvas.paste(_thumbnail_image(Path(path), THUMB), (x, y))
        if label and query_label:
            draw.rectangle((x - 3, y - 3, x + THUMB + 2, y + THUMB + 2), outline=GRID_RIGHT if label == query_label
                           else GRID_WRONG, width=3)
        _paste_text(canvas, (x + THUMB // 2, y - 6), f"d = {distance:.3f}" + (f"\n{label}" if label else ""),
                    GRID_FONT, anchor="md")
    return canvas


def draw_grid_chunk(tasks) -> int:
    """Draw and write the grids of a chunk of photos in this process; returns how many photos.

    Each task is ``(query path, query label or None, [(title, results, file to write), ...])``, ``results``
    as :func:`compose_grid` takes them. It lives here, not in the pipeline, so that a worker process
    imports Pillow and this module only.
    """
    for query, query_label, grids in tasks:
        for title, results, target in grids:
            save_grid(compose_grid(query, results, title=title, query_label=query_label), target)
    return len(tasks)


def save_grid(image: Image.Image, path: str | os.PathLike) -> Path:
    """Write a grid atomically, as JPEG or PNG by ``path``'s suffix (a grid is mostly photos: JPEG is
    25 times faster to write, and smaller)."""
    path = Path(path)
    jpeg = path.suffix.lower() in (".jpg", ".jpeg")
    # Renamed into place, so never half-written, but not fsynced: a grid is drawn again by the next run, and
    # an fsync of each of thousands of small files cost as much as composing them.
    with atomic_path(path) as tmp:
        image.save(tmp, "JPEG" if jpeg else "PNG", **({"quality": GRID_QUALITY} if jpeg else {"compress_level": 3}))
    return path


def _font_file() -> str:
    # matplotlib ships DejaVu Sans: the same face as the figures, with no font to install. Found without
    # importing matplotlib, which a grid worker does not need.
    return str(Path(importlib.util.find_spec("matplotlib").origin).parent / "mpl-data" / "fonts" / "ttf" /
               "DejaVuSans.ttf")


@functools.lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(_font_file(), size)


@functools.lru_cache(maxsize=None)
def _line_spacing(size: int) -> int:
    return _font(size).getbbox("A")[3] + 4


@functools.lru_cache(maxsize=TEXT_CACHE)
def _text_mask(line: str, size: int, anchor: str) -> tuple[Image.Image, int, int]:
    """One line of text rendered once: its 8-bit coverage mask and its offset from the anchor point."""
    font = _font(size)
    left, top, right, bottom = font.getbbox(line, anchor=anchor)
    mask = Image.new("L", (max(right - left, 1), max(bottom - top, 1)), 0)
    ImageDraw.Draw(mask).text((-left, -top), line, fill=255, font=font, anchor=anchor)
    return mask, left, top


def _paste_text(canvas: Image.Image, xy, text: str, size: int, *, fill="black", anchor: str = "la") -> None:
    """``ImageDraw.text`` with ``align="center"`` for a horizontally centred anchor, from cached line masks.

    Lines are spaced as Pillow spaces them (the height of "A" plus 4 pixels); a ``d`` anchor puts the last
    line at ``xy``, an ``a`` one the first.
    """
    lines = text.split("\n")
    spacing = _line_spacing(size)
    x, y = round(xy[0]), round(xy[1])
    if anchor[1] == "d":
        y -= (len(lines) - 1) * spacing
    elif anchor[1] == "m":
        y -= (len(lines) - 1) * spacing // 2
    for line in lines:
        mask, left, top = _text_mask(line, size, anchor)
        canvas.paste(fill, (x + left, y + top, x + left + mask.width, y + top + mask.height), mask)
        y += spacing


_thumbnails: OrderedDict[tuple[Path, int], Image.Image] = OrderedDict()  # least recently used first


def _thumbnail_image(path: Path, size: int) -> Image.Image:
    """A photo at ``size`` pixels, decoded once per process while it stays among the last
    :data:`THUMB_CACHE` used: a photo is a result in many grids (and a query in one)."""
    key = (path, size)
    if key in _thumbnails:
        _thumbnails.move_to_end(key)
        return _thumbnails[key]
    image = _thumbnails[key] = Image.fromarray(_thumbnail(path, size))
    if size == 2 * THUMB and (path, THUMB) not in _thumbnails:
        # A query's result tile, when it is one in a later grid of its cluster: its large tile halved.
        _thumbnails[path, THUMB] = image.reduce(2)
    while len(_thumbnails) > THUMB_CACHE:
        _thumbnails.popitem(last=False)
    return image


def image_rows(rows: dict[str, list[str]], images_root: str | os.PathLike, *, per_row: int = 8) -> Figure:
    """One row of thumbnails per entry, e.g. the first images of each cluster."""
    fig = _figure(figsize=(1.6 * per_row, 1.8 * len(rows)))
    for r, (name, paths) in enumerate(rows.items()):
        for c in range(per_row):
            ax = fig.add_subplot(len(rows), per_row, r * per_row + c + 1)
            ax.axis("off")
            if c < len(paths):
                ax.imshow(_thumbnail(Path(images_root) / paths[c], 96))
            if c == 0:
                ax.set_title(str(name), fontsize=9, loc="left")
    return fig


def tsne_map(points: np.ndarray, colours: dict[str, np.ndarray], *, paths=None,
             images_root: str | os.PathLike | None = None, thumbnails: int = 0, title: str = "",
             method: str = "t-SNE") -> Figure:
    """One panel per colouring (e.g. ``{"K-Means cluster": ..., "class": ...}``) of 2-D points.

    With ``thumbnails=N`` (and ``paths``), N images are drawn at their points,
    each framed in its point's colour of that panel, so that the panels still
    show what they are coloured by where the pictures cover the points.
    """
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    fig = _figure(figsize=(7 * len(colours), 6.5))
    chosen = sample_rows(len(points), thumbnails, even=True) if thumbnails and paths is not None and \
        images_root is not None else []
    pictures = {i: _thumbnail(Path(images_root) / paths[i], 40) for i in chosen}  # decoded once for every panel
    for panel, (name, values) in enumerate(colours.items(), start=1):
        ax = fig.add_subplot(1, len(colours), panel)
        values = np.asarray(values)
        names = sorted(set(values.tolist()), key=str)
        cmap = "tab10" if len(names) <= 10 else "tab20"
        colour_of = {value: _palette(cmap, i) for i, value in enumerate(names)}
        for value in names:
            mask = values == value
            ax.scatter(points[mask, 0], points[mask, 1], s=14, label=str(value), color=colour_of[value], alpha=0.8)
        for i in chosen:
            box = AnnotationBbox(OffsetImage(pictures[i], zoom=0.6), points[i], pad=0.15,
                                 bboxprops={"edgecolor": colour_of[values[i].item()], "linewidth": 2.5})
            ax.add_artist(box)
        if len(names) <= 20:
            ax.legend(fontsize=7, markerscale=1.5, loc="best", title=name, title_fontsize=8)
        ax.set_title(f"{method}, coloured by {name}")
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    return fig


def _palette(cmap: str, i: int):
    import matplotlib

    colours = matplotlib.colormaps[cmap].colors
    return colours[i % len(colours)]


def silhouette_curve(table: pd.DataFrame, best_k: int | None = None) -> Figure:
    """Silhouette score against k, the chosen k marked."""
    fig = _figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ax.plot(table["k"], table["silhouette"], marker="o")
    if best_k is not None:
        best = table.loc[table["k"] == best_k, "silhouette"].iloc[0]
        ax.scatter([best_k], [best], s=150, facecolors="none", edgecolors="firebrick", linewidths=2,
                   label=f"chosen k = {best_k}")
        ax.legend()
    ax.set_xlabel("k (number of clusters)")
    ax.set_ylabel("mean silhouette score")
    ax.set_title("Choosing k for the K-Means baseline")
    ax.grid(alpha=0.3)
    return fig


def distance_histogram(distances: np.ndarray, threshold: float, *, label: str = "") -> Figure:
    """Histogram of nearest-neighbour distances with the threshold as a vertical line."""
    fig = _figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ax.hist(np.asarray(distances).ravel(), bins=30, color="steelblue", alpha=0.8)
    ax.axvline(threshold, color="firebrick", linestyle="--", label=f"threshold {threshold:.3f} {label}".strip())
    ax.set_xlabel("distance to the nearest other image")
    ax.set_ylabel("images")
    ax.set_title("Nearest-neighbour distances in the library")
    ax.legend()
    return fig


def threshold_tradeoff(curve: dict, chosen: float, *, youden: float | None = None) -> Figure:
    """What each threshold trades: library photos answered against wrong-class neighbours kept out.

    ``curve`` is the ``"curve"`` of a labelled calibration (:func:`thresholds.tradeoff_curve`).
    """
    fig = _figure(figsize=(6.5, 4))
    ax = fig.add_subplot()
    for name, style in (("library answered", "-"), ("same class found", "--"), ("other classes kept out", ":")):
        ax.plot(curve["threshold"], curve[name], style, label=name, linewidth=2)
    if np.isfinite(chosen):
        ax.axvline(chosen, color="firebrick", label=f"chosen {chosen:.3f}")
    if youden is not None and youden != chosen and np.isfinite(youden):
        ax.axvline(youden, color="grey", linestyle="--", label=f"best separation {youden:.3f}")
    ax.set_xlabel("distance threshold")
    ax.set_ylabel("share of library photos")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("What the threshold trades")
    ax.legend(fontsize=8, loc="center right")
    ax.grid(alpha=0.3)
    return fig


def contact_sheet(library, *, per_row: int = 10, rows_per_class: int = 1, max_rows: int = 12) -> Figure:
    """The photos of a :class:`Library` at a glance: a row per class (its first photos), or rows in file order."""
    labels = library.labels()
    rows: dict[str, list[str]] = {}
    if labels is None:
        for start in range(0, min(len(library), per_row * max_rows), per_row):
            rows[f"photos {start + 1}-{min(start + per_row, len(library))}"] = library.paths[start:start + per_row]
    else:
        for label in sorted(set(labels))[:max_rows]:
            paths = [p for p, own in zip(library.paths, labels) if own == label]
            rows[f"{label} ({len(paths)})"] = paths[:per_row * rows_per_class]
    return image_rows(rows, library.root, per_row=per_row)


def score_bars(table: pd.DataFrame, columns=("precision@5", "mAP"), *, label: str = "method",
               title: str = "") -> Figure:
    """A comparison table as grouped horizontal bars, one group per row of ``table``."""
    columns = [c for c in columns if c in table]
    fig = _figure(figsize=(8, 0.45 * len(table) * len(columns) + 1.2))
    ax = fig.add_subplot()
    height = 0.8 / len(columns)
    positions = np.arange(len(table))
    for i, column in enumerate(columns):
        values = table[column].to_numpy(float)
        bars = ax.barh(positions + i * height, values, height, label=column, color=_palette("tab10", i))
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
    ax.set_yticks(positions + height * (len(columns) - 1) / 2, [str(v) for v in table[label]], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.08)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    if title:
        ax.set_title(title)
    return fig
