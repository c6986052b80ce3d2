"""The kohya LoRA format that AUTOMATIC1111, Forge and ComfyUI read (and diffusers' load_lora_weights too).

One key per module and tensor: `lora_unet_<module path with _>` for the U-Net, `lora_te_` for the text encoder
(`lora_te1_` / `lora_te2_` for SDXL's two), then `.lora_down.weight` (peft's lora_A), `.lora_up.weight`
(lora_B) and `.alpha`, which holds the true alpha: the UIs scale by alpha / rank, as peft does. U-Net module
paths keep diffusers' block names (down_blocks_1_attentions_0_...), as sd-scripts writes them for SD 1.x/2.x;
A1111's and ComfyUI's loaders map them to the original layout, for SDXL as well.

DoRA, LoHa and LoKr modules use LyCORIS' part names instead of lora_down/lora_up (export/adapters.py).
This module writes the format; reading (ours and other trainers' files) is lora_weights.read_lora's, through
diffusers' own converter. We keep our own writer because diffusers' (`convert_state_dict_to_kohya`) stores
alpha = rank, which changes the LoRA's strength in the UIs whenever alpha != rank.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import FinetuneError
from ..storage import save_safetensors_atomically
from .adapters import to_kohya_parts
from .lora_weights import LoraWeights, module_parts

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def prefixes(sdxl: bool) -> dict[str, str]:
    return {"unet": "lora_unet", "text_encoder": "lora_te1" if sdxl else "lora_te", "text_encoder_2": "lora_te2"}


def kohya_name(component: str, module: str, sdxl: bool) -> str:
    """'down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k' -> 'lora_unet_down_blocks_0_..._attn2_to_k'."""
    if component != "unet" and not module.startswith("text_model."):
        module = "text_model." + module  # transformers 5's CLIPTextModel has no text_model wrapper; the UIs' has
    return f"{prefixes(sdxl)[component]}_{module.replace('.', '_')}"


def peft_to_kohya(weights: LoraWeights, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Key names, dtypes and per-module alpha of the kohya format (LyCORIS' part names for DoRA, LoHa, LoKr)."""
    out = {}
    for component, layers in weights.layers.items():
        alpha = torch.tensor(float(weights.alpha[component]), dtype=torch.float32)  # fp32: the exact alpha
        rank = weights.rank(component)
        for module, parts in module_parts(layers).items():
            name = kohya_name(component, module, weights.is_sdxl)
            for part, value in to_kohya_parts(weights.kind, parts, rank, float(alpha)).items():
                out[f"{name}.{part}"] = value.to(dtype).contiguous()
            out[f"{name}.alpha"] = alpha.clone()
    return out


def save_kohya_lora(path: str | Path, weights: LoraWeights, metadata: dict[str, str], precision: str = "fp16",
                    extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the kohya file atomically (an interrupted save leaves the old file intact); `extra` tensors (bundled
    embeddings) go in beside the LoRA's."""
    if precision not in DTYPES:
        raise FinetuneError(f"kohya precision {precision!r}: choose one of {', '.join(DTYPES)}")
    return save_safetensors_atomically({**peft_to_kohya(weights, DTYPES[precision]), **(extra or {})}, path, metadata)
