"""Optimizer and learning-rate schedule."""
from __future__ import annotations

import logging
from typing import Any

import torch
from diffusers.optimization import get_scheduler

from ..config import LR_SCHEDULES, TrainConfig, resolved
from ..errors import ConfigError

log = logging.getLogger("finetune")

# bitsandbytes keeps fp32 state for any tensor under min_8bit_size (default 4096 elements). A rank-4 LoRA matrix of
# SD's attention is 4 x 320 = 1280 elements, so with the default every LoRA tensor would silently get fp32 state.
MIN_8BIT_SIZE = 0


def bitsandbytes_usable(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # a broken CUDA setup raises more than ImportError
        return False
    return True


def build_optimizer(params, train: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """8-bit AdamW (bitsandbytes) on CUDA, keeping 8-bit state for small LoRA tensors; else torch AdamW."""
    kwargs: dict[str, Any] = dict(lr=resolved(train.learning_rate, "train.learning_rate"),
                                  weight_decay=train.weight_decay, betas=(0.9, 0.999), eps=1e-8)
    if train.optimizer == "adamw8bit":
        if bitsandbytes_usable(device):
            import bitsandbytes as bnb
            return bnb.optim.AdamW8bit(params, min_8bit_size=MIN_8BIT_SIZE, **kwargs)
        log.warning("notice: bitsandbytes 8-bit AdamW needs a CUDA GPU; using torch AdamW on %s", device.type)
    # fused: one kernel steps every LoRA tensor (on CUDA), instead of a few per tensor.
    return torch.optim.AdamW(params, fused=device.type == "cuda", **kwargs)


SCHEDULES = LR_SCHEDULES  # a config file's choice is checked when it is read; this covers configs built in Python


def build_lr_scheduler(optimizer, train: TrainConfig):
    """The schedule over train.max_steps, counted in optimizer steps.

    The recipe steps it itself once per optimizer step rather than through accelerator.prepare, which steps a
    scheduler once per process: counted that way, a checkpoint's schedule position would depend on the process
    count and go wrong when resumed with another.
    """
    if train.lr_scheduler not in SCHEDULES:
        raise ConfigError(f"train.lr_scheduler: {train.lr_scheduler!r} is not one of {', '.join(SCHEDULES)}")
    name = "constant_with_warmup" if train.lr_scheduler == "constant" and train.lr_warmup_steps else train.lr_scheduler
    return get_scheduler(name, optimizer=optimizer, num_warmup_steps=train.lr_warmup_steps,
                         num_training_steps=train.max_steps)
