"""Diffusers pipeline -> one .safetensors checkpoint in the original Stable Diffusion (LDM) key layout.

The layout A1111, ComfyUI and diffusers' from_single_file read: `model.diffusion_model.*` (U-Net),
`first_stage_model.*` (VAE), `cond_stage_model.transformer.*` (SD 1.x's CLIP text encoder). This is the inverse
of diffusers' single_file_utils conversion, written per block type. SD 1.x only: SD 2.x and SDXL store OpenCLIP
text encoders with fused q/k/v projections, which this module does not write.
"""
from __future__ import annotations

import re

import torch

from ..errors import FinetuneError

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_key(key: str, config) -> str:
    """One diffusers U-Net key -> its LDM name (without the model.diffusion_model. prefix)."""
    per_level = config["layers_per_block"] + 1
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
    for old, new in fixed.items():
        if key.startswith(old + "."):
            return new + key[len(old):]
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        block = f"input_blocks.{1 + level * per_level + j}"
        return f"{block}.0.{_resnet(rest)}" if kind == "resnets" else f"{block}.1.{rest}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * per_level}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
        if m[1] == "attentions":
            return f"middle_block.1.{m[3]}"
        return f"middle_block.{2 * int(m[2])}.{_resnet(m[3])}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block = f"output_blocks.{int(m[1]) * per_level + int(m[3])}"
        return f"{block}.0.{_resnet(m[4])}" if m[2] == "resnets" else f"{block}.1.{m[4]}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        has_attention = "CrossAttn" in config["up_block_types"][int(m[1])]
        return f"output_blocks.{int(m[1]) * per_level + per_level - 1}.{2 if has_attention else 1}.conv.{m[2]}"
    raise FinetuneError(f"single-file export: U-Net key {key} has no place in the original layout")


def _resnet(rest: str) -> str:
    name, _, param = rest.rpartition(".")
    return f"{RESNET.get(name, name)}.{param}"


def vae_key(key: str, num_levels: int) -> str:
    """One diffusers VAE key -> its LDM name (without the first_stage_model. prefix)."""
    key = key.replace("conv_norm_out", "norm_out")
    key = re.sub(r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.",
                 lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.", key)
    key = re.sub(r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.mid.attn_1.", key)
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key)
    # The decoder's levels run the other way: up_blocks.0 is the deepest, LDM's up.0 the shallowest.
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.",
                 lambda m: f"decoder.up.{num_levels - 1 - int(m[1])}.block.", key)
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                 lambda m: f"decoder.up.{num_levels - 1 - int(m[1])}.upsample.", key)
    for old, new in {**VAE_RESNET, **VAE_ATTENTION}.items():
        key = key.replace(f".{old}.", f".{new}.")
    return key


def ldm_state_dict(pipe) -> dict[str, torch.Tensor]:
    """The whole SD 1.x pipeline's weights under original SD key names."""
    if getattr(pipe, "text_encoder_2", None) is not None or pipe.unet.config.get("use_linear_projection"):
        raise FinetuneError("single-file export writes SD 1.x models only; for SD 2.x/SDXL give --out a folder")
    out = {}
    for key, value in pipe.unet.state_dict().items():
        out["model.diffusion_model." + unet_key(key, pipe.unet.config)] = value
    levels = len(pipe.vae.config.block_out_channels)
    for key, value in pipe.vae.state_dict().items():
        name = vae_key(key, levels)
        if ".attn_1." in name and name.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's VAE attention uses 1x1 convolutions
        out["first_stage_model." + name] = value
    for key, value in pipe.text_encoder.state_dict().items():
        key = key if key.startswith("text_model.") else "text_model." + key
        out["cond_stage_model.transformer." + key] = value
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}
