"""The legends and parameters of the grids drawn while training: samples/step-N.png (one row per prompt) and
samples/before_after.png (for each prompt a base row, then a LoRA row), one column per seed.

The LoRA being trained has no file yet, so a grid's parameters name the base model and the training step; the
final before/after grid's LoRA rows are what the exported file draws at scale 1.
"""
from __future__ import annotations

from ..config import ValidationConfig
from ..legend import LabelledGrid, labelled_grid, seed_columns
from ..pnginfo import ImageParams, model_reference

BASE, LORA = "base", "LoRA x1"


def settings_text(cfg: ValidationConfig, size: tuple[int, int]) -> str:
    return f"{cfg.scheduler}, {cfg.steps} steps, guidance {cfg.guidance:g}, {size[0]}x{size[1]}"


def first_image_params(cfg: ValidationConfig, model: str, size: tuple[int, int], step: int) -> ImageParams:
    """A1111's parameters of a grid's first image (what A1111 itself stores for a grid)."""
    return ImageParams(prompt=cfg.prompts[0], seed=cfg.seed, steps=cfg.steps, guidance=cfg.guidance,
                       scheduler=cfg.scheduler, width=size[0], height=size[1], model=model_reference(model),
                       step=step)


def cell_records(grid: LabelledGrid, prompts: list[str], seeds: list[int], kinds: list[str]) -> list[dict]:
    """Each cell's prompt, seed, base/LoRA and box, in the grid's order (rows of `kinds` within each prompt)."""
    cells = [{"prompt": p, "seed": s, "lora": kind == LORA} for p in prompts for kind in kinds for s in seeds]
    return [{**cell, "box": list(box)} for cell, box in zip(cells, grid.boxes)]


def validation_grid(images: list, cfg: ValidationConfig, model: str, step: int):
    """(labelled grid, parameters, cells) of the images drawn at `step` with the LoRA in training."""
    size = images[0].size
    grid = labelled_grid(images, list(cfg.prompts), seed_columns(cfg.seed, cfg.num_images),
                         f"step {step} · {LORA} (in training) · {settings_text(cfg, size)}")
    seeds = [cfg.seed + k for k in range(cfg.num_images)]
    return grid, first_image_params(cfg, model, size, step), cell_records(grid, cfg.prompts, seeds, [LORA])


def before_after_grid(base: list, lora: list, cfg: ValidationConfig, model: str, step: int):
    """(labelled grid, parameters, cells): for each prompt its base row, then its LoRA row, the same seeds."""
    n, size = cfg.num_images, base[0].size
    images = [image for p in range(len(cfg.prompts)) for image in base[p * n:(p + 1) * n] + lora[p * n:(p + 1) * n]]
    rows = [f"{kind}: {prompt}" for prompt in cfg.prompts for kind in (BASE, LORA)]
    grid = labelled_grid(images, rows, seed_columns(cfg.seed, n),
                         f"step {step} · base vs {LORA}, same seeds · {settings_text(cfg, size)}")
    seeds = [cfg.seed + k for k in range(n)]
    return grid, first_image_params(cfg, model, size, step), cell_records(grid, cfg.prompts, seeds, [BASE, LORA])
