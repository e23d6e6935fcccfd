"""CLIP-T against CLIP-I per image, each method's mean marked: drawn with Pillow alone."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from PIL import Image, ImageDraw

COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189))


def _span(values: Sequence[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.08 or 0.01
    return lo - pad, hi + pad


def scatter(
    points: Mapping[str, Sequence[tuple[float, float]]],
    size: tuple[int, int] = (640, 480),
    x_label: str = "CLIP-T",
    y_label: str = "CLIP-I",
) -> Image.Image:
    """``points``: method -> [(x, y), ...]. Small dots per image, a large ringed dot at each
    method's mean, a legend with the means."""
    width, height = size
    left, right, top, bottom = 64, 16, 16, 48
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    every = [p for series in points.values() for p in series]
    if not every:
        draw.text((left, top), "no scores yet", fill="black")
        return image
    x0, x1 = _span([p[0] for p in every])
    y0, y1 = _span([p[1] for p in every])

    def at(x: float, y: float) -> tuple[float, float]:
        return (
            left + (x - x0) / (x1 - x0) * (width - left - right),
            height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom),
        )

    draw.rectangle((left, top, width - right, height - bottom), outline="black")
    for tick in range(5):
        fx, fy = x0 + (x1 - x0) * tick / 4, y0 + (y1 - y0) * tick / 4
        px, _ = at(fx, y0)
        _, py = at(x0, fy)
        draw.line((px, height - bottom, px, height - bottom + 4), fill="black")
        draw.text((px - 14, height - bottom + 6), f"{fx:.3f}", fill="black")
        draw.line((left - 4, py, left, py), fill="black")
        draw.text((4, py - 6), f"{fy:.3f}", fill="black")
    draw.text(((width - left) // 2 + left - 20, height - 18), x_label, fill="black")
    draw.text((4, 2), y_label, fill="black")
    for index, (name, series) in enumerate(points.items()):
        colour = COLOURS[index % len(COLOURS)]
        for x, y in series:
            cx, cy = at(x, y)
            draw.ellipse((cx - 2, cy - 2, cx + 2, cy + 2), fill=colour)
        if series:
            mx = sum(p[0] for p in series) / len(series)
            my = sum(p[1] for p in series) / len(series)
            cx, cy = at(mx, my)
            draw.ellipse((cx - 7, cy - 7, cx + 7, cy + 7), fill=colour, outline="black", width=2)
            ly = top + 6 + 14 * index
            draw.rectangle((width - right - 210, ly, width - right - 200, ly + 10), fill=colour)
            draw.text(
                (width - right - 196, ly - 1),
                f"{name}: mean ({mx:.3f}, {my:.3f})",
                fill="black",
            )
    return image
