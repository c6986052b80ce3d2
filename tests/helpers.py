"""Helpers the tests import (fixtures live in conftest.py)."""
from __future__ import annotations

from pathlib import Path


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
