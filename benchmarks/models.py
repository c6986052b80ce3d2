"""Random-weight pipelines with the real SD1.5 and SDXL architectures, built offline.

Step time and memory do not depend on weight values, so these stand in for the published checkpoints in
benchmarks. The tokenizer is finetune's small CLIP BPE one; the text encoders keep CLIP's real vocabulary size.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from finetune.tiny import save_tokenizer, tiny_tokenizer

CLIP_VOCAB = 49408


def clip_text_config(hidden: int, layers: int, heads: int, act: str, eos: int) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=CLIP_VOCAB, hidden_size=hidden, intermediate_size=4 * hidden,
                          num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                          hidden_act=act, projection_dim=hidden, bos_token_id=eos - 1, eos_token_id=eos,
                          pad_token_id=eos)


def sd_vae(scaling_factor: float, size: int) -> AutoencoderKL:
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                         block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, sample_size=size, scaling_factor=scaling_factor)


def sd15_models(eos: int) -> dict:
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        attention_head_dim=8, cross_attention_dim=768,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    return {"unet": unet, "vae": sd_vae(0.18215, 512),
            "text_encoder": CLIPTextModel(clip_text_config(768, 12, 12, "quick_gelu", eos))}


def sdxl_models(eos: int) -> dict:
    unet = UNet2DConditionModel(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816)
    return {"unet": unet, "vae": sd_vae(0.13025, 1024),
            "text_encoder": CLIPTextModel(clip_text_config(768, 12, 12, "quick_gelu", eos)),
            "text_encoder_2": CLIPTextModelWithProjection(clip_text_config(1280, 32, 20, "gelu", eos))}


def build_sd15(folder: str | Path) -> Path:
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(**sd15_models(len(tokenizer) - 1), tokenizer=tokenizer, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    save_tokenizer(tokenizer, Path(folder) / "tokenizer")
    return Path(folder)


def build_sdxl(folder: str | Path) -> Path:
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    models = {name: model.half() for name, model in sdxl_models(len(tokenizer) - 1).items()}
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(**models, tokenizer=tokenizer, tokenizer_2=tiny_tokenizer(), scheduler=scheduler)
    pipe.save_pretrained(folder, safe_serialization=True)  # fp16 weights, like the published fp16 variant
    save_tokenizer(tokenizer, Path(folder) / "tokenizer")
    save_tokenizer(tokenizer, Path(folder) / "tokenizer_2")
    return Path(folder)


def write_configs(arch: str, folder: str | Path) -> Path:
    """Only the models' config.json files (no weights, nothing allocated): what `finetune plan` reads."""
    from accelerate import init_empty_weights
    with init_empty_weights():
        models = {"sd15": sd15_models, "sdxl": sdxl_models}[arch](CLIP_VOCAB - 1)
    for name, model in models.items():
        (model.save_config if hasattr(model, "save_config") else model.config.save_pretrained)(Path(folder) / name)
    return Path(folder)


if __name__ == "__main__":
    arch, out = sys.argv[1], sys.argv[2]
    path = {"sd15": build_sd15, "sdxl": build_sdxl}[arch](out)
    print(f"built {arch} at {path}")
