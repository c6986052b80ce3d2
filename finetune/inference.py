"""Base model plus zero or more LoRAs -> images, and the samplers shared with class-image generation.

The base model's family (finetune.family) picks diffusers' pipeline: SD 1.x/2.x or SDXL (both text encoders and
its size conditioning); a v-prediction model keeps its prediction type through every sampler swap, since each
sampler is built from the model's own scheduler config.
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, PNDMScheduler)
from PIL import Image

from .config import ModelConfig
from .data.images import image_grid
from .errors import FinetuneError
from .export.lora_weights import LoraWeights, read_lora
from .export.pipeline_lora import load_lora
from .family import Family, decide, model_facts
from .models import load_pipeline

SCHEDULERS = {
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "pndm": (PNDMScheduler, {}),
}


def check_scheduler(name: str, key: str = "scheduler") -> None:
    """An unknown sampler name is a one-line error naming `key`, the option it came from."""
    if name != "default" and name not in SCHEDULERS:
        raise FinetuneError(f"{key}: {name!r} is unknown; choose default or one of {', '.join(SCHEDULERS)}")


def set_scheduler(pipe, name: str, key: str = "scheduler") -> None:
    """Swap the pipeline's sampler by name ('default' keeps the model's own); the noise schedule and the
    prediction type (epsilon or v) are kept."""
    check_scheduler(name, key)
    if name == "default":
        return
    cls, extra = SCHEDULERS[name]
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **extra)


def parse_lora_arg(text: str) -> tuple[str, float]:
    """'path' or 'path:scale' -> (path, scale)."""
    path, sep, scale = text.rpartition(":")
    if sep and path and not Path(text).exists():
        try:
            return path, float(scale)
        except ValueError:
            pass
    return text, 1.0


def check_loras(loras: list[tuple[str, float]]) -> None:
    for path, _ in loras:
        if not Path(path).exists():
            raise FinetuneError(f"--lora {path}: no such file or folder")


def read_loras(loras: list[tuple[str, float]], unet_config, family: Family | None = None) -> list[LoraWeights]:
    """Every LoRA file read (any common layout) and checked, before a model is loaded to use them."""
    check_loras(loras)
    return [read_lora(path, unet_config, family) for path, _ in loras]


def load_loras(pipe, loras: list[tuple[str, float]], family: Family | None = None, partial: bool = False,
               weights: list[LoraWeights] | None = None) -> dict[str, list[str]]:
    """Load each LoRA (a file in any common layout, or a folder with pytorch_lora_weights.safetensors) as its own
    adapter, at its scale (`weights`: the files, already read). Returns, per file, the layers left out because
    they do not fit the model (only with `partial`; otherwise such a file is an error)."""
    weights = weights or read_loras(loras, pipe.unet.config, family)
    names, unfit = [], {}
    for i, ((path, _), read) in enumerate(zip(loras, weights)):
        names.append(f"lora{i}")
        unfit[path] = load_lora(pipe, path, names[-1], family, partial=partial, weights=read)
    if names:
        pipe.set_adapters(names, adapter_weights=[scale for _, scale in loras])
    return unfit


def load_generator(model: str | ModelConfig, loras: list[tuple[str, float]] = (), scheduler: str = "dpm++",
                   device: str | None = None, key: str = "--model"):
    """The base model's text-to-image pipeline for its family, with `loras` ((file, scale) pairs) loaded and the
    named sampler, on `device` (default: CUDA in fp16 if there is one, else the CPU in fp32)."""
    model = model if isinstance(model, ModelConfig) else ModelConfig(pretrained=str(model))
    check_scheduler(scheduler, "--scheduler")
    check_loras(list(loras))
    facts = model_facts(model, key)
    family = decide(facts, key)
    if family.inpainting:
        raise FinetuneError(f"{key}: {model.pretrained} is {family.label}; give its base model as {key} (and this "
                            "one as --inpaint-model, with --init-image and --mask)")
    # The LoRA files are read before the model loads, so a bad one costs no loading (a single file without its
    # configs shows its U-Net config only once loaded).
    weights = read_loras(list(loras), facts.unet_config, family) if facts.unet_config else None
    device, dtype = device_and_dtype(device)
    pipe = load_pipeline(model, family.pipeline_class(), dtype=dtype)
    load_loras(pipe, list(loras), family, weights=weights)
    set_scheduler(pipe, scheduler, "--scheduler")
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def device_and_dtype(device: str | None = None) -> tuple[str, torch.dtype]:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return device, (torch.float16 if device.startswith("cuda") else torch.float32)


@torch.no_grad()
def generate(pipe, prompts: list[str], num_images: int = 1, seed: int = 0, steps: int = 25,
             guidance: float = 7.5, resolution: int | None = None, batch_size: int = 4,
             progress: bool = True, **pipe_kwargs) -> list[Image.Image]:
    """`num_images` images per prompt; image k of a prompt always uses seed + k, so runs compare 1:1.

    `pipe_kwargs` go to the pipeline call (output_type="latent" returns latents instead of images)."""
    jobs = [(prompt, seed + k) for prompt in prompts for k in range(num_images)]
    size = {"height": resolution, "width": resolution} if resolution else {}
    device = pipe._execution_device
    images = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        generators = [torch.Generator(device).manual_seed(s) for _, s in chunk]
        images += pipe([p for p, _ in chunk], num_inference_steps=steps, guidance_scale=guidance,
                       generator=generators, **size, **pipe_kwargs).images
        if progress:
            print(f"generated {len(images)}/{len(jobs)} images", flush=True)
    return images


def text_to_image(pipe, prompts: list[str], num_images: int = 1, seed: int = 0, steps: int = 25,
                  guidance: float = 7.5, resolution: int | None = None) -> list[Image.Image]:
    """Images drawn from noise: `num_images` per prompt, image k of a prompt from seed + k, at `resolution`
    (default: the model's own size, e.g. 1024 for SDXL base)."""
    return generate(pipe, prompts, num_images, seed, steps, guidance, resolution)


def save_images(images: list[Image.Image], out: str | Path, rows: int) -> Path:
    """out/0000.png, 0001.png, ... and out/grid.png (one row per prompt)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(out / f"{i:04d}.png")
    image_grid(images, rows=rows).save(out / "grid.png")
    return out
