"""train.max_steps and train.learning_rate when the config leaves them unset: from the photos and lora.type.

The rule comes from the anchors' published settings (README, "Defaults that fit the photos", names them):
- steps: diffusers' DreamBooth-LoRA example (examples/dreambooth/README.md) trains its 5-photo dog set for
  --max_train_steps=500 at batch 1, i.e. each photo seen 100 times. We keep the 100 views per photo for any photo
  count and batch: max_steps = ceil(100 x photos / samples per step), samples per step = batch_size x processes x
  gradient_accumulation (the same count train.scale_lr uses).
- learning rate: LoRA 1e-4, that README's --learning_rate; DoRA the same, as diffusers' train_dreambooth_lora_sdxl.py
  trains --use_dora (PR #7233) with nothing but use_dora changed; LoHa and LoKr 2e-4, LyCORIS' own kohya
  example configs (example_configs/training_configs/kohya/loha_config.toml and lokr_config.toml, unet_lr = 2e-4).
"""
from __future__ import annotations

import dataclasses
import math

from .config import TrainConfig

VIEWS_PER_PHOTO = 100
LEARNING_RATES = {"lora": 1e-4, "dora": 1e-4, "loha": 2e-4, "lokr": 2e-4}
SOURCES = {"lora": "diffusers' DreamBooth-LoRA README",
           "dora": "diffusers' DreamBooth-LoRA README; DoRA trains at LoRA's rate",
           "loha": "LyCORIS' loha_config.toml", "lokr": "LyCORIS' lokr_config.toml"}


def derived_steps(photos: int, train: TrainConfig, num_processes: int = 1) -> int:
    samples = train.batch_size * train.gradient_accumulation * num_processes
    return max(1, math.ceil(VIEWS_PER_PHOTO * photos / samples))


def with_defaults(train: TrainConfig, adapter: str, photos: int, num_processes: int = 1) -> tuple[TrainConfig, str]:
    """(train with max_steps and learning_rate filled in where unset, one line saying what was chosen and why; empty
    when both were given)."""
    said = []
    if train.max_steps is None:
        steps = derived_steps(photos, train, num_processes)
        samples = train.batch_size * train.gradient_accumulation * num_processes
        said.append(f"train.max_steps={steps} ({VIEWS_PER_PHOTO} views of each of {photos} photo"
                    f"{'' if photos == 1 else 's'} at {samples} sample{'' if samples == 1 else 's'} per step, as "
                    "diffusers' DreamBooth-LoRA README: 5 photos, 500 steps)")
        train = dataclasses.replace(train, max_steps=steps)
    if train.learning_rate is None:
        rate = LEARNING_RATES[adapter]
        said.append(f"train.learning_rate={rate:g} (lora.type={adapter}: {SOURCES[adapter]})")
        train = dataclasses.replace(train, learning_rate=rate)
    return train, ("unset, so chose " + "; ".join(said) + "; set them to override") if said else ""
