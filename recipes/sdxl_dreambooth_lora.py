"""DreamBooth-LoRA for Stable Diffusion XL: a few photos of a subject (any shape, captioned or not) in, a LoRA out.

    finetune train recipes/configs/sdxl_dreambooth_lora.yaml data.instance_dir=photos/ output_dir=runs/dog

The algorithm is DreamBooth-LoRA's, with SDXL's conditioning: both text encoders (penultimate hidden states side
by side) plus the second one's pooled embedding, and each sample's original size, crop corner and target size.
Photos train in aspect-ratio buckets at about resolution^2 pixels. The VAE stays fp32 (it overflows in fp16).
Only the conditioning differs from the SD recipe (finetune.training.conditioning.SDXL); the algorithm is its.
"""
from __future__ import annotations

import dataclasses

from finetune.config import DataConfig, DreamBoothConfig, LoraConfig, ModelConfig, TrainConfig, option
from finetune.training.conditioning import SDXL
from recipes.dreambooth_lora import Result, train

RECIPE = "sdxl_dreambooth_lora"


@dataclasses.dataclass
class Config(DreamBoothConfig):
    """DreamBoothConfig's sections, with SDXL's defaults where they differ."""
    model: ModelConfig = option(ModelConfig(pretrained="stabilityai/stable-diffusion-xl-base-1.0"), "the base model")
    data: DataConfig = option(DataConfig(buckets=True), "subject photos, captions and buckets")
    lora: LoraConfig = option(LoraConfig(), "where LoRA goes (lora.text_encoder: both text encoders) and its size")
    train: TrainConfig = option(TrainConfig(resolution=1024), "the optimisation")
    output_dir: str = option("runs/sdxl-dreambooth-lora", "checkpoints, TensorBoard logs, samples and the LoRA")


def main(cfg: Config) -> Result:
    """DreamBooth-LoRA's algorithm (recipes/dreambooth_lora.py) with SDXL's conditioning."""
    return train(cfg, SDXL, RECIPE)
