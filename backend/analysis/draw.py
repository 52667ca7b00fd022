"""A minimal chart canvas on PIL (matplotlib is not a dependency): axes with ticks, lines, points, step
histograms, vertical markers and labels, enough for static paper figures as PNG."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

INK = (40, 40, 40)
GRID = (225, 225, 225)
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]


def font(size: int = 12) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round tick values covering [lo, hi]."""
    if not math.isfinite(lo) or not math.isfinite(hi) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + i * step, 10) for i in range(int((hi - first) / step + 1e-9) + 1)]


def fmt(v: float) -> str:
    return f"{v:.3g}"


class Axes:
    """A plotting area inside an image: data coordinates (xlim, ylim) map to the pixel box."""

    def __init__(self, img: Image.Image, box: tuple[int, int, int, int], xlim: tuple[float, float],
                 ylim: tuple[float, float]):
        self.draw = ImageDraw.Draw(img)
        self.box = box
        lo, hi = ylim
        if hi <= lo:
            lo, hi = lo - 0.5, hi + 0.5
        self.xlim, self.ylim = (xlim if xlim[1] > xlim[0] else (xlim[0] - 0.5, xlim[0] + 0.5)), (lo, hi)

    def px(self, x: float) -> float:
        left, _, right, _ = self.box
        return left + (x - self.xlim[0]) / (self.xlim[1] - self.xlim[0]) * (right - left)

    def py(self, y: float) -> float:
        _, t, _, b = self.box
        return b - (y - self.ylim[0]) / (self.ylim[1] - self.ylim[0]) * (b - t)

    def frame(self, title: str = "", xlabel: str = "", ylabel: str = "") -> None:
        left, t, r, b = self.box
        f = font(11)
        for y in nice_ticks(*self.ylim):
            self.draw.line([(left, self.py(y)), (r, self.py(y))], fill=GRID)
            self.draw.text((left - 4, self.py(y)), fmt(y), fill=INK, font=f, anchor="rm")
        for x in nice_ticks(*self.xlim, n=8):
            self.draw.line([(self.px(x), b), (self.px(x), b + 4)], fill=INK)
            self.draw.text((self.px(x), b + 6), fmt(x), fill=INK, font=f, anchor="mt")
        self.draw.rectangle([left, t, r, b], outline=INK)
        if title:
            self.draw.text(((left + r) / 2, t - 22), title, fill=INK, font=font(13), anchor="mb")
        if xlabel:
            self.draw.text(((left + r) / 2, b + 22), xlabel, fill=INK, font=f, anchor="mt")
        if ylabel:
            self.draw.text((left - 8, t - 6), ylabel, fill=INK, font=f, anchor="lb")

    def line(self, xs, ys, colour=PALETTE[0], width: int = 2) -> None:
        pts = [(self.px(x), self.py(y)) for x, y in zip(xs, ys, strict=True) if np.isfinite(y)]
        if len(pts) > 1:
            self.draw.line(pts, fill=colour, width=width, joint="curve")

    def points(self, xs, ys, colour=PALETTE[3], r: int = 4, labels: list[str] | None = None) -> None:
        for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
            cx, cy = self.px(x), self.py(y)
            self.draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour, outline=INK)
            if labels:
                self.draw.text((cx + r + 2, cy - r - 2), labels[i], fill=colour, font=font(11), anchor="lb")

    def step_hist(self, edges: np.ndarray, counts: np.ndarray, colour=PALETTE[0], width: int = 2) -> None:
        pts = [(self.px(edges[0]), self.py(0))]
        for i, c in enumerate(counts):
            pts += [(self.px(edges[i]), self.py(c)), (self.px(edges[i + 1]), self.py(c))]
        pts.append((self.px(edges[-1]), self.py(0)))
        self.draw.line(pts, fill=colour, width=width)

    def vline(self, x: float, colour=PALETTE[3], label: str = "", row: int = 0) -> None:
        _, t, _, b = self.box
        for y0 in range(int(t), int(b), 6):
            self.draw.line([(self.px(x), y0), (self.px(x), min(y0 + 3, b))], fill=colour, width=1)
        if label:
            right_edge = self.px(x) > self.box[2] - 60
            at = (self.px(x) - 2, t + 2 + 12 * row) if right_edge else (self.px(x) + 2, t + 2 + 12 * row)
            self.draw.text(at, label, fill=colour, font=font(10), anchor="rt" if right_edge else "lt")

    def legend(self, entries: list[tuple[str, tuple[int, int, int]]]) -> None:
        """Entries in a row above the top-right corner of the box."""
        _, t, r, _ = self.box
        for i, (name, colour) in enumerate(entries):
            x = r - 90 * (len(entries) - i)
            self.draw.line([(x, t - 9), (x + 16, t - 9)], fill=colour, width=3)
            self.draw.text((x + 20, t - 9), name, fill=INK, font=font(11), anchor="lm")


def canvas(width: int, height: int) -> Image.Image:
    return Image.new("RGB", (width, height), "white")
