"""Line charts as PNG files with Pillow's ``ImageDraw`` (no matplotlib).

Used by ``tools/benchmark.py`` to draw throughput against batch size for sd_mlx and diffusers. Each chart is one
or more panels side by side; a panel has a title, axis labels and named series of ``(x, y)`` points. The x axis is
categorical-friendly: ticks are placed at the x values that occur in the data (batch sizes), on a linear scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

#: colours given to series in order of first appearance (RGB)
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
)


@dataclass
class Panel:
    """One chart panel.

    Attributes:
        title: text above the plot area.
        xlabel, ylabel: axis labels.
        series: ``{name: [(x, y), ...]}``; points with ``y`` None or not finite are skipped. Lines join the points in
            increasing ``x``.
    """

    title: str
    xlabel: str
    ylabel: str
    series: dict[str, list[tuple[float, float | None]]] = field(default_factory=dict)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font
    except (TypeError, OSError, AttributeError):
        return ImageFont.load_default()


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """About ``target`` round tick values (1, 2, 2.5 or 5 times a power of ten) covering ``[lo, hi]``.

    Returns at least two increasing values; the first is <= ``lo`` and the last >= ``hi``.
    """
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"tick range must be finite, got [{lo}, {hi}]")
    if hi <= lo:
        hi = lo + (abs(lo) if lo else 1.0)
    raw = (hi - lo) / max(target, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks = []
    v = start
    while v < hi + step * 1e-9:
        ticks.append(round(v, 12))
        v += step
    if ticks[-1] < hi:
        ticks.append(round(v, 12))
    if len(ticks) < 2:
        ticks.append(round(ticks[0] + step, 12))
    return ticks


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 100 or float(v).is_integer():
        return f"{v:.0f}"
    if abs(v) >= 1:
        return f"{v:.2g}" if abs(v) < 10 else f"{v:.3g}"
    return f"{v:.2g}"


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    box = draw.textbbox((0, 0), text, font=font)
    return box[2] - box[0], box[3] - box[1]


def _draw_panel(img: Image.Image, draw: ImageDraw.ImageDraw, panel: Panel, box: tuple[int, int, int, int],
                colours: dict[str, tuple[int, int, int]], fonts: dict[str, object]) -> None:
    x0, y0, x1, y1 = box
    title_font, label_font, tick_font = fonts["title"], fonts["label"], fonts["tick"]
    tw, th = _text_size(draw, panel.title, title_font)
    draw.text(((x0 + x1 - tw) // 2, y0 + 4), panel.title, fill="black", font=title_font)
    # plot area inside the panel
    left, right, top, bottom = x0 + 70, x1 - 15, y0 + th + 20, y1 - 60
    points = {name: sorted((float(x), float(y)) for x, y in pts if y is not None and math.isfinite(y))
              for name, pts in panel.series.items()}
    xs = sorted({x for pts in points.values() for x, _ in pts})
    ys = [y for pts in points.values() for _, y in pts]
    if not xs:
        draw.rectangle((left, top, right, bottom), outline=(80, 80, 80))
        msg = "no data"
        mw, mh = _text_size(draw, msg, label_font)
        draw.text(((left + right - mw) // 2, (top + bottom - mh) // 2), msg, fill="gray", font=label_font)
        return
    yticks = nice_ticks(0.0, max(ys) * 1.05 if max(ys) > 0 else 1.0)
    ylo, yhi = yticks[0], yticks[-1]
    xlo, xhi = (xs[0] - 0.5, xs[0] + 0.5) if len(xs) == 1 else (xs[0], xs[-1])
    pad = 0.06 * (xhi - xlo)
    xlo, xhi = xlo - pad, xhi + pad

    def px(x: float) -> float:
        return left + (x - xlo) / (xhi - xlo) * (right - left)

    def py(y: float) -> float:
        return bottom - (y - ylo) / (yhi - ylo) * (bottom - top)

    for t in yticks:
        y = py(t)
        draw.line((left, y, right, y), fill=(225, 225, 225))
        draw.line((left - 5, y, left, y), fill=(80, 80, 80))
        label = _fmt(t)
        lw, lh = _text_size(draw, label, tick_font)
        draw.text((left - 8 - lw, y - lh / 2 - 2), label, fill="black", font=tick_font)
    for t in xs:
        x = px(t)
        draw.line((x, bottom, x, bottom + 5), fill=(80, 80, 80))
        label = _fmt(t)
        lw, _ = _text_size(draw, label, tick_font)
        draw.text((x - lw / 2, bottom + 8), label, fill="black", font=tick_font)
    draw.line((left, top, left, bottom, right, bottom), fill=(80, 80, 80), width=2)  # axes over the grid
    lw, lh = _text_size(draw, panel.xlabel, label_font)
    draw.text(((left + right - lw) // 2, bottom + 30), panel.xlabel, fill="black", font=label_font)
    # vertical y label: draw on a small image and rotate
    yw, yh = _text_size(draw, panel.ylabel, label_font)
    tmp = Image.new("RGBA", (yw + 4, yh + 8), (255, 255, 255, 0))
    ImageDraw.Draw(tmp).text((2, 0), panel.ylabel, fill="black", font=label_font)
    tmp = tmp.rotate(90, expand=True)
    img.paste(tmp, (x0 + 4, int((top + bottom - tmp.height) / 2)), tmp)
    for name, pts in points.items():
        colour = colours[name]
        coords = [(px(x), py(y)) for x, y in pts]
        if len(coords) > 1:
            draw.line(coords, fill=colour, width=3)
        for cx, cy in coords:
            draw.ellipse((cx - 4, cy - 4, cx + 4, cy + 4), fill=colour, outline="white")
    # legend, top left inside the plot area
    lx, ly = left + 10, top + 8
    for name in points:
        draw.line((lx, ly + 7, lx + 22, ly + 7), fill=colours[name], width=3)
        draw.text((lx + 28, ly), name, fill="black", font=tick_font)
        ly += 20


def line_chart(panels: Sequence[Panel], path: str | Path, *, title: str | None = None,
               panel_size: tuple[int, int] = (520, 400)) -> Path:
    """Draw ``panels`` side by side into a PNG file at ``path`` (RGB, white background).

    Args:
        panels: the panels, left to right (at least one).
        path: output file (parent folders are created).
        title: a line of text above all panels.
        panel_size: ``(width, height)`` of each panel in pixels.

    Returns:
        ``Path(path)``.

    Raises:
        ValueError: no panels.
    """
    if not panels:
        raise ValueError("line_chart needs at least one panel")
    pw, ph = panel_size
    head = 34 if title else 0
    img = Image.new("RGB", (pw * len(panels), ph + head), "white")
    draw = ImageDraw.Draw(img)
    fonts = {"title": _font(16), "label": _font(14), "tick": _font(12)}
    if title:
        tw, _ = _text_size(draw, title, fonts["title"])
        draw.text(((img.width - tw) // 2, 8), title, fill="black", font=fonts["title"])
    colours: dict[str, tuple[int, int, int]] = {}
    for p in panels:
        for name in p.series:
            colours.setdefault(name, PALETTE[len(colours) % len(PALETTE)])
    for i, p in enumerate(panels):
        _draw_panel(img, draw, p, (i * pw, head, (i + 1) * pw, head + ph), colours, fonts)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")
    return path
