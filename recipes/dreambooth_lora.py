"""DreamBooth-LoRA for Stable Diffusion 1.x/2.x: a few photos of a subject in, a LoRA file out.

    finetune train recipes/configs/sd15_dreambooth_lora.yaml data.instance_dir=photos/ output_dir=runs/dog

The algorithm: generate class images with the base model (prior preservation); freeze the model and add LoRA to
the U-Net (and optionally the text encoder); encode photos and prompts once; then for each step, noise the
latents of instance + class samples, predict the noise (or v), and take instance MSE + weight x class MSE.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed
from diffusers import StableDiffusionPipeline
from tqdm.auto import tqdm

from finetune.config import (DataConfig, ExportConfig, LoraConfig, ModelConfig, PriorConfig, TrainConfig, option,
                             to_dict)
from finetune.data.class_images import generate_class_images, generation_dtype
from finetune.data.dataset import (LatentSource, PromptEmbeddings, cache_keys, class_examples, instance_examples,
                                   plan_batch, sample_generators)
from finetune.data.screening import screen_photos
from finetune.errors import FinetuneError
from finetune.export.diffusers_format import save_diffusers_lora
from finetune.export.lora_weights import load_into_models, read_lora
from finetune.export.metadata import model_family, tag_frequency
from finetune.export.publish import publish
from finetune.lora import add_text_encoder_lora, add_unet_lora, keep_lora_fp32, lora_parameters
from finetune.models import freeze, is_quantized, load_pipeline, training_scheduler
from finetune.training.accelerator import flat_hparams, make_accelerator, weight_dtype
from finetune.training.checkpoint import load_checkpoint, read_progress, register_lora_only_saving, save_checkpoint
from finetune.training.distributed import (check_replicas_agree, class_image_share, report_class_images,
                                           retarget_learning_rate, samples_per_step, scaled_learning_rate)
from finetune.training.guard import NonFiniteGuard
from finetune.training.interrupt import graceful_stop
from finetune.training.loss import add_noise, diffusion_target, prior_preservation_loss
from finetune.training.optim import build_lr_scheduler, build_optimizer
from finetune.training.run_dir import prepare_output_dir
from finetune.training.summary import StepClock, optimizer_state_summary, write_summary
from finetune.training.unet_call import UNetForward, graphs_usable

log = logging.getLogger("finetune")


@dataclasses.dataclass
class Config:
    model: ModelConfig = option(ModelConfig(), "the base model")
    data: DataConfig = option(DataConfig(), "subject photos and prompts")
    prior: PriorConfig = option(PriorConfig(), "prior preservation with class images")
    lora: LoraConfig = option(LoraConfig(), "where LoRA goes and its size")
    train: TrainConfig = option(TrainConfig(), "the optimisation")
    export: ExportConfig = option(ExportConfig(), "extra export formats, model card and Hub upload")
    output_dir: str = option("runs/dreambooth-lora", "checkpoints, TensorBoard logs and the exported LoRA go here")


@dataclasses.dataclass
class Result:
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    export: Path
    steps: int


def main(cfg: Config) -> Result:
    started = time.perf_counter()
    accelerator = make_accelerator(cfg.train, cfg.output_dir, "dreambooth_lora")
    device, dtype, train = accelerator.device, weight_dtype(accelerator), cfg.train
    set_seed(train.seed)
    resume_from = prepare_output_dir(cfg.output_dir, train.resume, train.overwrite, accelerator.is_main_process)
    start, seen = resume_point(resume_from, samples_per_step(train, accelerator.num_processes))
    instance, photo_report = screen_photos(instance_examples(cfg.data), train.resolution, cfg.data.on_bad_image)
    pipe = load_pipeline(cfg.model, compute_dtype=dtype)

    # 1. Prior preservation: class images drawn by the base model, before any LoRA touches it.
    classes, class_images_started = [], time.perf_counter()
    if cfg.prior.num_class_images:
        ensure_class_images(accelerator, pipe, cfg)
        classes = class_examples(cfg.data.class_dir, cfg.data.class_prompt, cfg.prior.num_class_images)
    class_images_seconds = time.perf_counter() - class_images_started

    # 2. Freeze the base model and add LoRA; the frozen weights go to half precision, LoRA stays fp32.
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    noise_scheduler = training_scheduler(pipe)
    freeze(unet, vae, text_encoder)
    add_unet_lora(unet, cfg.lora)
    if cfg.lora.text_encoder:
        add_text_encoder_lora(text_encoder, cfg.lora)
    if cfg.lora.init_from:  # continue from an earlier LoRA (a resumed checkpoint overrides it below)
        load_into_models(read_lora(cfg.lora.init_from), {"unet": unet, "text_encoder": text_encoder}
                         if cfg.lora.text_encoder else {"unet": unet}, cfg.lora.init_from)
    unet.to(device) if is_quantized(unet) else unet.to(device, dtype)
    text_encoder.to(device, dtype), vae.to(device, torch.float32)
    keep_lora_fp32(unet, text_encoder)
    if train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if cfg.lora.text_encoder:
            text_encoder.gradient_checkpointing_enable()

    # 3. Plan this process's share of the samples (its positions in the one global order, from where a resumed
    #    run left off); encode once with the VAE the photos it will read (and every prompt, if the encoder is frozen).
    examples = instance + classes
    plans = [plan_batch(train.seed, micro, train.batch_size, len(instance), cfg.data.repeats, len(classes),
                        cfg.data.random_flip, not cfg.data.center_crop, accelerator.process_index,
                        accelerator.num_processes, offset=seen)
             for micro in range((train.max_steps - start) * train.gradient_accumulation)]
    cache_latents = train.cache_latents and cfg.data.center_crop
    latents = LatentSource(vae, examples, train.resolution, cache_latents, cfg.data.random_flip, device,
                           keys=cache_keys(plans, len(instance)))
    if cache_latents:
        vae.to("cpu")  # done with it: free the GPU memory

    # 4. Optimizer, schedule (in optimizer steps, whatever the process count), and Accelerate's wrapping.
    trained = [unet, text_encoder] if cfg.lora.text_encoder else [unet]
    params = lora_parameters(*trained)
    lr = scaled_learning_rate(train, accelerator.num_processes)
    optimizer = build_optimizer(params, dataclasses.replace(train, learning_rate=lr), device)
    lr_scheduler = build_lr_scheduler(optimizer, train)
    *trained, optimizer = accelerator.prepare(*trained, optimizer)
    accelerator.register_for_checkpointing(lr_scheduler)
    unet = trained[0]
    text_encoder = trained[1] if cfg.lora.text_encoder else text_encoder
    cache_prompts = train.cache_text_embeddings and not cfg.lora.text_encoder
    prompts = PromptEmbeddings(tokenizer, text_encoder, [e.prompt for e in examples], cache_prompts, device)
    if cache_prompts:
        text_encoder.to("cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()  # hand back what encoding used: a smaller card needs it for the U-Net
    register_lora_only_saving(accelerator)
    if resume_from:
        load_checkpoint(accelerator, resume_from)
        retarget_learning_rate(optimizer, lr_scheduler, lr)
        log.info("resumed from %s at step %d (%d samples seen)", resume_from, start, seen)
    if accelerator.is_main_process:
        accelerator.init_trackers("dreambooth_lora", config=flat_hparams(to_dict(cfg)))

    def export(folder: Path, steps: int) -> Path:
        return save_diffusers_lora(folder, StableDiffusionPipeline, accelerator.unwrap_model(unet),
                                   {"text_encoder": accelerator.unwrap_model(text_encoder)}
                                   if cfg.lora.text_encoder else {}, export_info(cfg, pipe, instance, steps))

    # 5. The loop: noise instance + class latents, predict, prior-preservation loss, step (skipped if NaN/Inf).
    guard = NonFiniteGuard(accelerator, train.max_bad_steps, train.learning_rate,
                           str(Path(cfg.output_dir) / "checkpoints"))
    stop = graceful_stop(accelerator)  # SIGINT/SIGTERM: finish the step, save, exit
    bar = tqdm(range(start, train.max_steps), initial=start, total=train.max_steps, desc="training",
               disable=not accelerator.is_local_main_process)
    clock = StepClock(device, train.max_steps - start)
    setup = {"setup_seconds": round(time.perf_counter() - started, 2),
             "class_images_seconds": round(class_images_seconds, 2)}
    forward = UNetForward(unet, dtype, graphs_usable(train.cuda_graphs, device, accelerator.num_processes,
                                                     cfg.lora.dropout, train.gradient_accumulation))

    def progress(steps: int) -> dict:  # samples seen so far: where a resumed run, on any process count, goes on
        return {"samples": seen + (steps - start) * samples_per_step(train, accelerator.num_processes)}

    for step in bar:
        for micro in range(train.gradient_accumulation):
            plan = plans[(step - start) * train.gradient_accumulation + micro]
            with accelerator.accumulate(*trained):
                loss, parts = denoise_step(forward, noise_scheduler, latents, prompts, examples, plan, len(instance),
                                           cfg.prior.loss_weight, sample_generators(train.seed, plan, device))
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
            raise stop.stop(save_checkpoint(accelerator, cfg.output_dir, step + 1, train.keep_checkpoints,
                                            lambda folder: export(folder, step + 1), progress(step + 1)), step + 1)
        if train.checkpoint_every and (step + 1) % train.checkpoint_every == 0 and step + 1 < train.max_steps \
                and guard.healthy:
            save_checkpoint(accelerator, cfg.output_dir, step + 1, train.keep_checkpoints,
                            lambda folder: export(folder, step + 1), progress(step + 1))

    # 6. Export: a checkpoint to resume or extend from, the LoRA file diffusers loads, the kohya file the UIs
    #    load, the model card, and what the run measured.
    check_replicas_agree(accelerator, *[accelerator.unwrap_model(m) for m in trained])
    summary = {**clock.summary(train.max_steps), **optimizer_state_summary(optimizer, params),
               "cuda_graphs": forward.use_graphs, "mode": train.mode, **setup}
    save_checkpoint(accelerator, cfg.output_dir, train.max_steps, train.keep_checkpoints,
                    lambda folder: export(folder, train.max_steps), progress(train.max_steps))
    final = Path(cfg.output_dir) / "pytorch_lora_weights.safetensors"
    if accelerator.is_main_process:
        final = export(Path(cfg.output_dir), train.max_steps)
        write_summary(cfg.output_dir, summary)
        log.info("exported %s (%s it/s)", final, summary["steady_it_per_s"])
        lora_models = {"unet": accelerator.unwrap_model(unet)}
        if cfg.lora.text_encoder:
            lora_models["text_encoder"] = accelerator.unwrap_model(text_encoder)
        publish(cfg.output_dir, cfg.export, lora_models, export_info(cfg, pipe, instance, train.max_steps))
        log.info("summary: %d steps, %d skipped (NaN/Inf); %s", train.max_steps - start, guard.skipped,
                 photo_report.summary())
    accelerator.end_training()
    return Result(accelerator.unwrap_model(unet), accelerator.unwrap_model(text_encoder), final, train.max_steps)


def denoise_step(forward: UNetForward, noise_scheduler, latents: LatentSource, prompts: PromptEmbeddings, examples, plan,
                 num_instance: int, prior_weight: float, generators: list[torch.Generator]):
    """One forward pass: instance samples first, then class samples, in one batch; sample k draws from
    generators[k]."""
    indices = plan.instance + [num_instance + i for i in plan.classes]
    clean = latents.sample(indices, plan.flips, plan.crops, generators)
    noisy, noise, timesteps = add_noise(noise_scheduler, clean, generators)
    embeddings = prompts([examples[i].prompt for i in indices])
    prediction = forward(noisy, timesteps, embeddings)
    target = diffusion_target(noise_scheduler, clean, noise, timesteps)
    return prior_preservation_loss(prediction, target, len(plan.instance), prior_weight)


def ensure_class_images(accelerator, pipe, cfg: Config) -> None:
    """Generate the missing class images, each process its share; all wait until the set is complete."""
    if not cfg.data.class_dir:
        raise FinetuneError("data.class_dir is not set; prior preservation (prior.num_class_images > 0) needs a "
                            "folder for class images, or set prior.num_class_images=0")
    if not cfg.data.class_prompt.strip():
        raise FinetuneError("data.class_prompt is empty; describe the class, e.g. 'a photo of a dog'")
    missing, share = class_image_share(accelerator, cfg.data.class_dir, cfg.prior.num_class_images)
    if missing:
        pipe.to(accelerator.device, generation_dtype(accelerator.device, cfg.train.mixed_precision))
        generate_class_images(pipe, cfg.data.class_dir, cfg.data.class_prompt, cfg.prior, cfg.train.resolution,
                              cfg.train.seed, accelerator.device, share)
    accelerator.wait_for_everyone()
    if missing:
        report_class_images(accelerator, cfg.data.class_dir, cfg.prior.num_class_images, share)


def resume_point(checkpoint: Path | None, samples_per_step: int) -> tuple[int, int]:
    """(optimizer steps done, samples seen) at the checkpoint; (0, 0) for a fresh run."""
    if checkpoint is None:
        return 0, 0
    progress = read_progress(checkpoint)
    return progress["step"], progress.get("samples", progress["step"] * samples_per_step)


def export_info(cfg: Config, pipe, instance, steps: int) -> dict:
    prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
    seen = steps * cfg.train.batch_size * cfg.train.gradient_accumulation
    return {"base_model": cfg.model.pretrained, "family": model_family(pipe.unet.config, prediction),
            "rank": cfg.lora.rank, "alpha": cfg.lora.alpha, "unet_targets": cfg.lora.unet_targets,
            "text_encoder": cfg.lora.text_encoder, "steps": steps, "trigger": cfg.data.instance_prompt,
            "resolution": cfg.train.resolution, "prediction_type": prediction, "recipe": "dreambooth_lora",
            "learning_rate": cfg.train.learning_rate, "batch_size": cfg.train.batch_size,
            "epochs": max(1, -(-seen // (len(instance) * cfg.data.repeats))), "num_train_images": len(instance),
            "num_class_images": cfg.prior.num_class_images, "seed": cfg.train.seed,
            "title": Path(cfg.output_dir).resolve().name, "tag_frequency": tag_frequency([e.prompt for e in instance])}
