"""Helpers the tests import (fixtures live in conftest.py)."""
from __future__ import annotations

from pathlib import Path

from PIL import Image

SDXL = "recipes/configs/sdxl_dreambooth_lora.yaml"


def tiny_overrides(model: Path, photos: Path, out: Path, **extra) -> list[str]:
    """Overrides that make a shipped SD config train a tiny model in seconds on a CPU."""
    values = {
        "model.pretrained": model, "data.instance_dir": photos, "data.class_dir": out / "class_images",
        "output_dir": out / "run", "prior.num_class_images": 4, "prior.generation_steps": 2,
        "train.resolution": 64, "train.max_steps": 4, "train.mixed_precision": "no", "train.optimizer": "adamw",
        "train.checkpoint_every": 0, "train.log_every": 1, "train.learning_rate": 1e-3,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def sdxl_overrides(model: Path, photos: Path, out: Path, **extra) -> list[str]:
    """Overrides that make the shipped SDXL config train the tiny SDXL model in seconds on a CPU."""
    values = {"model.pretrained": model, "data.instance_dir": photos, "output_dir": out / "run",
              "prior.num_class_images": 0, "train.resolution": 128, "train.max_steps": 3, "train.batch_size": 2,
              "train.mixed_precision": "no", "train.optimizer": "adamw", "train.checkpoint_every": 0,
              "train.log_every": 1, "train.learning_rate": 1e-3, "train.gradient_checkpointing": "false",
              "validation.prompts": "[]", "data.trigger": "sks cat"}
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def add_wide_photo(photos: Path) -> None:
    """A landscape photo (its own bucket beside the square crops), captioned with the trigger placeholder."""
    Image.open(photos / "cat_0.jpg").resize((256, 96)).save(photos / "wide.jpg")
    (photos / "wide.caption").write_text("{trigger}, lying in the grass")


def objective(unet_call, scheduler, latents, prompts, examples, prior_weight: float = 1.0, loss=None,
              seed: int = 0, sdxl: bool = False):
    """The recipes' DreamBoothObjective on given pieces: `prompts` a PromptEmbeddings (SDXLPromptEmbeddings with
    sdxl=True), default data settings (each sample's own prompt), on the CPU."""
    from finetune.config import DreamBoothConfig, LossConfig, PriorConfig, TrainConfig
    from finetune.sdxl import time_ids
    from finetune.training.loss import DreamBoothObjective

    def sd_conditioning(texts, geometry):
        return (prompts(texts),)

    def sdxl_conditioning(texts, geometry):
        embeddings, pooled = prompts(texts)
        return embeddings, pooled, time_ids(geometry, embeddings.device, embeddings.dtype)

    cfg = DreamBoothConfig(prior=PriorConfig(loss_weight=prior_weight), loss=loss or LossConfig(),
                           train=TrainConfig(seed=seed))
    return DreamBoothObjective(unet_call, scheduler, latents, sdxl_conditioning if sdxl else sd_conditioning,
                               examples, cfg, "cpu")
