"""DreamBooth-LoRA for Stable Diffusion 1.x/2.x: a few photos of a subject in, a LoRA file out.

    finetune train recipes/configs/sd15_dreambooth_lora.yaml data.instance_dir=photos/ output_dir=runs/dog

The algorithm: generate class images with the base model (prior preservation); freeze the model and add LoRA to
the U-Net (and optionally the text encoder); encode photos and prompts once; then for each step, noise the
latents of instance + class samples, predict the noise (or v), and take instance MSE + weight x class MSE.
The steps it shares with the SDXL recipe are functions of finetune.training.dreambooth.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from finetune.config import DreamBoothConfig, LossConfig
from finetune.data.dataset import LatentSource, PromptEmbeddings
from finetune.family import require_family
from finetune.models import load_pipeline, training_scheduler
from finetune.training.accelerator import weight_dtype
from finetune.training.distributed import ensure_class_images
from finetune.training.dreambooth import (add_lora, cached_prompts, encode_latents, export_info, micro_batch_loss,
                                          plan_share, prepare_training, start_run, train_and_export)
from finetune.training.loss import batch_loss
from finetune.training.unet_call import training_unet_call

RECIPE = "dreambooth_lora"


@dataclasses.dataclass
class Config(DreamBoothConfig):
    """Every section at its SD 1.x/2.x default (finetune.config.DreamBoothConfig)."""


@dataclasses.dataclass
class Result:
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    export: Path
    steps: int


def main(cfg: Config) -> Result:
    require_family(cfg.model, RECIPE)  # another family's model: one line naming the recipe that trains it
    run = start_run(cfg, RECIPE)  # output folder checked, resume point found, photos screened
    accelerator, train, instance = run.accelerator, cfg.train, run.instance
    device, dtype = accelerator.device, weight_dtype(accelerator)
    pipe = load_pipeline(cfg.model, compute_dtype=dtype)

    # 1. Prior preservation: class images drawn by the base model, before any LoRA touches it.
    classes = ensure_class_images(accelerator, pipe, cfg.data, cfg.prior, train.resolution, train.seed)

    # 2. Freeze the base model and add LoRA; the frozen weights go to half precision, LoRA stays fp32.
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    noise_scheduler = training_scheduler(pipe)
    lora_models = add_lora(unet, vae, {"text_encoder": text_encoder}, cfg.lora, train, device, dtype)

    # 3. Plan this process's share of the samples (its positions in the one global order, from where a resumed
    #    run left off; one aspect-ratio bucket per batch with data.buckets); encode once with the VAE the photos
    #    it will read.
    examples = instance + classes
    plans = plan_share(cfg, run, len(classes))
    latents = encode_latents(vae, examples, plans, len(instance), cfg, device)

    # 4. Optimizer, schedule (in optimizer steps, whatever the process count), Accelerate's wrapping, the resumed
    #    state; every prompt training can see encoded once if the text encoder is frozen.
    training = prepare_training(cfg, run, lora_models, RECIPE)
    unet, text_encoder = training.models["unet"], training.models.get("text_encoder", text_encoder)
    cached = cached_prompts(examples, cfg)
    prompts = PromptEmbeddings(tokenizer, text_encoder, cached or [], cached is not None, device)
    if cached is not None:
        text_encoder.to("cpu")

    # 5. The loop: noise instance + class latents, predict, prior-preservation loss, step (skipped if NaN/Inf);
    #    then the exports.
    unet_call = training_unet_call(unet, dtype, cfg, accelerator, plans)  # replayed CUDA graphs in train.mode=fast
    forward = micro_batch_loss(denoise_step, unet_call, noise_scheduler, latents, prompts, examples, len(instance),
                               cfg, device)
    final = train_and_export(cfg, run, training, plans, forward, pipe, StableDiffusionPipeline,
                             lambda steps: export_info(cfg, pipe, instance, steps, RECIPE, run.photos.buckets),
                             unet_call)
    return Result(training.lora_models["unet"], accelerator.unwrap_model(text_encoder), final, train.max_steps)


def denoise_step(unet_call, noise_scheduler, latents: LatentSource, prompts: PromptEmbeddings, examples, plan,
                 num_instance: int, prior_weight: float, generators: list[torch.Generator],
                 loss: LossConfig = LossConfig(), texts: list[str] | None = None):
    """One forward pass: instance samples first, then class samples, in one batch (of one size); sample k draws
    from generators[k]. `texts` are this step's prompts (caption dropout, tag shuffle); by default each example's
    own prompt. `unet_call(noisy, timesteps, embeddings)` returns the U-Net's prediction."""
    indices = plan.instance + [num_instance + i for i in plan.classes]
    embeddings = prompts(texts if texts is not None else [examples[i].prompt for i in indices])
    return batch_loss(noise_scheduler, latents, plan, num_instance, prior_weight, loss, generators,
                      lambda noisy, timesteps, _: unet_call(noisy, timesteps, embeddings))
