"""Validation images while training: fixed prompts and seeds, a grid per validation, base vs LoRA at the end.

The images come from the training pipeline itself (the same U-Net and text encoders, LoRA in place), so what is
drawn is what would be exported. Drawing must not change training: it runs with its own seeded generators, on
a forked global RNG, and puts every module back on the device it came from.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ValidationConfig
from ..data.images import to_image
from ..inference import generate, set_scheduler
from ..lora import lora_disabled
from ..pnginfo import save_png
from ..run_files import BEFORE_AFTER, SAMPLES
from .validation_grids import before_after_grid, validation_grid

log = logging.getLogger("finetune")


class Validator:
    """Draws cfg.prompts with the training pipeline; `lora_models` are the modules carrying LoRA."""

    def __init__(self, cfg: ValidationConfig, accelerator, pipe, lora_models: list, output_dir: str | Path,
                 resolution: int, metrics=None, base_prompts: list[str] | None = None):
        self.cfg, self.accelerator, self.pipe, self.lora_models = cfg, accelerator, pipe, lora_models
        # The base model's images take the prompts as the user wrote them (lora.pivotal's tokens are the LoRA's).
        self.base_prompts = base_prompts or cfg.prompts
        self.folder, self.resolution = Path(output_dir) / SAMPLES, resolution
        self.metrics, self.base = metrics, None  # validation.metrics: finetune.evaluation's scorer; base embeddings
        if cfg.prompts:
            set_scheduler(pipe, cfg.scheduler, "validation.scheduler")
            pipe.set_progress_bar_config(disable=True)

    def due(self, step: int) -> bool:
        return bool(self.cfg.prompts and self.cfg.every and step % self.cfg.every == 0)

    def validate(self, step: int) -> Path | None:
        """Grid of every prompt (rows) x seed (columns) at this step: samples/step-N.png and TensorBoard."""
        if not self.cfg.prompts:
            return None
        path = None
        if self.accelerator.is_main_process:
            images = self.draw()
            labelled = validation_grid(images, self.cfg, self.pipe.name_or_path, step)
            path = self.save(labelled, f"step-{step:06d}.png", "validation", step)
            if self.metrics is not None:
                self.log_metrics(images, step)
        self.accelerator.wait_for_everyone()
        return path

    def log_metrics(self, images: list, step: int) -> None:
        """validation.metrics: this grid's scores in TensorBoard, and once (at step 0) the base model's, whose
        images, drawn the first time, are also what prior drift compares with."""
        if self.base is None:
            with lora_disabled(self.lora_models):
                self.base = self.metrics.embed(self.draw(self.base_prompts))
            self.accelerator.log(self.metrics.scores(self.base, self.base), step=0)
        self.accelerator.log(self.metrics.scores(self.metrics.embed(images), self.base), step=step)

    def before_after(self, step: int) -> Path | None:
        """Base model and LoRA, same prompts and seeds: for each prompt a base row, then a LoRA row."""
        if not (self.cfg.prompts and self.cfg.before_after):
            return None
        path = None
        if self.accelerator.is_main_process:
            with lora_disabled(self.lora_models):
                base = self.draw(self.base_prompts)
            labelled = before_after_grid(base, self.draw(), self.cfg, self.pipe.name_or_path, step)
            path = self.save(labelled, BEFORE_AFTER, "before_after", step)
        self.accelerator.wait_for_everyone()
        return path

    @torch.no_grad()
    def draw(self, prompts: list[str] | None = None) -> list:
        """cfg.num_images images per prompt (default: cfg.prompts); image k from seed + k. The VAE decodes in fp32
        (SDXL's overflows in fp16), so the pipeline stops at latents."""
        device = self.accelerator.device
        cuda = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda), on_device(self.pipe, device), self.accelerator.autocast():
            latents: Any = generate(self.pipe, prompts or self.cfg.prompts, self.cfg.num_images, self.cfg.seed,
                                    self.cfg.steps, self.cfg.guidance, self.resolution, progress=False,
                                    output_type="latent")
            vae = self.pipe.vae
            shift = getattr(vae.config, "shift_factor", None) or 0.0
            images = []
            for latent in latents:
                latent = latent[None].to(device, torch.float32) / vae.config.scaling_factor + shift
                with torch.autocast(device.type, enabled=False):
                    images.append(to_image(vae.decode(latent.to(vae.dtype)).sample[0]))
        return images

    def save(self, labelled, name: str, tag: str, step: int) -> Path:
        """`labelled`: (grid with its legend, its parameters, its cells), written into the PNG."""
        grid, params, cells = labelled
        self.folder.mkdir(parents=True, exist_ok=True)
        path = save_png(grid.image, self.folder / name, params, cells)
        grid = grid.image
        try:
            writer = self.accelerator.get_tracker("tensorboard", unwrap=True)
        except (ValueError, KeyError, AttributeError):
            writer = None
        if writer is not None and hasattr(writer, "add_image"):
            writer.add_image(tag, np.asarray(grid), step, dataformats="HWC")
            writer.flush()
        log.info("validation images: %s", path)
        return path


@contextlib.contextmanager
def on_device(pipe, device):
    """Move the pipeline's modules to `device` (keeping their dtypes), and back to where each was afterwards."""
    modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    places = [next(m.parameters()).device for m in modules]
    for module in modules:
        module.to(device)
    try:
        yield
    finally:
        for module, place in zip(modules, places):
            module.to(place)
