"""Contact sheets: one row per prompt, one column per seed, the prompt written beside its row."""
from __future__ import annotations

import textwrap

from PIL import Image, ImageDraw, ImageFont

CELL_MAX = 256     # thumbnails no larger than this; a 25 x 4 sheet of 1024 px images would be 100 megapixels
LABEL_WIDTH = 240  # pixels of prompt text to the left of each row
HEADER = 28        # pixels of title and seed labels above the grid


def font(size: int):
    """Pillow's bundled font at `size` (FreeType builds), else its fixed bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def contact_sheet(images: list[Image.Image], prompts: list[str], seeds: list[int], title: str) -> Image.Image:
    """`images` row-major: prompt p, seed k at p * len(seeds) + k."""
    if len(images) != len(prompts) * len(seeds):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts x {len(seeds)} seeds")
    cell = min(CELL_MAX, max(images[0].size))
    sheet = Image.new("RGB", (LABEL_WIDTH + cell * len(seeds), HEADER + cell * len(prompts)), "white")
    draw, text_font = ImageDraw.Draw(sheet), font(13)
    draw.text((6, 6), title, fill="black", font=text_font)
    for k, seed in enumerate(seeds):
        draw.text((LABEL_WIDTH + k * cell + 4, 6), f"seed {seed}", fill="black", font=text_font)
    chars = max(8, LABEL_WIDTH // 8)
    for p, prompt in enumerate(prompts):
        top = HEADER + p * cell
        for line_no, line in enumerate(textwrap.wrap(prompt, chars)[: max(1, cell // 16)]):
            draw.text((6, top + 4 + 16 * line_no), line, fill="black", font=text_font)
        for k in range(len(seeds)):
            thumb = images[p * len(seeds) + k].convert("RGB").resize((cell, cell), Image.Resampling.LANCZOS)
            sheet.paste(thumb, (LABEL_WIDTH + k * cell, top))
    return sheet
