"""LoRA files into a loaded pipeline, for generating and fusing.

A file is read by read_lora (any common layout, every key understood or an error), checked against the
pipeline's own layers, and handed to diffusers' load_lora_weights as an in-memory kohya state dict in fp32: the
one layout whose per-module alpha diffusers honours for every model part, so rank and alpha load exactly.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..console import brief
from ..errors import FinetuneError
from ..family import Family
from .kohya import peft_to_kohya
from .lora_weights import LoraWeights, fit_to_models, read_lora

PARTS = ("unet", "text_encoder", "text_encoder_2")


def pipeline_parts(pipe) -> dict:
    """The pipeline's models a LoRA can sit on, by the names LoRA files use."""
    return {name: getattr(pipe, name) for name in PARTS if getattr(pipe, name, None) is not None}


def load_lora(pipe, path: str | Path, adapter_name: str, family: Family | None = None, key: str = "--lora",
              partial: bool = False, weights: LoraWeights | None = None) -> list[str]:
    """Load one LoRA file (or run folder) into `pipe` as adapter `adapter_name` (`weights`: the file, already
    read).

    Every layer must fit one of the pipeline's (same module, same shapes); with `partial` (a LoRA trained on a
    base model, loaded into a variant of it such as its inpainting model) those that do not are left out and
    returned, so the caller can say which."""
    weights = weights or read_lora(path, pipe.unet.config, family)
    fitting, unfit = fit_to_models(weights, pipeline_parts(pipe))
    if unfit and (not partial or not fitting.layers):
        raise FinetuneError(f"{key} {path}: {len(unfit)} of its layers do not fit this model (e.g. "
                            f"{', '.join(unfit[:3])}); was it trained on another base model?")
    try:
        pipe.load_lora_weights(peft_to_kohya(fitting, torch.float32), adapter_name=adapter_name)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        reason = brief(exc, 200)
        raise FinetuneError(f"{key} {path}: could not be loaded ({reason})") from None
    return unfit
