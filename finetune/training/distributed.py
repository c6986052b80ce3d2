"""Several processes through Accelerate: who generates which class image, the effective batch and its learning
rate, and a check that every process ends with the same LoRA weights.

The data order needs nothing here: plan_batch gives each process its positions in one global sample order, and
every random draw is keyed by a sample's position, so the result does not depend on how samples are split.
"""
from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

from ..config import DataConfig, PriorConfig, TrainConfig, resolved
from ..console import plural
from ..data.class_images import generate_class_images, generation_dtype, missing_class_indices
from ..data.class_sizes import notice_other_sizes
from ..data.dataset import Example, class_examples
from ..errors import FinetuneError
from ..lora import lora_state
from ..models import is_quantized, tile_vae
from .accelerator import weight_dtype
from .summary import Phase

log = logging.getLogger("finetune")


def class_image_share(accelerator: Accelerator, folder: str | Path, wanted: int) -> tuple[list[int], list[int]]:
    """(every missing index, this process's share of them).

    The main process reads the folder and sends its list to the others, so all split the same list even when the
    folder is on a network filesystem that shows processes different listings; shares are disjoint and cover it.
    """
    missing: list[Any] = [missing_class_indices(Path(folder), wanted) if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(missing, from_process=0)
    every: list[int] = missing[0]
    return every, every[accelerator.process_index::accelerator.num_processes]


def ensure_class_images(accelerator: Accelerator, pipe, data: DataConfig, prior: PriorConfig, resolution: int,
                        seed: int, load_unet: Callable[[], object] = lambda: None, phase: Phase | None = None,
                        vae_tiling: bool = False) -> list[Example]:
    """Generate the missing class images, each process its share; all wait until the set is complete. Returns
    the class examples to train with (none when prior.num_class_images is 0: prior preservation off). What was
    drawn or found is told to `phase`; class images of another size than the run's get a notice.

    Drawing puts the pipeline on the GPU (`load_unet` first brings a deferred U-Net) and takes it off again, so
    the phases after it start from an empty GPU; with `vae_tiling` (train.vae_tiling) the decoder works in tiles
    here too."""
    phase = phase or Phase()
    if not prior.num_class_images:
        phase.add("none (prior.num_class_images=0: no prior preservation)")
        return []
    if not data.class_dir:
        raise FinetuneError("data.class_dir is not set; prior preservation (prior.num_class_images > 0) needs a "
                            "folder for class images, or set prior.num_class_images=0")
    if not data.class_prompt.strip():
        raise FinetuneError("data.class_prompt is empty; describe the class, e.g. 'a photo of a dog'")
    missing, share = class_image_share(accelerator, data.class_dir, prior.num_class_images)
    if missing:
        load_unet()
        loaded = place_for_drawing(pipe, accelerator, prior.generation_offload, vae_tiling)
        generate_class_images(pipe, data.class_dir, data.class_prompt, prior, resolution, seed, accelerator.device,
                              share)
        if prior.generation_offload:
            pipe.remove_all_hooks()
        pipeline_off_gpu(pipe, loaded)
    accelerator.wait_for_everyone()
    if missing:
        report_class_images(accelerator, data.class_dir, prior.num_class_images, share)
    examples = class_examples(data.class_dir, data.class_prompt, prior.num_class_images)
    phase.add(f"{plural(len(missing), 'image')} drawn into {data.class_dir} ({len(examples) - len(missing)} already "
              f"there)" if missing else f"{plural(len(examples), 'image')} found in {data.class_dir}, none to draw")
    if accelerator.is_main_process:
        notice_other_sizes([e.path for e in examples], resolution)
    return examples


def place_for_drawing(pipe, accelerator: Accelerator, offload: bool, vae_tiling: bool) -> dict[str, dict]:
    """The pipeline in half precision on the GPU; with `offload` each model goes there only while it runs (the
    text encoders, 1.5 GiB for SDXL, are then off the GPU while the U-Net draws).

    Returns the loaded weights (state dicts) of the models that the later phases use in another dtype than the
    drawing's: the fp32 VAE, and every model of a run with train.mixed_precision=no. pipeline_off_gpu puts them
    back, so those phases work with the weights as loaded, not their half-precision roundings. The others are
    used in the drawing's dtype anyway; keeping theirs would hold their full-precision weights in CPU memory
    through the drawing (10 GB for SDXL's U-Net), which the cast otherwise frees."""
    dtype = generation_dtype(accelerator.device, accelerator.mixed_precision)
    loaded = {}
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module) and not is_quantized(module):
            used_later_in = torch.float32 if module is pipe.vae else weight_dtype(accelerator)
            if module.dtype != dtype and used_later_in != dtype:
                loaded[name] = module.state_dict()  # .to() below makes new tensors and leaves these as they are
            module.to(dtype=dtype)
    if offload and accelerator.device.type == "cuda":
        pipe.enable_model_cpu_offload(device=accelerator.device)
    else:
        pipe.to(accelerator.device)
    if vae_tiling:
        tile_vae(pipe.vae)
    return loaded


def pipeline_off_gpu(pipe, loaded: dict[str, dict]) -> None:
    """Every module of the pipeline off the GPU, so that encoding starts from an empty card; those that
    place_for_drawing kept the loaded weights of (`loaded`) get them back.

    A 4-bit U-Net is let go instead of moved (its quantized weights are tied to the GPU): the pipeline forgets it
    and models.ensure_unet loads it again after encoding, which costs a second or two on the figures in
    BENCHMARKS.md, against holding 1.8 GiB (SDXL) through both encoding phases."""
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            if is_quantized(module):
                pipe.register_modules(**{name: None})
                continue
            if name in loaded:  # the loaded tensors themselves, on the CPU: the half-precision copies are dropped
                module.load_state_dict(loaded[name], assign=True)
            module.to("cpu")  # the rest (and what no state dict holds: non-persistent buffers)


def report_class_images(accelerator: Accelerator, folder: str | Path, wanted: int, share: list[int]) -> None:
    """After everyone generated: say who drew what (one line, main process); fail if the set is still short."""
    shares = gather_object([share]) if accelerator.num_processes > 1 else [share]
    if accelerator.is_main_process and accelerator.num_processes > 1 and any(shares):
        log.info("class images generated per process: %s",
                 "; ".join(f"process {rank}: {s}" for rank, s in enumerate(shares)))
    left = missing_class_indices(Path(folder), wanted)
    if left:
        raise FinetuneError(f"data.class_dir: {folder} still lacks {len(left)} of {wanted} class images after "
                            "generation; with several machines it must be on a filesystem all of them share "
                            "(or generate the class images on one machine first)")


def samples_per_step(train: TrainConfig, num_processes: int) -> int:
    """Instance samples per optimizer step: per-device batch x processes x accumulation (as many class samples)."""
    return train.batch_size * num_processes * train.gradient_accumulation


def scaled_learning_rate(train: TrainConfig, num_processes: int) -> float:
    """train.learning_rate under train.scale_lr: none (as given), linear (x samples per step, as diffusers'
    --scale_lr) or sqrt (x its square root, gentler for Adam)."""
    factor = samples_per_step(train, num_processes)
    scale = {"none": 1.0, "linear": factor, "sqrt": math.sqrt(factor)}[train.scale_lr]
    return resolved(train.learning_rate, "train.learning_rate") * scale


def retarget_learning_rate(optimizer, lr_scheduler, lr: float | list[float]) -> None:
    """After a resume: put the schedule on this run's peak LR (it differs from the checkpoint's when scale_lr
    scales by a process count that changed) at the restored step; a list gives each optimizer group's."""
    lrs = lr if isinstance(lr, list) else [lr] * len(lr_scheduler.base_lrs)
    lr_scheduler.base_lrs = list(lrs)
    for group, factor, peak in zip(optimizer.param_groups, lr_scheduler.lr_lambdas, lrs):
        group["initial_lr"] = peak
        group["lr"] = peak * factor(lr_scheduler.last_epoch)
    lr_scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def lora_digest(*models: torch.nn.Module) -> str:
    """sha256 of the LoRA weights of `models` (names and exact bytes), to compare processes cheaply."""
    return state_digest([lora_state(model) for model in models])


def state_digest(states: list[dict[str, torch.Tensor]]) -> str:
    """sha256 of LoRA state dicts, in order (the same states as a checkpoint's lora_i.safetensors hold)."""
    digest = hashlib.sha256()
    for state in states:
        for name, tensor in sorted(state.items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def check_replicas_agree(accelerator: Accelerator, *models: torch.nn.Module) -> list[str]:
    """Every process's LoRA digest; fail loudly if data parallelism let them drift apart."""
    digests = gather_object([lora_digest(*models)]) if accelerator.num_processes > 1 else [lora_digest(*models)]
    if accelerator.is_main_process and accelerator.num_processes > 1:
        log.info("LoRA weights per process (sha256): %s", " ".join(digests))
    if len(set(digests)) > 1:
        raise FinetuneError(f"the {len(digests)} processes ended with different LoRA weights; a trained tensor "
                            "escaped Accelerate's gradient sync, please report this with your config")
    return digests
