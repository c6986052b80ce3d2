"""Tiny Stable Diffusion models with the real architectures and random weights, built offline.

They stand in for the real checkpoints in the demo and the tests: the same classes (UNet2DConditionModel,
AutoencoderKL, CLIPTextModel, a CLIP BPE tokenizer), saved in diffusers format and loaded back through the same
code a user's model takes. Random weights draw noise, so callers check shapes, files and measurable changes.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .storage import follow_umask

TINY_RESOLUTION = 64  # pixels; the VAE downsamples 8x, like SD's, so latents are 8x8
TEXT_DIM = 32
# SDXL's second encoder is wider than its first, as OpenCLIP bigG (1280) is than CLIP-L (768): the widths tell the
# encoders apart in a single-file checkpoint.
TEXT_DIM_2 = 48


@lru_cache(maxsize=1)
def _byte_alphabet() -> list[str]:
    """CLIP's byte-to-unicode table: 256 printable characters, one per byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def tiny_vocab() -> tuple[dict[str, int], list[str]]:
    """A character-level CLIP BPE vocabulary (CLIP's byte alphabet, no merges) and its (empty) merge list."""
    alphabet = _byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, []


def tiny_tokenizer() -> CLIPTokenizer:
    vocab, merges = tiny_vocab()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def save_tokenizer(tokenizer: CLIPTokenizer, folder: Path) -> None:
    """Save in the current format and as vocab.json + merges.txt, which older transformers read."""
    tokenizer.save_pretrained(folder)
    vocab, merges = tiny_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")


def tiny_text_encoder(vocab_size: int, projection_dim: int | None = None, with_projection: bool = False,
                      openclip: bool = False, width: int = TEXT_DIM):
    """CLIP's text transformer; `openclip`: with plain GELU, as in OpenCLIP (SD 2.x, SDXL's second encoder),
    instead of OpenAI CLIP's quick GELU (SD 1.x, SDXL's first)."""
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77, bos_token_id=vocab_size - 2,
                            eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
                            hidden_act="gelu" if openclip else "quick_gelu", projection_dim=projection_dim or TEXT_DIM)
    return CLIPTextModelWithProjection(config) if with_projection else CLIPTextModel(config)


def tiny_vae(scaling_factor: float = 0.18215) -> AutoencoderKL:
    return AutoencoderKL(scaling_factor=scaling_factor, in_channels=3, out_channels=3, latent_channels=4,
                         block_out_channels=(16, 16, 32, 32),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=1, norm_num_groups=8, sample_size=TINY_RESOLUTION)


def tiny_unet(family: str, cross_attention_dim: int = TEXT_DIM, in_channels: int = 4,
              **extra) -> UNet2DConditionModel:
    sd2 = family == "sd2"
    return UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 8, in_channels=in_channels, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=cross_attention_dim,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4) if sd2 else 8, use_linear_projection=sd2, **extra)


def build_tiny_sd(folder: str | Path, family: str = "sd1", seed: int = 0, inpainting: bool = False) -> Path:
    """Write a tiny SD1.x ('sd1', epsilon) or SD2.x-v ('sd2', v-prediction) pipeline folder; return its path.
    `inpainting`: an inpainting checkpoint instead, whose U-Net also takes the mask and the masked image's
    latents (9 input channels)."""
    if family not in ("sd1", "sd2"):
        raise ValueError(f"family must be sd1 or sd2, got {family!r}")
    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    schedule = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    if family == "sd1":
        scheduler = PNDMScheduler(skip_prk_steps=True, prediction_type="epsilon", **schedule)
    else:
        scheduler = DDIMScheduler(clip_sample=False, set_alpha_to_one=False, prediction_type="v_prediction",
                                  **schedule)
    text_encoder = tiny_text_encoder(len(tokenizer), openclip=family == "sd2")  # SD 2.x: OpenCLIP
    pipeline_class = StableDiffusionInpaintPipeline if inpainting else StableDiffusionPipeline
    unet = tiny_unet(family, in_channels=9 if inpainting else 4)
    pipe = pipeline_class(vae=tiny_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                          scheduler=scheduler, safety_checker=None, feature_extractor=None,
                          requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    follow_umask(folder)  # safetensors writes 0600 (finetune.storage)
    save_tokenizer(tokenizer, folder / "tokenizer")
    return folder


def build_tiny_sdxl(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny SDXL pipeline folder: two text encoders (the second with projection, giving the pooled
    embedding), the text_time size/crop conditioning, and SDXL's VAE scaling; return its path."""
    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=TEXT_DIM + TEXT_DIM_2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=TEXT_DIM + 6 * time_dim)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(scaling_factor=0.13025), text_encoder=tiny_text_encoder(len(tokenizer)),
        text_encoder_2=tiny_text_encoder(len(tokenizer), with_projection=True, openclip=True, width=TEXT_DIM_2),
        tokenizer=tokenizer, tokenizer_2=tiny_tokenizer(), unet=unet, scheduler=scheduler,
        force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(folder, safe_serialization=True)
    follow_umask(folder)  # safetensors writes 0600 (finetune.storage)
    save_tokenizer(tokenizer, folder / "tokenizer")
    save_tokenizer(tokenizer, folder / "tokenizer_2")
    return folder
