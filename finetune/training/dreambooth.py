"""The set-up steps of a DreamBooth-LoRA run, as functions the recipe calls in order (recipes/dreambooth_lora.py).

The run's start (output folder, resume point, photo screening), LoRA on the frozen model, each process's share of
the sample order and its latents, the prompts' conditioning, and the optimizer with Accelerate's wrapping. The loop
is finetune.training.loop; the end of a run (exports, card, upload) is finetune.training.finish.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.training_utils import cast_training_params
from torch.nn.utils import parametrize

from ..allocator import EXPANDABLE, VARIABLE, ask_for_expandable_segments
from ..config import LoraConfig, TrainConfig
from ..console import plural
from ..data.captions import possible_prompts
from ..data.dataset import BatchPlan, Example, LatentSource, SampleOrder, cache_keys, plan_batch
from ..data.screening import PhotoReport
from ..lora import add_text_encoder_lora, add_unet_lora, lora_parameters
from ..models import free_gpu_cache, freeze, is_quantized, tile_vae
from .accelerator import make_accelerator, weight_dtype
from .checkpoint import load_checkpoint, register_lora_only_saving
from .conditioning import ModelKind
from .distributed import retarget_learning_rate, scaled_learning_rate
from .ema import LoraEMA, NoEMA, lora_ema
from .optim import build_lr_scheduler, build_optimizer
from .pivotal import PivotalTuning
from .preflight import claim_run, validate_run
from .summary import Phase, PhaseClock
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
    phases: PhaseClock        # a line per phase with its time; the split goes into train_summary.json

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def dtype(self) -> torch.dtype:
        """What the frozen weights compute in (train.mixed_precision)."""
        return weight_dtype(self.accelerator)


def start_run(cfg, recipe: str) -> Run:
    """Accelerator and seed; every input checked before anything is written (folders, model files, the resume
    point, every photo decoded and screened now, not 300 steps in); only then the output folder claimed."""
    started, train = time.perf_counter(), cfg.train
    if train.expandable_segments and not ask_for_expandable_segments():  # `finetune train` set it in time
        log.warning("notice: train.expandable_segments has no effect in this process: CUDA started before it was "
                    "set (importing bitsandbytes starts it); set %s=%s before Python starts, or run `finetune "
                    "train`", VARIABLE, EXPANDABLE)
    accelerator = make_accelerator(train, cfg.output_dir, recipe)
    phases = PhaseClock(accelerator.device, accelerator.is_main_process)
    set_seed(train.seed)
    checked = validate_run(cfg, accelerator.num_processes, accelerator.is_main_process)  # writes nothing
    cfg.train = checked.train  # train.max_steps / learning_rate from the photo count where unset
    if checked.chosen and accelerator.is_main_process:
        log.info("%s", checked.chosen)
    claim_run(cfg, checked, accelerator.is_main_process)  # lock, leftovers, overwrite: only now
    return Run(accelerator, checked.resume_from, checked.start, checked.seen, checked.instance, checked.photos,
               started, phases)


def encode_prompts(kind: ModelKind, pipe, examples: list[Example], cfg, run: Run, phase: Phase):
    """The first encoding phase: with the text encoders frozen (and train.cache_text_embeddings), every prompt
    training can see is encoded now, the encoders on the GPU alone, then back on the CPU. None when prompts are
    encoded each step instead (LoRA on the text encoders, tag shuffling): text_conditioning then."""
    cached = None
    if cfg.caches_prompt_embeddings():
        cached = possible_prompts([e.prompt for e in examples], cfg.data.caption_dropout, cfg.data.shuffle_tags)
    if cached is None:
        phase.add("prompts encoded at each step (text-encoder LoRA, tag shuffling or "
                  "train.cache_text_embeddings=false)")
        return None
    phase.add(f"{plural(len(cached), 'prompt')} encoded")
    encoders = list(kind.text_encoders(pipe).values())
    freeze(*encoders)
    for encoder in encoders:
        encoder.to(run.device, run.dtype)
    conditioning = kind.conditioning(pipe, encoders, cached, run.device)
    for encoder in encoders:
        encoder.to("cpu")
    free_gpu_cache()  # the VAE comes next, and with it the encoding phase's peak
    return conditioning


def encode_latents(vae, examples: list[Example], plans: list[BatchPlan], cfg, run: Run, phase: Phase
                   ) -> LatentSource:
    """The second encoding phase: the VAE latents the plans read, the VAE (fp32: SDXL's overflows in fp16) on
    the GPU alone. With train.cache_latents (and center crops) each (photo, flip, bucket) this process reads is
    encoded once and the VAE leaves the GPU; otherwise it stays and encodes each step."""
    freeze(vae)
    vae.to(run.device, torch.float32)
    if cfg.train.vae_tiling:
        tile_vae(vae)
    cache = cfg.train.cache_latents and cfg.data.center_crop
    latents = LatentSource(vae, examples, cfg.train.resolution, cache, cfg.data.random_flip, run.device,
                           keys=cache_keys(plans))
    if cache:
        vae.to("cpu")  # done with it (the phase's end hands its cached memory back)
        phase.add(f"{plural(len(latents.cache), 'image')} encoded")
    else:
        phase.add("images encoded at each step (train.cache_latents=false or data.center_crop=false)")
    return latents


def add_lora(pipe, kind: ModelKind, lora: LoraConfig, train: TrainConfig, run: Run) -> dict[str, torch.nn.Module]:
    """After encoding: freeze the base model and add LoRA to the U-Net (and, with lora.text_encoder, to every
    text encoder); these come to the GPU only now, frozen weights in the run's dtype (a 4-bit U-Net is loaded
    there), LoRA in fp32.

    Returns the models that carry LoRA by their pipeline names ('unet', 'text_encoder', 'text_encoder_2'), the
    U-Net first: what trains, is saved and exported.
    """
    unet, text_encoders = pipe.unet, kind.text_encoders(pipe)
    freeze(unet, *text_encoders.values())
    add_unet_lora(unet, lora)
    models = {"unet": unet}
    for name, encoder in text_encoders.items() if lora.text_encoder else ():
        add_text_encoder_lora(encoder, lora)
        models[name] = encoder
    for model in models.values():
        model.to(run.device) if is_quantized(model) else model.to(run.device, run.dtype)  # 4-bit: moved, not cast
    cast_training_params(list(models.values()), dtype=torch.float32)
    if train.channels_last:
        to_channels_last(unet)
    if train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for name in list(models)[1:]:
            models[name].gradient_checkpointing_enable()
    return models


def to_channels_last(unet: torch.nn.Module) -> None:
    """The U-Net's convolution weights in channels-last layout, so cuDNN runs its native kernels and keeps the
    activations in that layout between them. Only convolutions are touched: the whole model's
    .to(memory_format=...) would also hand every 4-bit linear weight to bitsandbytes' .to() (nothing to gain
    there), and an NF4-stored convolution (model.quantize_unet=nf4_all) computes its weight afresh each call."""
    for module in unet.modules():
        if isinstance(module, torch.nn.Conv2d) and not parametrize.is_parametrized(module):
            module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # documented; not in the stubs


def plan_share(cfg, run: Run, num_class: int) -> list[BatchPlan]:
    """This process's micro-batches for the rest of the run: its positions in the one global sample order, from
    where a resumed run left off; with buckets, every batch from one bucket."""
    train, data, accelerator = cfg.train, cfg.data, run.accelerator
    order = SampleOrder(train.seed, train.batch_size, len(run.instance), num_class, data.repeats, data.random_flip,
                        not data.center_crop, run.seen, run.photos.buckets)
    return [plan_batch(order, micro, accelerator.process_index, accelerator.num_processes)
            for micro in range((train.max_steps - run.start) * train.gradient_accumulation)]


def text_conditioning(kind: ModelKind, pipe, training: Training, run: Run):
    """The conditioning that encodes prompts each step, with the text encoders as they train (Accelerate's
    wrapping) or, frozen, on the GPU in the run's dtype."""
    encoders = []
    for name, module in kind.text_encoders(pipe).items():
        if name not in training.models:
            module.to(run.device, run.dtype)
        encoders.append(training.models.get(name, module))
    return kind.conditioning(pipe, encoders, None, run.device)


@dataclasses.dataclass
class Training:
    models: dict[str, torch.nn.Module]  # the LoRA-carrying models as Accelerate wrapped them, by pipeline name
    lora_models: dict[str, torch.nn.Module]  # the same models unwrapped: what is exported and validated
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any  # a torch LambdaLR from diffusers' get_scheduler
    params: list[torch.nn.Parameter]
    ema: LoraEMA | NoEMA  # train.ema_decay: the EMA of params, what validation draws and exports write
    step_hooks: list[Callable[[int], None]] = dataclasses.field(default_factory=list)  # called after each step


def learning_rates(cfg, lr: float, pivotal: PivotalTuning | None) -> list[float]:
    """The peak learning rate of each optimizer group: the LoRA's, then (lora.pivotal) the token embeddings',
    scaled as train.scale_lr scales the LoRA's."""
    return [lr] + ([cfg.lora.pivotal_learning_rate * lr / cfg.train.learning_rate] if pivotal else [])


def prepare_training(cfg, run: Run, lora_models: dict[str, torch.nn.Module], recipe: str,
                     pivotal: PivotalTuning | None = None) -> Training:
    """Optimizer and schedule (in optimizer steps, at the learning rate train.scale_lr gives; lora.pivotal's
    token embeddings in a group of their own), Accelerate's wrapping, LoRA-only checkpoints, the resumed state,
    and the TensorBoard tracker."""
    accelerator, train = run.accelerator, cfg.train
    params = lora_weights = lora_parameters(*lora_models.values())
    lr = scaled_learning_rate(train, accelerator.num_processes)
    lrs = learning_rates(cfg, lr, pivotal)
    groups: list[Any] = [{"params": params}]
    if pivotal:
        pivotal.to(accelerator.device)
        pivotal.reduce_gradients(accelerator)
        groups.append({"params": pivotal.parameters(), "lr": lrs[1]})
        params = params + pivotal.parameters()
    optimizer = build_optimizer(groups, dataclasses.replace(train, learning_rate=lr), accelerator.device)
    lr_scheduler = build_lr_scheduler(optimizer, train)
    *wrapped, optimizer = accelerator.prepare(*lora_models.values(), optimizer)
    accelerator.register_for_checkpointing(lr_scheduler)
    # The EMA is of the LoRA weights only: lora.pivotal's rows are saved as trained, in every file and checkpoint.
    ema = lora_ema(lora_weights, train, accelerator)  # registered after the schedule: older checkpoints keep its index
    register_lora_only_saving(accelerator)
    if run.resume_from:
        load_checkpoint(accelerator, run.resume_from)
        if pivotal:
            pivotal.restore(run.resume_from)
        retarget_learning_rate(optimizer, lr_scheduler, lrs)
        log.info("resumed from %s at step %d (%d samples seen)", run.resume_from, run.start, run.seen)
    start_tensorboard(accelerator, cfg, recipe, run.start, resumed=run.resume_from is not None)
    training = Training(dict(zip(lora_models, wrapped)), {name: accelerator.unwrap_model(model) for name, model in
                                                          zip(lora_models, wrapped)}, optimizer, lr_scheduler, params,
                        ema)
    if pivotal:
        pivotal.step_done(run.start)  # resumed at or past lora.pivotal_stop_step: fixed from the start
        training.step_hooks.append(pivotal.step_done)
    return training
