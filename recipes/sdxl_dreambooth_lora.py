"""DreamBooth-LoRA for Stable Diffusion XL: a few photos of a subject (any shape, captioned or not) in, a LoRA out.

    finetune train recipes/configs/sdxl_dreambooth_lora.yaml data.instance_dir=photos/ output_dir=runs/dog

The algorithm is DreamBooth-LoRA's, with SDXL's conditioning: both text encoders (penultimate hidden states side
by side) plus the second one's pooled embedding, and each sample's original size, crop corner and target size.
Photos train in aspect-ratio buckets at about resolution^2 pixels. The VAE stays fp32 (it overflows in fp16).
The steps it shares with the SD recipe are functions of finetune.training.dreambooth.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline

from finetune.config import DataConfig, DreamBoothConfig, LoraConfig, LossConfig, ModelConfig, TrainConfig, option
from finetune.data.dataset import LatentSource
from finetune.family import require_family
from finetune.models import load_pipeline, training_scheduler
from finetune.sdxl import SDXLPromptEmbeddings, time_ids
from finetune.training.accelerator import weight_dtype
from finetune.training.distributed import ensure_class_images
from finetune.training.dreambooth import (add_lora, cached_prompts, encode_latents, export_info, micro_batch_loss,
                                          plan_share, prepare_training, start_run, train_and_export)
from finetune.training.loss import batch_loss
from finetune.training.unet_call import training_unet_call

RECIPE = "sdxl_dreambooth_lora"


@dataclasses.dataclass
class Config(DreamBoothConfig):
    """DreamBoothConfig's sections, with SDXL's defaults where they differ."""
    model: ModelConfig = option(ModelConfig(pretrained="stabilityai/stable-diffusion-xl-base-1.0"), "the base model")
    data: DataConfig = option(DataConfig(buckets=True), "subject photos, captions and buckets")
    lora: LoraConfig = option(LoraConfig(), "where LoRA goes (lora.text_encoder: both text encoders) and its size")
    train: TrainConfig = option(TrainConfig(resolution=1024), "the optimisation")
    output_dir: str = option("runs/sdxl-dreambooth-lora", "checkpoints, TensorBoard logs, samples and the LoRA")


@dataclasses.dataclass
class Result:
    unet: torch.nn.Module
    text_encoders: list[torch.nn.Module]
    export: Path
    steps: int


def main(cfg: Config) -> Result:
    require_family(cfg.model, RECIPE)  # another family's model: one line naming the recipe that trains it
    run = start_run(cfg, RECIPE)  # output folder checked, resume point found, photos screened (and bucketed)
    accelerator, train, instance = run.accelerator, cfg.train, run.instance
    device, dtype = accelerator.device, weight_dtype(accelerator)
    pipe = load_pipeline(cfg.model, StableDiffusionXLPipeline, compute_dtype=dtype)

    # 1. Prior preservation: class images drawn by the base model, before any LoRA touches it.
    classes = ensure_class_images(accelerator, pipe, cfg.data, cfg.prior, train.resolution, train.seed)

    # 2. Freeze everything, add LoRA to the U-Net (and both text encoders); the VAE stays fp32.
    unet, vae, tokenizers = pipe.unet, pipe.vae, [pipe.tokenizer, pipe.tokenizer_2]
    encoders = {"text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    noise_scheduler = training_scheduler(pipe)
    lora_models = add_lora(unet, vae, encoders, cfg.lora, train, device, dtype)

    # 3. This process's share of the samples, one bucket per batch; each (photo, flip, bucket) it reads encoded
    #    once (a class image at every bucket its batches have).
    examples = instance + classes
    plans = plan_share(cfg, run, len(classes))
    latents = encode_latents(vae, examples, plans, len(instance), cfg, device)

    # 4. Optimizer, schedule, Accelerate's wrapping of what trains, the resumed state; prompts encoded once by both
    #    encoders when neither trains.
    training = prepare_training(cfg, run, lora_models, RECIPE)
    unet = training.models["unet"]
    text_encoders = [training.models.get(name, encoder) for name, encoder in encoders.items()]
    cached = cached_prompts(examples, cfg)
    prompts = SDXLPromptEmbeddings(tokenizers, text_encoders, cached or [], cached is not None, device)
    if cached is not None:
        for encoder in text_encoders:
            encoder.to("cpu")

    # 5. The loop: noise instance + class latents of one bucket, predict with SDXL's conditioning, step; then the
    #    exports.
    unet_call = training_unet_call(unet, dtype, cfg, accelerator, plans)  # replayed CUDA graphs in train.mode=fast
    forward = micro_batch_loss(denoise_step, unet_call, noise_scheduler, latents, prompts, examples, len(instance),
                               cfg, device)
    final = train_and_export(cfg, run, training, plans, forward, pipe, StableDiffusionXLPipeline,
                             lambda steps: export_info(cfg, pipe, instance, steps, RECIPE, run.photos.buckets),
                             unet_call)
    return Result(training.lora_models["unet"], [accelerator.unwrap_model(e) for e in text_encoders], final,
                  train.max_steps)


def denoise_step(unet_call, noise_scheduler, latents: LatentSource, prompts: SDXLPromptEmbeddings, examples, plan,
                 num_instance: int, prior_weight: float, generators: list[torch.Generator],
                 loss: LossConfig = LossConfig(), texts: list[str] | None = None):
    """One forward pass over instance then class samples of one bucket, with SDXL's added conditioning: the pooled
    text embedding and each sample's (original size, crop corner, target size)."""
    indices = plan.instance + [num_instance + i for i in plan.classes]
    embeddings, pooled = prompts(texts if texts is not None else [examples[i].prompt for i in indices])

    def predict(noisy, timesteps, geometry):
        return unet_call(noisy, timesteps, embeddings, pooled, time_ids(geometry, noisy.device, embeddings.dtype))

    return batch_loss(noise_scheduler, latents, plan, num_instance, prior_weight, loss, generators, predict)
