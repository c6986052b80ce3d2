"""DreamBooth-LoRA for Stable Diffusion 1.x/2.x: a few photos of a subject in, a LoRA file out.

    finetune train recipes/configs/sd15_dreambooth_lora.yaml data.instance_dir=photos/ output_dir=runs/dog

The algorithm: generate class images with the base model (prior preservation); freeze the model and add LoRA to
the U-Net (and optionally the text encoder); encode photos and prompts once; then for each step, noise the
latents of instance + class samples, predict the noise (or v), and take instance MSE + weight x class MSE.
`train` is the algorithm for every family; the SDXL recipe calls it with SDXL's conditioning.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar

import torch

from finetune.config import DreamBoothConfig, modes_with, resolved
from finetune.evaluation.during_training import validation_scorer
from finetune.export.lora_weights import load_into_models, read_lora
from finetune.family import require_family
from finetune.models import ensure_unet, load_pipeline, training_scheduler
from finetune.training.conditioning import SD, ModelKind
from finetune.training.distributed import ensure_class_images
from finetune.training.dreambooth import (
    add_lora,
    encode_latents,
    encode_prompts,
    plan_share,
    prepare_training,
    start_run,
    text_conditioning,
)
from finetune.training.finish import RunExporter, finish_run
from finetune.training.loop import Checkpointer, train_loop
from finetune.training.loss import DreamBoothObjective
from finetune.training.pivotal import add_pivotal_tokens, with_tokens
from finetune.training.report import steps_done
from finetune.training.unet_call import training_unet_call
from finetune.training.validation import Validator

RECIPE = "dreambooth_lora"


@dataclasses.dataclass
class Config(DreamBoothConfig):
    """Every section at its SD 1.x/2.x default (finetune.config.DreamBoothConfig)."""
    # Fast mode trains the U-Net in channels-last memory format: 26.0 it/s against 24.0 on SD 1.5 (H200, same run,
    # BENCHMARKS.md); SDXL's U-Net ran 4.7% slower with it, so only this family's preset has it.
    modes: ClassVar[dict] = modes_with({"fast": {"train": {"channels_last": True}}})


@dataclasses.dataclass
class Result:
    unet: torch.nn.Module
    text_encoders: list[torch.nn.Module]  # in the pipeline's order, with their LoRA if they trained
    export: Path
    steps: int

    @property
    def text_encoder(self) -> torch.nn.Module:
        return self.text_encoders[0]


def main(cfg: Config) -> Result:
    return train(cfg, SD, RECIPE)


def train(cfg: DreamBoothConfig, kind: ModelKind, recipe: str) -> Result:
    require_family(cfg.model, recipe)  # another family's model: one line naming the recipe that trains it
    run = start_run(cfg, recipe)  # every input checked, the output folder claimed, photos screened (and bucketed)
    phase = run.phases  # each phase prints its time (and GPU peak); they never share the GPU
    with phase("loading weights") as loading:
        pipe = load_pipeline(cfg.model, kind.pipeline_class, compute_dtype=run.dtype)  # a 4-bit U-Net comes later
        loading.add(f"{cfg.model.pretrained} loaded")

    # 1. Prior preservation: class images drawn by the base model, before any LoRA touches it.
    with phase("class images") as drawing:
        classes = ensure_class_images(run.accelerator, pipe, cfg.data, cfg.prior, cfg.train.resolution,
                                      cfg.train.seed, lambda: ensure_unet(pipe, cfg.model, run.dtype), drawing,
                                      vae_tiling=cfg.train.vae_tiling)

    # 2. Encode once: every prompt training can see (text encoders on the GPU, then off), then the photos this
    #    process reads (the VAE on the GPU, then off): its share of the one global sample order, from where a
    #    resumed run left off, one aspect-ratio bucket per batch with data.buckets.
    #    With lora.pivotal the trigger word first becomes new tokens in every tokenizer and text encoder, and
    #    the instance prompts say them instead.
    pivotal, instance = add_pivotal_tokens(cfg, pipe, kind, run.instance)
    examples = instance + classes
    plans = plan_share(cfg, run, len(classes))
    with phase("encoding") as encoding:
        prompts = encode_prompts(kind, pipe, examples, cfg, run, encoding)  # None when the text encoders train
        latents = encode_latents(pipe.vae, examples, plans, cfg, run, encoding)

    # 3. Only now the U-Net comes to the GPU: freeze it and add LoRA (and to the text encoders with
    #    lora.text_encoder), frozen weights in half precision, LoRA in fp32; lora.init_from continues a LoRA.
    #    lora.pivotal's token embeddings train in an optimizer group of their own.
    with phase("LoRA and optimizer"):
        ensure_unet(pipe, cfg.model, run.dtype)
        lora_models = add_lora(pipe, kind, cfg.lora, cfg.train, run)
        if cfg.lora.init_from:
            load_into_models(read_lora(cfg.lora.init_from, pipe.unet.config), lora_models,
                             cfg.lora.init_from)
        # Optimizer, schedule (in optimizer steps, whatever the process count), Accelerate's wrapping, the
        # resumed state.
        training = prepare_training(cfg, run, lora_models, recipe, pivotal)
        conditioning = prompts or text_conditioning(kind, pipe, training, run)

    # 4. The loop: noise instance + class latents, predict, prior-preservation loss, step (skipped if NaN/Inf).
    unet_call = training_unet_call(training.models["unet"], run.dtype, cfg, run.accelerator, plans)
    objective = DreamBoothObjective(unet_call, training_scheduler(pipe), latents, conditioning, examples, cfg,
                                    run.device)
    exporter = RunExporter(cfg, pipe, kind.pipeline_class, training.lora_models, run, recipe, training.ema, pivotal)
    checkpointer = Checkpointer(cfg, run, exporter.write)
    validator = Validator(with_tokens(cfg.validation, pivotal), run.accelerator, pipe,
                          list(training.lora_models.values()), cfg.output_dir, cfg.train.resolution,
                          validation_scorer(cfg, run.instance, run.accelerator), cfg.validation.prompts)
    with phase("training") as training_phase:
        result = train_loop(cfg, run, training, plans, objective, checkpointer, validator)
        training_phase.add(steps_done(run.start, result.summary, unet_call.recording_seconds))
    phase.split_off("training", "graph recording", unet_call.recording_seconds)  # a split entry of its own

    # 5. The end: final checkpoint, the diffusers file, summary, base-vs-LoRA grid, kohya file, card, upload.
    summary = {**result.summary, "cuda_graphs": unet_call.use_graphs}
    final = finish_run(cfg, run, exporter, checkpointer, validator, summary, result.skipped)
    encoders = [training.lora_models.get(name, module) for name, module in kind.text_encoders(pipe).items()]
    return Result(training.lora_models["unet"], encoders, final, resolved(cfg.train.max_steps, "train.max_steps"))
