"""Diffusers pipeline -> one .safetensors checkpoint in the original Stable Diffusion (LDM) key layout.

The layout A1111, ComfyUI and diffusers' from_single_file read: `model.diffusion_model.*` (U-Net),
`first_stage_model.*` (VAE), and the text encoders: SD 1.x's CLIP under `cond_stage_model.transformer.*`, SD 2.x's
OpenCLIP under `cond_stage_model.model.*`, SDXL's two under `conditioner.embedders.0.transformer.*` (CLIP) and
`conditioner.embedders.1.model.*` (OpenCLIP). OpenCLIP keeps q/k/v in one fused `in_proj` and its projection
transposed. diffusers only reads this layout (single_file_utils), so this is the inverse of its conversion,
written per block type. diffusers' SD 2.x text encoder has one block fewer than OpenCLIP's (SD 2.x conditions on
the penultimate block's output) and no projection: the file holds the blocks the model has, which is what the
UIs read (they load with strict=False and use the penultimate block).
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


# OpenCLIP's names for the parts of a transformer block (diffusers/transformers name -> OpenCLIP name).
OPENCLIP_BLOCK = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                  "self_attn.out_proj": "attn.out_proj"}
OPENCLIP_FIXED = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                  "text_model.embeddings.position_embedding.weight": "positional_embedding",
                  "text_model.final_layer_norm.weight": "ln_final.weight",
                  "text_model.final_layer_norm.bias": "ln_final.bias"}


def text_state(encoder) -> dict[str, torch.Tensor]:
    """A CLIP text model's weights with the text_model. prefix the original layouts use (transformers 5's
    CLIPTextModel drops it; CLIPTextModelWithProjection keeps it)."""
    return {k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v
            for k, v in encoder.state_dict().items() if not k.endswith("position_ids")}


def openclip_state(encoder, prefix: str) -> dict[str, torch.Tensor]:
    """A CLIP text model's weights in OpenCLIP's layout under `prefix` (q/k/v fused into in_proj)."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[tuple[str, str], dict[str, torch.Tensor]] = {}  # (block, weight or bias) -> q/k/v
    for key, value in text_state(encoder).items():
        block = re.match(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", key)
        if key in OPENCLIP_FIXED:
            out[prefix + OPENCLIP_FIXED[key]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T  # OpenCLIP multiplies by it from the other side
        elif block and block[2] in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            fused.setdefault((block[1], block[3]), {})[block[2].removeprefix("self_attn.")[0]] = value  # q, k or v
        elif block and block[2] in OPENCLIP_BLOCK:
            out[f"{prefix}transformer.resblocks.{block[1]}.{OPENCLIP_BLOCK[block[2]]}.{block[3]}"] = value
        else:
            raise FinetuneError(f"single-file export: text-encoder key {key} has no place in OpenCLIP's layout")
    for (layer, param), parts in fused.items():
        out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{param}"] = torch.cat([parts[c] for c in "qkv"])
    return out


def text_encoder_states(pipe, family) -> dict[str, torch.Tensor]:
    if family.is_sdxl:
        return {**{"conditioner.embedders.0.transformer." + k: v for k, v in text_state(pipe.text_encoder).items()},
                **openclip_state(pipe.text_encoder_2, "conditioner.embedders.1.model.")}
    if family.base == "sd2":
        return openclip_state(pipe.text_encoder, "cond_stage_model.model.")
    return {"cond_stage_model.transformer." + k: v for k, v in text_state(pipe.text_encoder).items()}


def ldm_state_dict(pipe, family) -> dict[str, torch.Tensor]:
    """The whole pipeline's weights under the original key names of its family (finetune.family.Family)."""
    out = {}
    for key, value in pipe.unet.state_dict().items():
        out["model.diffusion_model." + unet_key(key, pipe.unet.config)] = value
    levels = len(pipe.vae.config.block_out_channels)
    for key, value in pipe.vae.state_dict().items():
        name = vae_key(key, levels)
        if ".attn_1." in name and name.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's VAE attention uses 1x1 convolutions
        out["first_stage_model." + name] = value
    out.update(text_encoder_states(pipe, family))
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}
