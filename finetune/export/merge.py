"""A full model with a LoRA fused in: a diffusers folder, or one original-layout .safetensors checkpoint."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..config import ModelConfig
from ..family import resolve_family
from ..models import load_pipeline
from ..storage import follow_umask, save_safetensors_atomically
from .embeddings import embeddings_for, load_into_pipeline
from .metadata import FAMILIES
from .pipeline_lora import load_lora
from .single_file import ldm_state_dict

log = logging.getLogger("finetune")


def fuse_lora_into(base: ModelConfig, lora: str | Path, scale: float, out: str | Path) -> Path:
    """Load the base model (any supported family), fuse the LoRA (any layout) at `scale`, and save the plain
    model to `out`: a folder (save_pretrained) or, when `out` ends in .safetensors, one checkpoint in the
    original layout the UIs load (SD 1.x, SD 2.x and SDXL alike)."""
    out = Path(out)
    family = resolve_family(base, "--base")
    pipe: Any = load_pipeline(base, family.pipeline_class("inpaint" if family.inpainting else "text2img"))
    load_lora(pipe, lora, "fused", family, key="export")
    pipe.fuse_lora(lora_scale=scale, adapter_names=["fused"])
    pipe.unload_lora_weights()  # drop the adapter modules; the fused base weights stay
    embeddings = embeddings_for(lora)
    if out.suffix != ".safetensors":
        for found in embeddings:  # a diffusers folder keeps its tokenizers: the tokens go in with their rows
            load_into_pipeline(pipe, found, found.tokens, "export")
            log.info("notice: the fused model's tokenizers hold %s for %r: write those in its prompts",
                     "".join(found.tokens), found.word)
        pipe.save_pretrained(out, safe_serialization=True)
        return follow_umask(out)  # safetensors writes 0600 (finetune.storage)
    for found in embeddings:
        log.info("notice: a single-file checkpoint has no tokenizer for the %r embeddings: put "
                 "embeddings/%s.safetensors into the UI's embeddings folder beside it", found.word, found.word)
    state = ldm_state_dict(pipe, family)
    # modelspec.* say what the file is (its architecture and prediction type, which the weights do not show)
    header = {"format": "pt", "finetune.lora": str(lora), "finetune.scale": str(scale),
              "finetune.base_model": base.pretrained, "finetune.family": family.name,
              "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": FAMILIES[family.name][1],
              "modelspec.prediction_type": "v" if family.prediction_type == "v_prediction" else "epsilon"}
    return save_safetensors_atomically(state, out, header)
