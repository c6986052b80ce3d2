"""Base model plus zero or more LoRAs -> images, and the samplers shared with class-image generation."""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, PNDMScheduler)
from PIL import Image

from .console import brief
from .errors import FinetuneError

BATCH_SIZE = 4  # images per pipeline call in generate
SCHEDULERS = {
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "pndm": (PNDMScheduler, {}),
}


def set_scheduler(pipe, name: str, key: str = "scheduler") -> None:
    """Swap the pipeline's sampler by name ('default' keeps the model's own); the noise schedule is kept.
    An unknown name is a one-line error naming `key`, the option it came from."""
    if name == "default":
        return
    if name not in SCHEDULERS:
        raise FinetuneError(f"{key}: {name!r} is unknown; choose default or one of {', '.join(SCHEDULERS)}")
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


def load_loras(pipe, loras: list[tuple[str, float]]) -> None:
    """Load each LoRA (a file or a folder with pytorch_lora_weights.safetensors) as its own adapter."""
    names = []
    for i, (path, _) in enumerate(loras):
        if not Path(path).exists():
            raise FinetuneError(f"--lora {path}: no such file or folder")
        names.append(f"lora{i}")
        try:
            pipe.load_lora_weights(path, adapter_name=names[-1])
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise FinetuneError(f"--lora {path}: could not be loaded ({brief(exc, 200)})") from None
    if names:
        pipe.set_adapters(names, adapter_weights=[scale for _, scale in loras])


def device_and_dtype(device: str | None = None) -> tuple[str, torch.dtype]:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return device, (torch.float16 if device.startswith("cuda") else torch.float32)


@torch.no_grad()
def generate(pipe, prompts: list[str], num_images: int = 1, seed: int = 0, steps: int = 25,
             guidance: float = 7.5, resolution: int | None = None, batch_size: int = BATCH_SIZE,
             progress: bool = True, **pipe_kwargs) -> list[Image.Image]:
    """`num_images` images per prompt; image k of a prompt always uses seed + k, so runs compare 1:1.

    `pipe_kwargs` go to the pipeline call (output_type="latent" returns latents instead of images)."""
    jobs = [(prompt, seed + k) for prompt in prompts for k in range(num_images)]
    return draw_jobs(pipe, jobs, steps, guidance, resolution, batch_size, progress, **pipe_kwargs)


def generation_batches(jobs: list[tuple[str, int]], batch_size: int = BATCH_SIZE) -> list[list[tuple[str, int]]]:
    """The batches `generate` draws `jobs` in. The batch decides an image's last bits on some hardware (CPU kernels
    differ by batch shape), so a PNG records its batch and `generate --from-png` redraws that batch."""
    return [jobs[start:start + batch_size] for start in range(0, len(jobs), batch_size)]


@torch.no_grad()
def draw_jobs(pipe, jobs: list[tuple[str, int]], steps: int = 25, guidance: float = 7.5,
              resolution: int | None = None, batch_size: int = BATCH_SIZE, progress: bool = True,
              **pipe_kwargs) -> list[Image.Image]:
    """One image per (prompt, seed) job, `batch_size` jobs per pipeline call."""
    size = {"height": resolution, "width": resolution} if resolution else {}
    device = pipe._execution_device
    images = []
    for chunk in generation_batches(jobs, batch_size):
        generators = [torch.Generator(device).manual_seed(s) for _, s in chunk]
        images += pipe([p for p, _ in chunk], num_inference_steps=steps, guidance_scale=guidance,
                       generator=generators, **size, **pipe_kwargs).images
        if progress:
            print(f"generated {len(images)}/{len(jobs)} images", flush=True)
    return images
