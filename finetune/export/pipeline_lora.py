"""LoRA files into a loaded pipeline, for generating and fusing.

A file is read by read_lora (any common layout, every key understood or an error), checked against the
pipeline's own layers, and handed to diffusers' load_lora_weights as an in-memory kohya state dict in fp32: the
one layout whose per-module alpha diffusers honours for every model part, so rank and alpha load exactly. DoRA goes
in diffusers' own layout instead (its SD readers drop a kohya file's dora_scale), with alpha / rank multiplied into
lora_B, which leaves the update and so DoRA's norms as they were. LoHa and LoKr, which diffusers does not read, are
refused in one line.
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers.utils import convert_state_dict_to_diffusers

from ..console import brief
from ..errors import FinetuneError
from ..family import Family
from .adapters import NAMES
from .convert import DIFFUSERS_KINDS
from .diffusers_format import magnitude_named_for_text_encoders
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
    if weights.kind not in DIFFUSERS_KINDS:
        raise FinetuneError(f"{key} {path}: a {NAMES[weights.kind]} file; diffusers' load_lora_weights (which "
                            f"generating and fusing go through) does not read {NAMES[weights.kind]}: load its kohya "
                            "file in ComfyUI, A1111 or Forge")
    fitting, unfit = fit_to_models(weights, pipeline_parts(pipe))
    if unfit and (not partial or not fitting.layers):
        raise FinetuneError(f"{key} {path}: {len(unfit)} of its layers do not fit this model (e.g. "
                            f"{', '.join(unfit[:3])}); was it trained on another base model?")
    state = dora_state_dict(fitting) if fitting.kind == "dora" else peft_to_kohya(fitting, torch.float32)
    try:
        pipe.load_lora_weights(state, adapter_name=adapter_name)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        reason = brief(exc, 200)
        raise FinetuneError(f"{key} {path}: could not be loaded ({reason})") from None
    return unfit


def dora_state_dict(weights: LoraWeights) -> dict[str, torch.Tensor]:
    """A DoRA as diffusers' own layout in memory: `component.`-prefixed keys, alpha / rank in lora_B (diffusers takes
    alpha = rank for a state dict without adapter metadata), text encoders' magnitudes named as their loader wants."""
    out = {}
    for component, part in weights.layers.items():
        scale = weights.alpha[component] / weights.rank(component)
        scaled = {k: v * scale if k.endswith("lora_B.weight") else v for k, v in part.items()}
        layers = magnitude_named_for_text_encoders(component, convert_state_dict_to_diffusers(scaled))
        out.update({f"{component}.{k}": v.float() for k, v in layers.items()})
    return out
