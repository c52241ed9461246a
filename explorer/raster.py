"""The embedding map as a server-side raster: a million points become one PNG of a few hundred
KiB, drawn under a small interactive overlay (explorer/views/embedding_map.py).

Each pixel shows the mean score of the pretraining examples that fall in it (or their most
common class when the run has no scores), on the diverging scale of the explorer, with its
opacity growing with the number of examples. Sparse maps draw each example as a small disc so
that a few hundred points stay visible. Pure numpy and Pillow: no streamlit in here.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

WIDTH, HEIGHT = 1100, 560  # about the plot area of the map in a 1440-pixel wide window
HARMFUL_RGB = (214, 69, 43)  # explorer.render.HARMFUL
HELPFUL_RGB = (26, 152, 80)  # explorer.render.HELPFUL
MIDDLE_RGB = (196, 201, 207)  # a grey that shows on white: most examples score near zero
# Class colours (Tableau 10), the last one for every class past the ninth.
PALETTE = (
    (78, 121, 167), (242, 142, 43), (225, 87, 89), (118, 183, 178), (89, 161, 79),
    (237, 201, 72), (176, 122, 161), (255, 157, 167), (156, 117, 95), (186, 176, 172),
)  # fmt: skip


@dataclass(frozen=True)
class Extent:
    """The data ranges drawn: x0..x1 left to right, y0..y1 bottom to top."""

    x0: float
    x1: float
    y0: float
    y1: float

    def text(self) -> str:
        """The extent for the URL (`zoom=x0,x1,y0,y1`), rounded to what a pixel can show."""
        digits = max(0, 3 - int(math.floor(math.log10(max(self.x1 - self.x0, 1e-12)))))
        return ",".join(f"{v:.{digits}f}" for v in (self.x0, self.x1, self.y0, self.y1))

    @classmethod
    def parse(cls, text: str | None) -> Extent | None:
        """An extent from its URL form, or None when `text` is not four increasing pairs."""
        if not text:
            return None
        try:
            x0, x1, y0, y1 = (float(v) for v in str(text).split(","))
        except ValueError:
            return None
        values = (x0, x1, y0, y1)
        if not all(math.isfinite(v) for v in values) or x1 <= x0 or y1 <= y0:
            return None
        return cls(*values)

    def contains(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return (x >= self.x0) & (x <= self.x1) & (y >= self.y0) & (y <= self.y1)


def full_extent(x: np.ndarray, y: np.ndarray, pad: float = 0.03) -> Extent:
    """The extent holding every finite point, with a margin; a unit square when there is none."""
    finite = np.isfinite(x) & np.isfinite(y)
    if not finite.any():
        return Extent(-1.0, 1.0, -1.0, 1.0)
    x, y = x[finite], y[finite]
    x0, x1, y0, y1 = float(x.min()), float(x.max()), float(y.min()), float(y.max())
    dx, dy = max(x1 - x0, 1e-6), max(y1 - y0, 1e-6)
    return Extent(x0 - pad * dx, x1 + pad * dx, y0 - pad * dy, y1 + pad * dy)


def pixels(
    x: np.ndarray, y: np.ndarray, extent: Extent, width: int = WIDTH, height: int = HEIGHT
) -> np.ndarray:
    """The pixel (row * width + column, row 0 at the top) of each point; -1 outside `extent`
    or for a point without a position."""
    with np.errstate(invalid="ignore"):
        inside = (x >= extent.x0) & (x <= extent.x1) & (y >= extent.y0) & (y <= extent.y1)
        column = np.floor((x[inside] - extent.x0) / (extent.x1 - extent.x0) * width)
        row = np.floor((extent.y1 - y[inside]) / (extent.y1 - extent.y0) * height)
    # a point on the right or bottom edge belongs to the last column or row
    column = np.minimum(column, width - 1).astype(np.int32)
    row = np.minimum(row, height - 1).astype(np.int32)
    index = np.full(len(x), -1, dtype=np.int32)
    index[inside] = row * width + column
    return index


def radius(visible: int, width: int = WIDTH, height: int = HEIGHT) -> int:
    """The disc radius (pixels) that keeps `visible` points visible: 0 (one pixel each) for a
    dense map, up to 3 for a few hundred points."""
    density = visible / float(width * height)
    if density > 0.3:
        return 0
    if density > 0.03:
        return 1
    if density > 0.003:
        return 2
    return 3


def _spread(grid: np.ndarray, r: int) -> np.ndarray:
    """`grid` (…, height, width) summed over a disc of radius `r` around each pixel."""
    if r == 0:
        return grid
    out = np.zeros_like(grid)
    height, width = grid.shape[-2:]
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if dx * dx + dy * dy > r * r + r or abs(dx) >= width or abs(dy) >= height:
                continue  # a disc (a little fuller than the circle) inside the image
            ys, yd = (
                slice(max(0, -dy), height - max(0, dy)),
                slice(max(0, dy), height - max(0, -dy)),
            )
            xs, xd = slice(max(0, -dx), width - max(0, dx)), slice(max(0, dx), width - max(0, -dx))
            out[..., yd, xd] += grid[..., ys, xs]
    return out


def _alpha(count: np.ndarray) -> np.ndarray:
    """Opacity from the number of examples in a pixel: 0 where there is none, then 0.55 up to
    1 at the densest pixels (log scale), so both sparse and dense regions read."""
    filled = count > 0
    if not filled.any():
        return np.zeros(count.shape, dtype=np.float32)
    high = float(np.quantile(count[filled], 0.95))
    level = np.log1p(count) / math.log1p(max(high, 1.0))
    return np.where(filled, 0.55 + 0.45 * np.clip(level, 0.0, 1.0), 0.0).astype(np.float32)


@dataclass(frozen=True)
class Density:
    """What a score image takes from the map alone, not from the test: which examples fall in
    the image, how many per pixel (spread over the disc radius) and the opacity that gives.
    Computed once per run and extent (explorer.data), so a new test only averages its scores."""

    inside: np.ndarray  # bool per example: a pixel of the image holds it
    pixel: np.ndarray  # the pixel of each example inside (int64, in example order)
    count: np.ndarray  # (height, width) examples per pixel, spread over the disc
    alpha: np.ndarray  # (height, width) float32 opacity
    alpha_byte: np.ndarray  # (height, width) uint8, the alpha channel of the image
    radius: int
    everyone: bool  # every example falls inside (no mask needed)


def density(
    pixel: np.ndarray, width: int = WIDTH, height: int = HEIGHT, use: np.ndarray | None = None
) -> Density:
    """The `Density` of the examples at `pixel` (-1 outside), or of those where `use` holds."""
    inside = pixel >= 0 if use is None else (pixel >= 0) & use
    positions = pixel[inside].astype(np.int64)
    count = np.bincount(positions, minlength=width * height).reshape(height, width)
    r = radius(int(positions.size), width, height)
    count = _spread(count.astype(np.float64), r)
    alpha = _alpha(count)
    return Density(
        inside=inside,
        pixel=positions,
        count=count,
        alpha=alpha,
        alpha_byte=_rgba(np.zeros(alpha.shape + (3,)), alpha)[..., 3],
        radius=r,
        everyone=bool(inside.all()),
    )


def score_image(
    pixel: np.ndarray,
    values: np.ndarray,
    width: int = WIDTH,
    height: int = HEIGHT,
    base: Density | None = None,
) -> tuple[np.ndarray, float]:
    """RGBA (height, width, 4) of the mean score per pixel, and the |score| at which the
    colour saturates (the 99th percentile of the pixels' |mean|). `base`, the `density` of
    `pixel`, saves its work when every value is finite (the image is the same)."""
    finite = np.isfinite(values)
    if base is None or not finite.all():
        base = density(pixel, width, height, use=finite)
    weights = values if base.everyone else values[base.inside]
    total = np.bincount(base.pixel, weights=weights, minlength=width * height)
    total = _spread(total.reshape(height, width), base.radius)
    count = base.count
    filled = count > 0
    mean = np.divide(total, count, out=np.zeros_like(total), where=filled)
    limit = float(np.quantile(np.abs(mean[filled]), 0.99)) if filled.any() else 0.0
    limit = limit if limit > 0 else 1.0
    # the colour of each filled pixel only: the empty ones (most of a sparse map) stay grey
    t = np.clip(mean[filled] / limit, -1.0, 1.0)[:, None]
    middle = np.array(MIDDLE_RGB, dtype=np.float32)
    ends = np.where(t >= 0, np.array(HELPFUL_RGB, np.float32), np.array(HARMFUL_RGB, np.float32))
    out = np.empty((height, width, 4), dtype=np.uint8)
    out[..., :3] = MIDDLE_RGB
    out[filled, :3] = np.clip(middle + (ends - middle) * np.abs(t), 0, 255).astype(np.uint8)
    out[..., 3] = base.alpha_byte
    return out, limit


def class_image(
    pixel: np.ndarray, codes: np.ndarray, width: int = WIDTH, height: int = HEIGHT
) -> np.ndarray:
    """RGBA (height, width, 4) of the most common class per pixel, classes numbered by
    `codes` (0 = the most frequent class; codes past the palette share its last colour)."""
    k = len(PALETTE)
    use = (pixel >= 0) & (codes >= 0)
    size = width * height
    capped = np.minimum(codes[use], k - 1).astype(np.int64)
    counts = np.bincount(capped * size + pixel[use], minlength=k * size)
    counts = counts.reshape(k, height, width).astype(np.float32)
    counts = _spread(counts, radius(int(use.sum()), width, height))
    rgb = np.array(PALETTE, dtype=np.float32)[np.argmax(counts, axis=0)]
    return _rgba(rgb, _alpha(counts.sum(axis=0)))


def _rgba(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    out = np.empty(alpha.shape + (4,), dtype=np.uint8)
    out[..., :3] = np.clip(rgb, 0, 255).astype(np.uint8)
    out[..., 3] = np.round(alpha * 255).astype(np.uint8)
    return out


def png(rgba: np.ndarray) -> bytes:
    """The image as a PNG of 128 colours: about 100 KiB for a million points instead of 430
    KiB in full colour, made faster than that (the map is sent on every rerun) and not told
    apart by eye on the map's few smooth colour ramps."""
    image = Image.fromarray(rgba, mode="RGBA").quantize(128, method=Image.Quantize.FASTOCTREE)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()


def in_polygon(x: np.ndarray, y: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Which points lie inside the polygon with vertices (px, py) (even-odd rule)."""
    inside = np.zeros(len(x), dtype=bool)
    if len(px) < 3:
        return inside
    box = (x >= px.min()) & (x <= px.max()) & (y >= py.min()) & (y <= py.max())
    candidates = np.flatnonzero(box)
    cx, cy = x[candidates], y[candidates]
    hit = np.zeros(len(candidates), dtype=bool)
    for i in range(len(px)):  # ray casting, one edge at a time over all candidates
        x1, y1, x2, y2 = px[i - 1], py[i - 1], px[i], py[i]
        if y1 == y2:
            continue
        crosses = (y1 > cy) != (y2 > cy)
        hit ^= crosses & (cx < (x2 - x1) * (cy - y1) / (y2 - y1) + x1)
    inside[candidates] = hit
    return inside
