"""Helpers the tests import (fixtures live in conftest.py)."""
from __future__ import annotations

from pathlib import Path

from PIL import Image

SD15 = "recipes/configs/sd15_dreambooth_lora.yaml"
SDXL = "recipes/configs/sdxl_dreambooth_lora.yaml"
# The shared trained runs (conftest.py: trained_sd1, trained_sdxl): alpha != rank, so a reader that drops alpha shows.
TRAINED_SD1 = {"prior.num_class_images": 0, "lora.rank": 2, "lora.alpha": 6, "lora.text_encoder": "true",
               "train.max_steps": 2, "export.kohya": "true", "train.learning_rate": 5e-2}
TRAINED_SDXL = {"lora.rank": 2, "lora.alpha": 4, "lora.text_encoder": "true", "train.max_steps": 2,
                "train.batch_size": 1, "train.learning_rate": 5e-2}


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


def random_lora(base: Path, out: Path, seed: int = 0, text_encoder: bool = True) -> Path:
    """A LoRA file as finetune exports it (rank 2, alpha 4, all attention), with random up-weights, so that it
    changes every output of the model at `base`: a stand-in for a trained LoRA where training is not the point."""
    import torch

    from finetune.config import LoraConfig
    from finetune.export.diffusers_format import save_diffusers_lora
    from finetune.family import resolve_family
    from finetune.lora import add_text_encoder_lora, add_unet_lora

    family = resolve_family(str(base))
    pipe = family.pipeline_class().from_pretrained(base)
    lora = LoraConfig(rank=2, alpha=4.0, unet_targets="all_attention", text_encoder=text_encoder)
    add_unet_lora(pipe.unet, lora)
    encoders = {name: getattr(pipe, name) for name in ("text_encoder", "text_encoder_2")
                if text_encoder and getattr(pipe, name, None) is not None}
    for encoder in encoders.values():
        add_text_encoder_lora(encoder, lora)
    g = torch.Generator().manual_seed(seed)
    for model in [pipe.unet, *encoders.values()]:
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data = torch.randn(param.shape, generator=g) * 0.2
    return save_diffusers_lora(out, type(pipe), pipe.unet, encoders,
                               {"family": family.name, "base_model": str(base), "trigger": "sks"})

