"""A full model with a LoRA fused in: a diffusers folder, or one original-layout .safetensors checkpoint."""
from __future__ import annotations

import json
import os
from pathlib import Path

from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import save_file

from ..config import ModelConfig
from ..console import brief
from ..errors import FinetuneError
from ..files import follow_umask, scratch_path
from ..models import load_pipeline
from .lora_weights import lora_file
from .single_file import ldm_state_dict


def pipeline_class_of(base: str):
    """SDXL or SD: from a diffusers folder's model_index.json (a Hub id or single file is taken as SD)."""
    index = Path(base) / "model_index.json"
    if index.is_file() and "XL" in json.loads(index.read_text()).get("_class_name", ""):
        return StableDiffusionXLPipeline
    return StableDiffusionPipeline


def fuse_lora_into(base: ModelConfig, lora: str | Path, scale: float, out: str | Path) -> Path:
    """Load the base model, fuse the LoRA (either format) at `scale`, and save the plain model to `out`:
    a folder (save_pretrained) or, when `out` ends in .safetensors, a single SD 1.x checkpoint."""
    out = Path(out)
    pipe = load_pipeline(base, pipeline_class_of(base.pretrained))
    try:
        pipe.load_lora_weights(str(lora_file(lora)), adapter_name="fused")
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise FinetuneError(f"{lora}: could not be loaded onto {base.pretrained} ({brief(exc, 200)})") from None
    pipe.fuse_lora(lora_scale=scale, adapter_names=["fused"])
    pipe.unload_lora_weights()  # drop the adapter modules; the fused base weights stay
    if out.suffix == ".safetensors":
        state = ldm_state_dict(pipe)
        out.parent.mkdir(parents=True, exist_ok=True)
        scratch = scratch_path(out, "fused")  # not mkstemp: its 0600 would outlive the rename
        save_file(state, scratch, metadata={"format": "pt", "finetune.lora": str(lora), "finetune.scale": str(scale),
                                            "finetune.base_model": base.pretrained})
        os.replace(follow_umask(scratch), out)  # safetensors writes 0600 (finetune.files)
    else:
        pipe.save_pretrained(out, safe_serialization=True)
        follow_umask(out)
    return out
