"""The kohya LoRA format that AUTOMATIC1111, Forge and ComfyUI read (and diffusers' load_lora_weights too).

One key per module and tensor: `lora_unet_<module path with _>` for the U-Net, `lora_te_` for the text encoder
(`lora_te1_` / `lora_te2_` for SDXL's two), then `.lora_down.weight` (peft's lora_A), `.lora_up.weight`
(lora_B) and `.alpha`, which holds the true alpha: the UIs scale by alpha / rank, as peft does. U-Net module
paths keep diffusers' block names (down_blocks_1_attentions_0_...), as sd-scripts writes them for SD 1.x/2.x;
A1111's and ComfyUI's loaders map them to the original layout, for SDXL as well.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import FinetuneError
from ..files import follow_umask, scratch_path
from .lora_weights import LoraWeights

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

# Module-path pieces that contain "_" themselves; everything else in a kohya name is "." turned into "_".
COMPOUND_NAMES = sorted([
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out", "proj_in",
    "proj_out", "conv_in", "conv_out", "conv_shortcut", "time_emb_proj", "time_embedding", "linear_1", "linear_2",
    "add_embedding", "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "final_layer_norm",
    "layer_norm1", "layer_norm2", "text_projection", "conv_norm_out",
], key=len, reverse=True)


def prefixes(sdxl: bool) -> dict[str, str]:
    return {"unet": "lora_unet", "text_encoder": "lora_te1" if sdxl else "lora_te", "text_encoder_2": "lora_te2"}


def kohya_name(component: str, module: str, sdxl: bool) -> str:
    """'down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k' -> 'lora_unet_down_blocks_0_..._attn2_to_k'."""
    if component != "unet" and not module.startswith("text_model."):
        module = "text_model." + module  # transformers 5's CLIPTextModel has no text_model wrapper; the UIs' has
    return f"{prefixes(sdxl)[component]}_{module.replace('.', '_')}"


def module_path(flat: str) -> str:
    """The inverse of kohya_name's flattening: 'transformer_blocks_0_attn2_to_out_0' -> '...attn2.to_out.0'."""
    dotted = flat.replace("_", ".")
    for name in COMPOUND_NAMES:
        dotted = dotted.replace(name.replace("_", "."), name)
    return dotted


def peft_to_kohya(weights: LoraWeights, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Key names, dtypes and per-module alpha of the kohya format."""
    out = {}
    for component, layers in weights.layers.items():
        alpha = torch.tensor(float(weights.alpha[component]), dtype=torch.float32)  # fp32: the exact alpha
        for module in weights.modules(component):
            name = kohya_name(component, module, weights.is_sdxl)
            out[f"{name}.lora_down.weight"] = layers[f"{module}.lora_A.weight"].to(dtype).contiguous()
            out[f"{name}.lora_up.weight"] = layers[f"{module}.lora_B.weight"].to(dtype).contiguous()
            out[f"{name}.alpha"] = alpha.clone()
    return out


def kohya_to_peft(tensors: dict[str, torch.Tensor], path: Path):
    """(component -> peft state dict, component -> alpha) from a kohya file's tensors."""
    by_prefix = {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder",
                 "lora_te2": "text_encoder_2"}
    layers, alphas = {}, {}
    for key, value in tensors.items():
        name, _, kind = key.partition(".")
        prefix, flat = _split(name)
        component = by_prefix.get(prefix)
        if component is None or kind not in ("lora_down.weight", "lora_up.weight", "alpha"):
            raise FinetuneError(f"{path}: key {key} is not a plain LoRA layer (LoCon/LoHa/DoRA files are not "
                                "supported)")
        module = module_path(flat)
        if kind == "alpha":
            alphas.setdefault(component, {})[module] = float(value.item())
        else:
            peft_kind = "lora_A" if kind == "lora_down.weight" else "lora_B"
            layers.setdefault(component, {})[f"{module}.{peft_kind}.weight"] = value.float()
    weights = LoraWeights(layers, {}, {}, "kohya")
    for component in layers:
        found = set(alphas.get(component, {}).values())
        if len(found) > 1:
            raise FinetuneError(f"{path}: {component} layers have different alphas {sorted(found)}; finetune "
                                "handles one alpha per model part")
        weights.alpha[component] = found.pop() if found else float(weights.rank(component))  # no alpha: = rank
    return weights.layers, weights.alpha


def _split(name: str) -> tuple[str, str]:
    for prefix in ("lora_unet", "lora_te1", "lora_te2", "lora_te"):
        if name.startswith(prefix + "_"):
            return prefix, name[len(prefix) + 1:]
    return "", name


def save_kohya_lora(path: str | Path, weights: LoraWeights, metadata: dict[str, str], precision: str = "fp16") -> Path:
    """Write the kohya file atomically (an interrupted save leaves the old file intact)."""
    if precision not in DTYPES:
        raise FinetuneError(f"kohya precision {precision!r}: choose one of {', '.join(DTYPES)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = peft_to_kohya(weights, DTYPES[precision])
    scratch = scratch_path(path, "kohya")  # not mkstemp: its 0600 would outlive the rename
    try:
        save_file(tensors, scratch, metadata=metadata)
        os.replace(follow_umask(scratch), path)  # safetensors writes 0600 (finetune.files)
    finally:
        if os.path.exists(scratch):
            os.remove(scratch)
    return path
