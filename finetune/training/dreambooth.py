"""The DreamBooth-LoRA steps both recipes take (SD 1.x/2.x and SDXL), as functions each recipe calls in order.

A recipe keeps what differs between model families (its pipeline, its text encoders, how the U-Net is
conditioned); what is the same lives here once: the run's start (output folder, resume point, photo screening),
LoRA set-up, each process's share of the sample order and its latents, the optimizer and Accelerate's wrapping,
and the loop with its crash safety (NaN/Inf guard, SIGINT/SIGTERM save, atomic checkpoints), validation images,
exports and run summary.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from ..config import LoraConfig, TrainConfig, to_dict
from ..data.captions import possible_prompts
from ..data.dataset import (BatchPlan, Example, LatentSource, cache_keys, instance_examples, plan_batch, plan_prompts,
                            sample_generators)
from ..data.screening import PhotoReport, screen_photos
from ..export.diffusers_format import WEIGHT_NAME, save_diffusers_lora
from ..export.lora_weights import load_into_models, read_lora
from ..export.metadata import tag_frequency
from ..export.publish import publish
from ..family import family_of_pipeline
from ..lora import add_text_encoder_lora, add_unet_lora, keep_lora_fp32, lora_parameters
from ..models import freeze, is_quantized
from .accelerator import flat_hparams, make_accelerator
from .checkpoint import load_checkpoint, register_lora_only_saving, resume_point, save_checkpoint
from .distributed import check_replicas_agree, retarget_learning_rate, samples_per_step, scaled_learning_rate
from .guard import NonFiniteGuard
from .interrupt import graceful_stop
from .optim import build_lr_scheduler, build_optimizer
from .run_dir import prepare_output_dir
from .summary import StepClock, optimizer_state_summary, write_summary
from .unet_call import UNetForward
from .validation import Validator

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


def add_lora(unet, vae, text_encoders: dict[str, torch.nn.Module], lora: LoraConfig, train: TrainConfig, device,
             dtype) -> dict[str, torch.nn.Module]:
    """Freeze the base model and add LoRA to the U-Net (and, with lora.text_encoder, to every text encoder);
    the frozen weights go to `dtype`, the VAE stays fp32 (SDXL's overflows in fp16), LoRA stays fp32.

    `text_encoders` maps the pipeline's names ('text_encoder', 'text_encoder_2') to the modules. Returns the
    models that carry LoRA by those names, the U-Net first: what trains, is saved and exported.
    """
    freeze(unet, vae, *text_encoders.values())
    add_unet_lora(unet, lora)
    models = {"unet": unet}
    for name, encoder in text_encoders.items() if lora.text_encoder else ():
        add_text_encoder_lora(encoder, lora)
        models[name] = encoder
    if lora.init_from:  # continue from an earlier LoRA (a resumed checkpoint overrides it later)
        load_into_models(read_lora(lora.init_from, unet.config), models, lora.init_from)
    unet.to(device) if is_quantized(unet) else unet.to(device, dtype)  # 4-bit weights are moved, not cast
    vae.to(device, torch.float32)
    for encoder in text_encoders.values():
        encoder.to(device, dtype)
    keep_lora_fp32(*models.values())
    if train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for name in list(models)[1:]:
            models[name].gradient_checkpointing_enable()
    return models


def plan_share(cfg, run: Run, num_class: int) -> list[BatchPlan]:
    """This process's micro-batches for the rest of the run: its positions in the one global sample order, from
    where a resumed run left off; with buckets, every batch from one bucket."""
    train, data, accelerator = cfg.train, cfg.data, run.accelerator
    return [plan_batch(train.seed, micro, train.batch_size, len(run.instance), data.repeats, num_class,
                       data.random_flip, not data.center_crop, accelerator.process_index, accelerator.num_processes,
                       offset=run.seen, buckets=run.photos.buckets)
            for micro in range((train.max_steps - run.start) * train.gradient_accumulation)]


def encode_latents(vae, examples: list[Example], plans: list[BatchPlan], num_instance: int, cfg, device
                   ) -> LatentSource:
    """The VAE latents the plans read; with train.cache_latents (and center crops) each (photo, flip, bucket)
    this process reads is encoded once, and the VAE leaves the GPU."""
    cache = cfg.train.cache_latents and cfg.data.center_crop
    latents = LatentSource(vae, examples, cfg.train.resolution, cache, cfg.data.random_flip, device,
                           keys=cache_keys(plans, num_instance))
    if cache:
        vae.to("cpu")  # done with it: free the GPU memory
    return latents


def cached_prompts(examples: list[Example], cfg) -> list[str] | None:
    """Every prompt training can see, to encode once; None when prompts are encoded each step instead (LoRA on
    the text encoder, tag shuffling, or train.cache_text_embeddings off)."""
    if not cfg.train.cache_text_embeddings or cfg.lora.text_encoder:
        return None
    return possible_prompts([e.prompt for e in examples], cfg.data.caption_dropout, cfg.data.shuffle_tags)


def micro_batch_loss(denoise_step, unet_call, noise_scheduler, latents: LatentSource, prompts, examples: list[Example],
                     num_instance: int, cfg, device) -> Callable[[BatchPlan], tuple[torch.Tensor, dict]]:
    """forward(plan): the recipe's `denoise_step` on one planned micro-batch, every sample drawing its noise and
    its caption variant (dropout, tag shuffle) from generators keyed by its position."""
    seed = cfg.train.seed

    def forward(plan: BatchPlan):
        return denoise_step(unet_call, noise_scheduler, latents, prompts, examples, plan, num_instance,
                            cfg.prior.loss_weight, sample_generators(seed, plan, device), cfg.loss,
                            plan_prompts(seed, plan, examples, num_instance, cfg.data))
    return forward


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
    if accelerator.is_main_process:
        accelerator.init_trackers(recipe, config=flat_hparams(to_dict(cfg)))
    return Training(dict(zip(lora_models, wrapped)), {name: accelerator.unwrap_model(model) for name, model in
                                                      zip(lora_models, wrapped)}, optimizer, lr_scheduler, params)


def export_info(cfg, pipe, instance: list[Example], steps: int, recipe: str, buckets=None) -> dict:
    """What the exported files say about how they were made (finetune.* header, kohya ss_* keys, model card)."""
    prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
    seen = steps * cfg.train.batch_size * cfg.train.gradient_accumulation
    info = {"base_model": cfg.model.pretrained, "family": family_of_pipeline(pipe).name,
            "rank": cfg.lora.rank, "alpha": cfg.lora.alpha, "unet_targets": cfg.lora.unet_targets,
            "text_encoder": cfg.lora.text_encoder, "steps": steps,
            "trigger": cfg.data.trigger or cfg.data.instance_prompt, "resolution": cfg.train.resolution,
            "prediction_type": prediction, "recipe": recipe,
            "learning_rate": cfg.train.learning_rate, "batch_size": cfg.train.batch_size,
            "epochs": max(1, -(-seen // (len(instance) * cfg.data.repeats))), "num_train_images": len(instance),
            "num_class_images": cfg.prior.num_class_images, "seed": cfg.train.seed,
            "title": Path(cfg.output_dir).resolve().name, "tag_frequency": tag_frequency([e.prompt for e in instance])}
    if buckets:
        info["buckets"] = sorted({f"{w}x{h}" for w, h in buckets})
    return info


def train_and_export(cfg, run: Run, training: Training, plans: list[BatchPlan],
                     forward: Callable[[BatchPlan], tuple[torch.Tensor, dict]], pipe, pipeline_class,
                     info: Callable[[int], dict], unet_call: UNetForward | None = None) -> Path:
    """The loop, then the exports; returns the exported diffusers file.

    Each step runs `forward(plan)` (the recipe's loss on one micro-batch) per accumulated micro-batch and steps
    the optimizer unless the loss or gradient is NaN/Inf (train.max_bad_steps in a row stop the run). A SIGINT or
    SIGTERM finishes the step, saves a checkpoint and stops; checkpoints are written atomically every
    train.checkpoint_every steps; validation grids every validation.every steps. At the end: a checkpoint to
    resume or extend from, the diffusers file, the run summary, the base-vs-LoRA grid, then the kohya file, model
    card and Hub upload (export.*). `info(steps)` is the exports' metadata; `unet_call` says in the summary
    whether CUDA graphs ran.
    """
    accelerator, train, output_dir = run.accelerator, cfg.train, Path(cfg.output_dir)
    start, optimizer, lr_scheduler, params = run.start, training.optimizer, training.lr_scheduler, training.params
    trained = list(training.models.values())
    lora_models = training.lora_models
    validator = Validator(cfg.validation, accelerator, pipe, list(lora_models.values()), output_dir,
                          train.resolution)

    def export(folder: Path, steps: int) -> Path:
        encoders = {name: model for name, model in lora_models.items() if name != "unet"}
        return save_diffusers_lora(folder, pipeline_class, lora_models["unet"], encoders, info(steps))

    def save(steps: int) -> Path:  # samples seen so far: where a resumed run, on any process count, goes on
        progress = {"samples": run.seen + (steps - start) * samples_per_step(train, accelerator.num_processes)}
        return save_checkpoint(accelerator, output_dir, steps, train.keep_checkpoints,
                               lambda folder: export(folder, steps), progress)

    guard = NonFiniteGuard(accelerator, train.max_bad_steps, train.learning_rate, str(output_dir / "checkpoints"))
    stop = graceful_stop(accelerator)  # SIGINT/SIGTERM: finish the step, save, exit
    bar = tqdm(range(start, train.max_steps), initial=start, total=train.max_steps, desc="training",
               disable=not accelerator.is_local_main_process)
    if accelerator.device.type == "cuda":
        torch.cuda.empty_cache()  # hand back what encoding used: a smaller card needs it for the U-Net
    setup_seconds = time.perf_counter() - run.started
    clock = StepClock(accelerator.device, train.max_steps - start)
    for step in bar:
        for micro in range(train.gradient_accumulation):
            plan = plans[(step - start) * train.gradient_accumulation + micro]
            with accelerator.accumulate(*trained):
                loss, parts = forward(plan)
                accelerator.backward(loss)
                guard.watch(loss)
                if accelerator.sync_gradients:
                    if guard.clip_and_check(params, train.max_grad_norm):
                        optimizer.step()
                        if not accelerator.optimizer_step_was_skipped:
                            lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
        clock.step_done()
        guard.record(step + 1)
        if (step + 1) % train.log_every == 0 or step + 1 == train.max_steps:
            means = accelerator.reduce(torch.stack([loss.detach(), *parts.values()]), "mean").tolist()
            logs = {"loss": means[0], "lr": lr_scheduler.get_last_lr()[0], **dict(zip(parts, means[1:])),
                    "skipped_steps": guard.skipped}
            bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
            accelerator.log(logs, step=step + 1)
        if stop.requested():
            raise stop.stop(save(step + 1), step + 1)
        if train.checkpoint_every and (step + 1) % train.checkpoint_every == 0 and step + 1 < train.max_steps \
                and guard.healthy:
            save(step + 1)
        if validator.due(step + 1):
            validator.validate(step + 1)

    check_replicas_agree(accelerator, *lora_models.values())
    summary = {**clock.summary(train.max_steps), **optimizer_state_summary(optimizer, params), "mode": train.mode,
               "cuda_graphs": bool(unet_call and unet_call.use_graphs), "setup_seconds": round(setup_seconds, 2)}
    save(train.max_steps)
    final = output_dir / WEIGHT_NAME
    if accelerator.is_main_process:
        final = export(output_dir, train.max_steps)
        write_summary(output_dir, summary)
        log.info("exported %s (%s it/s)", final, summary["steady_it_per_s"])
    validator.before_after(train.max_steps)  # before the model card, which shows it
    if accelerator.is_main_process:
        publish(output_dir, cfg.export, lora_models, info(train.max_steps))
        log.info("summary: %d steps, %d skipped (NaN/Inf); %s", train.max_steps - start, guard.skipped,
                 run.photos.summary())
    accelerator.end_training()
    return final
