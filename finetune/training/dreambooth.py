"""The set-up steps of a DreamBooth-LoRA run, as functions the recipe calls in order (recipes/dreambooth_lora.py).

The run's start (output folder, resume point, photo screening), LoRA on the frozen model, each process's share of
the sample order and its latents, the prompts' conditioning, and the optimizer with Accelerate's wrapping. The loop
is finetune.training.loop; the end of a run (exports, card, upload) is finetune.export.finish.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.training_utils import cast_training_params

from ..config import LoraConfig, TrainConfig
from ..console import log_phase, plural
from ..data.captions import possible_prompts
from ..data.dataset import BatchPlan, Example, LatentSource, SampleOrder, cache_keys, instance_examples, plan_batch
from ..data.screening import PhotoReport, screen_photos
from ..lora import add_text_encoder_lora, add_unet_lora, lora_parameters
from ..models import freeze, is_quantized
from .accelerator import make_accelerator, weight_dtype
from .checkpoint import load_checkpoint, register_lora_only_saving, resume_point
from .conditioning import ModelKind
from .distributed import retarget_learning_rate, samples_per_step, scaled_learning_rate
from .optim import build_lr_scheduler, build_optimizer
from .run_dir import prepare_output_dir
from .tensorboard import start_tensorboard

log = logging.getLogger("finetune")


@dataclasses.dataclass
class Run:
    """What the start of a run settled: its accelerator, where it goes on from, and the photos it trains on."""
    accelerator: Accelerator
    resume_from: Path | None  # the checkpoint to load, or None for a fresh run
    start: int                # optimizer steps already done
    seen: int                 # samples already seen (the offset into the one global sample order)
    instance: list[Example]   # the photos that passed screening
    photos: PhotoReport       # what screening skipped or upscaled; each photo's bucket with data.buckets
    started: float            # time.perf_counter() at the start: the summary's setup time counts from here

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def dtype(self) -> torch.dtype:
        """What the frozen weights compute in (train.mixed_precision)."""
        return weight_dtype(self.accelerator)


def start_run(cfg, recipe: str) -> Run:
    """Accelerator and seed; the output folder checked (writable, not an earlier run's unless resumed or
    overwritten); the resume point; every photo decoded and screened now, not 300 steps in."""
    started, train = time.perf_counter(), cfg.train
    accelerator = make_accelerator(train, cfg.output_dir, recipe)
    set_seed(train.seed)
    resume_from = prepare_output_dir(cfg.output_dir, train.resume, train.overwrite, accelerator.is_main_process)
    start, seen = resume_point(resume_from, samples_per_step(train, accelerator.num_processes))
    instance, photos = screen_photos(instance_examples(cfg.data), train.resolution, cfg.data.on_bad_image,
                                     cfg.data.buckets, cfg.data.allow_upscale)
    return Run(accelerator, resume_from, start, seen, instance, photos, started)


def add_lora(pipe, kind: ModelKind, lora: LoraConfig, train: TrainConfig, run: Run) -> dict[str, torch.nn.Module]:
    """Freeze the base model and add LoRA to the U-Net (and, with lora.text_encoder, to every text encoder);
    the frozen weights go to the run's dtype, the VAE stays fp32 (SDXL's overflows in fp16), LoRA stays fp32.

    Returns the models that carry LoRA by their pipeline names ('unet', 'text_encoder', 'text_encoder_2'), the
    U-Net first: what trains, is saved and exported.
    """
    unet, vae, text_encoders = pipe.unet, pipe.vae, kind.text_encoders(pipe)
    freeze(unet, vae, *text_encoders.values())
    add_unet_lora(unet, lora)
    models = {"unet": unet}
    for name, encoder in text_encoders.items() if lora.text_encoder else ():
        add_text_encoder_lora(encoder, lora)
        models[name] = encoder
    unet.to(run.device) if is_quantized(unet) else unet.to(run.device, run.dtype)  # 4-bit weights: moved, not cast
    vae.to(run.device, torch.float32)
    for encoder in text_encoders.values():
        encoder.to(run.device, run.dtype)
    cast_training_params(list(models.values()), dtype=torch.float32)
    if train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for name in list(models)[1:]:
            models[name].gradient_checkpointing_enable()
    return models


def plan_share(cfg, run: Run, num_class: int) -> list[BatchPlan]:
    """This process's micro-batches for the rest of the run: its positions in the one global sample order, from
    where a resumed run left off; with buckets, every batch from one bucket."""
    train, data, accelerator = cfg.train, cfg.data, run.accelerator
    order = SampleOrder(train.seed, train.batch_size, len(run.instance), num_class, data.repeats, data.random_flip,
                        not data.center_crop, run.seen, run.photos.buckets)
    return [plan_batch(order, micro, accelerator.process_index, accelerator.num_processes)
            for micro in range((train.max_steps - run.start) * train.gradient_accumulation)]


def encode_latents(vae, examples: list[Example], plans: list[BatchPlan], cfg, device) -> LatentSource:
    """The VAE latents the plans read; with train.cache_latents (and center crops) each (photo, flip, bucket)
    this process reads is encoded once, and the VAE leaves the GPU."""
    cache, started = cfg.train.cache_latents and cfg.data.center_crop, time.perf_counter()
    latents = LatentSource(vae, examples, cfg.train.resolution, cache, cfg.data.random_flip, device,
                           keys=cache_keys(plans))
    if cache:
        vae.to("cpu")  # done with it: free the GPU memory
    log_phase("latents", f"{plural(len(latents.cache), 'image')} encoded" if cache else None, started,
              "encoded at each step (train.cache_latents=false or data.center_crop=false)")
    return latents


def encode_prompts(kind: ModelKind, pipe, training: "Training", examples: list[Example], cfg, device):
    """The U-Net's conditioning for the loop. With the text encoders frozen (and train.cache_text_embeddings)
    every prompt training can see is encoded once now and the encoders leave the GPU; with LoRA on them, or with
    tag shuffling, prompts are encoded each step."""
    encoders = [training.models.get(name, module) for name, module in kind.text_encoders(pipe).items()]
    cached = None
    if cfg.train.cache_text_embeddings and not cfg.lora.text_encoder:
        cached = possible_prompts([e.prompt for e in examples], cfg.data.caption_dropout, cfg.data.shuffle_tags)
    started = time.perf_counter()
    conditioning = kind.conditioning(pipe, encoders, cached, device)
    if cached is not None:
        for encoder in encoders:
            encoder.to("cpu")
    log_phase("prompts", f"{len(cached)} encoded" if cached is not None else None, started,
              "encoded at each step (text-encoder LoRA, tag shuffling or train.cache_text_embeddings=false)")
    return conditioning


@dataclasses.dataclass
class Training:
    models: dict[str, torch.nn.Module]  # the LoRA-carrying models as Accelerate wrapped them, by pipeline name
    lora_models: dict[str, torch.nn.Module]  # the same models unwrapped: what is exported and validated
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    params: list[torch.nn.Parameter]


def prepare_training(cfg, run: Run, lora_models: dict[str, torch.nn.Module], recipe: str) -> Training:
    """Optimizer and schedule (in optimizer steps, at the learning rate train.scale_lr gives), Accelerate's
    wrapping, LoRA-only checkpoints, the resumed state, and the TensorBoard tracker."""
    accelerator, train = run.accelerator, cfg.train
    params = lora_parameters(*lora_models.values())
    lr = scaled_learning_rate(train, accelerator.num_processes)
    optimizer = build_optimizer(params, dataclasses.replace(train, learning_rate=lr), accelerator.device)
    lr_scheduler = build_lr_scheduler(optimizer, train)
    *wrapped, optimizer = accelerator.prepare(*lora_models.values(), optimizer)
    accelerator.register_for_checkpointing(lr_scheduler)
    register_lora_only_saving(accelerator)
    if run.resume_from:
        load_checkpoint(accelerator, run.resume_from)
        retarget_learning_rate(optimizer, lr_scheduler, lr)
        log.info("resumed from %s at step %d (%d samples seen)", run.resume_from, run.start, run.seen)
    start_tensorboard(accelerator, cfg, recipe, run.start, resumed=run.resume_from is not None)
    return Training(dict(zip(lora_models, wrapped)), {name: accelerator.unwrap_model(model) for name, model in
                                                      zip(lora_models, wrapped)}, optimizer, lr_scheduler, params)
