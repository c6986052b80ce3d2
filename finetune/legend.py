"""Grids that say what they show, in their pixels: a title band on top (what drew them: step, model, LoRA scale,
sampler), the seed above each column and a label above each row (its prompt; base or LoRA).

Text is drawn in Pillow's built-in scalable font (ImageFont.load_default with a size, Pillow >= 10.1), so no system
font is needed; its size follows the cells' size, so the legend reads the same on a 64 px test grid and a 1024 px
SDXL one. The cells are pasted unscaled: each one holds exactly the pixels of its image.
"""
from __future__ import annotations

import dataclasses

from PIL import Image, ImageDraw, ImageFont

BACKGROUND, INK, FAINT = (255, 255, 255), (0, 0, 0), (90, 90, 90)
TITLE_LINES, ROW_LINES = 3, 2  # longer text is cut with an ellipsis


@dataclasses.dataclass
class LabelledGrid:
    image: Image.Image
    boxes: list[tuple[int, int, int, int]]  # (left, top, right, bottom) of each cell, in the images' order


def legend_font(cell_height: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """About 1/24 of a cell's height, at least 11 px: 11 px at 64 and 256 px cells, 21 px at 512, 43 px at 1024."""
    return ImageFont.load_default(size=max(11, round(cell_height / 24)))


def wrap(text: str, font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to `width` pixels; a word wider than a line, or text beyond `max_lines`, ends in '…'."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if font.getlength(candidate) <= width or not current:
            current = candidate
        else:
            lines.append(current)
            current = word
    lines.append(current)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] += " …"
    return [fit(line, font, width) for line in lines]


def fit(line: str, font, width: int) -> str:
    """`line`, shortened with '…' until it fits `width` pixels."""
    if font.getlength(line) <= width:
        return line
    while line and font.getlength(line + "…") > width:
        line = line[:-1]
    return line + "…"


def labelled_grid(images: list[Image.Image], rows: list[str], columns: list[str], title: str) -> LabelledGrid:
    """Tile `images` (row-major, all one size) under a title band, with `columns` labels over the columns and each
    of `rows` labels above its row."""
    if len(images) != len(rows) * len(columns):
        raise ValueError(f"{len(images)} images do not fill {len(rows)} rows x {len(columns)} columns")
    cell_w, cell_h = images[0].size
    width = cell_w * len(columns)
    font = legend_font(cell_h)
    text_h = round(font.getbbox("Ágy")[3])  # from the top of accents to the bottom of descenders
    line_h, pad = text_h + 2, max(2, text_h // 4)
    title_lines = wrap(title, font, width - 2 * pad, TITLE_LINES)
    row_lines = [wrap(label, font, width - 2 * pad, ROW_LINES) for label in rows]
    band = pad + line_h * (len(title_lines) + 1) + pad  # the title, then the column labels
    height = band + sum(len(lines) * line_h + pad + cell_h for lines in row_lines)
    grid = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for i, line in enumerate(title_lines):
        draw.text((pad, pad + i * line_h), line, fill=INK, font=font)
    for c, label in enumerate(columns):
        text = fit(label, font, cell_w - 2 * pad)
        left = c * cell_w + (cell_w - font.getlength(text)) / 2
        draw.text((left, pad + len(title_lines) * line_h), text, fill=FAINT, font=font)
    boxes, top = [], band
    for r, lines in enumerate(row_lines):
        for i, line in enumerate(lines):
            draw.text((pad, top + i * line_h), line, fill=INK, font=font)
        top += len(lines) * line_h + pad
        for c in range(len(columns)):
            image = images[r * len(columns) + c]
            box = (c * cell_w, top, (c + 1) * cell_w, top + cell_h)
            grid.paste(image.convert("RGB").resize((cell_w, cell_h)) if image.size != (cell_w, cell_h) else
                       image.convert("RGB"), box[:2])
            boxes.append(box)
        top += cell_h
    return LabelledGrid(grid, boxes)


def seed_columns(seed: int, count: int) -> list[str]:
    """Column labels of a grid whose image k uses seed + k."""
    return [f"seed {seed + k}" for k in range(count)]
