"""The metrics against training step as a PNG, drawn with Pillow (matplotlib is not a dependency of finetune)."""
from __future__ import annotations

import dataclasses
import math

from PIL import Image, ImageDraw

from .sheets import font

# metric -> (legend label, colour); the base model is drawn at step 0.
SERIES = {
    "dino": ("DINO (subject)", (31, 119, 180)),
    "clip_i": ("CLIP-I (subject)", (255, 127, 14)),
    "clip_t": ("CLIP-T (prompt)", (44, 160, 44)),
    "class_dino": ("class vs photos, DINO (drift)", (214, 39, 40)),
    "class_dino_base": ("class vs base, DINO (drift)", (148, 103, 189)),
}
WIDTH, HEIGHT = 980, 560
LEFT, RIGHT, TOP, BOTTOM = 80, 730, 50, 490  # the plot area; the legend sits right of it
GRID, AXIS, FLOOR = (225, 225, 225), (40, 40, 40), (120, 120, 120)


@dataclasses.dataclass
class Axes:
    """Data to pixel mapping of the plot area."""
    x_min: float
    x_max: float
    y_min: float
    y_max: float

    def x(self, step: float) -> int:
        return round(LEFT + (step - self.x_min) / (self.x_max - self.x_min) * (RIGHT - LEFT))

    def y(self, value: float) -> int:
        return round(BOTTOM - (value - self.y_min) / (self.y_max - self.y_min) * (BOTTOM - TOP))

    def y_ticks(self) -> list[float]:
        step = nice_step((self.y_max - self.y_min) / 8)
        first = math.ceil(self.y_min / step - 1e-9) * step
        return [round(first + i * step, 10) for i in range(int((self.y_max - first) / step + 1e-9) + 1)]


def nice_step(raw: float) -> float:
    """The 1, 2 or 5 x 10^k at or above `raw`: tick spacing people read at a glance."""
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw - 1e-12)


def axes_for(rows: list[dict], floor: float | None) -> Axes:
    values = [row[key] for row in rows for key in SERIES] + ([floor] if floor is not None else [])
    low, high = min(values), max(values)
    pad = max((high - low) * 0.08, 0.02)
    steps = [row["step"] for row in rows]
    return Axes(min(steps), max(steps) if max(steps) > min(steps) else min(steps) + 1, low - pad, high + pad)


def plot_metrics(rows: list[dict], title: str, floor: float | None = None, best_step: int | None = None
                 ) -> Image.Image:
    """One line per SERIES over `rows` (sorted by step); `floor` is the CLIP-T limit of the best-checkpoint rule,
    `best_step` the chosen checkpoint, both drawn dashed."""
    axes = axes_for(rows, floor)
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw, small, large = ImageDraw.Draw(image), font(13), font(16)
    draw_frame(image, draw, axes, rows, small)
    if floor is not None:
        dashed(draw, (LEFT, axes.y(floor)), (RIGHT, axes.y(floor)), SERIES["clip_t"][1])
        draw.text((LEFT + 4, axes.y(floor) + 2), "CLIP-T floor of the best-checkpoint rule", fill=FLOOR, font=small)
    if best_step is not None:
        dashed(draw, (axes.x(best_step), TOP), (axes.x(best_step), BOTTOM), FLOOR)
        draw.text((axes.x(best_step) + 4, TOP + 2), "best", fill=FLOOR, font=small)
    for key, (_, colour) in SERIES.items():
        points = [(axes.x(row["step"]), axes.y(row[key])) for row in rows]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for px, py in points:
            draw.ellipse((px - 4, py - 4, px + 4, py + 4), fill=colour)
    draw.text((LEFT, 16), title, fill="black", font=large)
    draw_legend(draw, small)
    return image


def draw_frame(image: Image.Image, draw: ImageDraw.ImageDraw, axes: Axes, rows: list[dict], small) -> None:
    """Grid, axes, tick labels (y: cosine similarity; x: each evaluated step, 'base' at 0) and axis titles."""
    for tick in axes.y_ticks():
        draw.line((LEFT, axes.y(tick), RIGHT, axes.y(tick)), fill=GRID)
        label = f"{tick:.2f}"
        draw.text((LEFT - 8 - draw.textlength(label, font=small), axes.y(tick) - 7), label, fill=AXIS, font=small)
    shown = rows if len(rows) <= 12 else rows[:: math.ceil(len(rows) / 12)]
    for row in shown:
        label = "base" if row["checkpoint"] == "base" else str(row["step"])
        x = axes.x(row["step"])
        draw.line((x, BOTTOM, x, BOTTOM + 5), fill=AXIS)
        draw.text((x - draw.textlength(label, font=small) / 2, BOTTOM + 8), label, fill=AXIS, font=small)
    draw.rectangle((LEFT, TOP, RIGHT, BOTTOM), outline=AXIS)
    caption = "training step"
    draw.text(((LEFT + RIGHT - draw.textlength(caption, font=small)) / 2, BOTTOM + 30), caption, fill=AXIS,
              font=small)
    vertical = Image.new("RGB", (160, 18), "white")
    ImageDraw.Draw(vertical).text((0, 0), "cosine similarity", fill=AXIS, font=small)
    image.paste(vertical.rotate(90, expand=True), (12, (TOP + BOTTOM) // 2 - 80))


def draw_legend(draw: ImageDraw.ImageDraw, small) -> None:
    x, y = RIGHT + 20, TOP + 10
    for label, colour in SERIES.values():
        draw.line((x, y + 7, x + 26, y + 7), fill=colour, width=3)
        draw.ellipse((x + 9, y + 3, x + 17, y + 11), fill=colour)
        draw.text((x + 34, y), label, fill=AXIS, font=small)
        y += 24


def dashed(draw: ImageDraw.ImageDraw, start: tuple[int, int], end: tuple[int, int], colour, dash: int = 6) -> None:
    (x0, y0), (x1, y1) = start, end
    length = max(abs(x1 - x0), abs(y1 - y0))
    for offset in range(0, length, 2 * dash):
        a, b = offset / length, min(offset + dash, length) / length
        draw.line((x0 + (x1 - x0) * a, y0 + (y1 - y0) * a, x0 + (x1 - x0) * b, y0 + (y1 - y0) * b), fill=colour)
