"""Accelerate set-up: precision with a CPU fallback, logging to TensorBoard, quiet libraries."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import AutocastKwargs, ProjectConfiguration

from ..config import TrainConfig

log = logging.getLogger("finetune")


def make_accelerator(train: TrainConfig, output_dir: str | Path, project: str) -> Accelerator:
    """An Accelerator for this run; half precision falls back to fp32 (with a notice) where there is no GPU."""
    precision = train.mixed_precision
    if precision != "no" and not torch.cuda.is_available():
        log.warning("notice: no CUDA GPU, so train.mixed_precision=%s falls back to fp32 (no)", precision)
        precision = "no"
    # train.autocast=false keeps Accelerate's precision (weight dtype, fp16 loss scaler) but not its per-op casts.
    accelerator = Accelerator(
        mixed_precision=precision, gradient_accumulation_steps=train.gradient_accumulation, log_with="tensorboard",
        kwargs_handlers=[AutocastKwargs(enabled=train.autocast)],
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(Path(output_dir) / "logs")))
    return accelerator


def weight_dtype(accelerator: Accelerator) -> torch.dtype:
    """The dtype of the frozen weights: half precision under mixed precision, else fp32."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def flat_hparams(config: dict, prefix: str = "") -> dict:
    """Nested config -> flat {dotted key: scalar} that TensorBoard's hparams accept."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flat_hparams(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat
