"""Base model plus zero or more LoRAs -> images: drawn from noise, from an image, or into a masked region.

One documented function per mode: `text_to_image`, `image_to_image` and `inpaint`, each given the pipeline that
`load_generator` returns (the base model, its LoRAs, a sampler); `load_inpainter` loads an inpainting checkpoint
with the same LoRAs instead. The base model's family (finetune.family) picks diffusers' pipelines: SD 1.x/2.x or
SDXL (both text encoders and its size conditioning). Image-to-image and inpainting run diffusers' pipelines for
those modes built from the loaded components (`from_pipe`: nothing is loaded twice, the LoRAs stay in). A
v-prediction model keeps its prediction type through every sampler swap, since each sampler is built from the
model's own scheduler config. The samplers are shared with class-image generation and validation.

    pipe = load_generator("stable-diffusion-v1-5/stable-diffusion-v1-5", [("runs/dog", 0.9)])
    photo, mask = open_image("garden.png"), open_image("garden-mask.png", "mask")
    drawn = text_to_image(pipe, ["a photo of sks dog"], Sampling(num_images=2))
    moved = image_to_image(pipe, ["a photo of sks dog in the garden"], photo, strength=0.6)
    placed = inpaint(pipe, ["a photo of sks dog"], photo, mask)  # white in the mask: paint there
"""
from __future__ import annotations

import dataclasses
import logging
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
)
from PIL import Image

from .config import ModelConfig
from .data.images import open_rgb
from .errors import FinetuneError
from .export.embeddings import embeddings_for, load_into_pipeline, rewrite_prompt
from .export.lora_weights import LoraWeights, read_lora
from .export.pipeline_lora import load_lora
from .family import Family, decide, family_of_pipeline, model_facts
from .models import load_pipeline

log = logging.getLogger("finetune")
VAE_FACTOR = 8  # the VAE downsamples 8x: image sides must be multiples of it
IMG2IMG_STRENGTH, INPAINT_STRENGTH = 0.75, 1.0
BATCH_SIZE = 4  # images per pipeline call in generate

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
        load_token_embeddings(pipe, path, names[-1])
    if names:
        pipe.set_adapters(names, adapter_weights=[scale for _, scale in loras])
    return unfit


# The prompt words whose tokens load_token_embeddings added, by tokenizer: a pipeline built from another with
# from_pipe (image-to-image, inpainting) shares its tokenizers, so it rewrites prompts the same way.
_TRIGGERS: weakref.WeakKeyDictionary[Any, list[tuple[str, str]]] = weakref.WeakKeyDictionary()


def load_token_embeddings(pipe, path: str, adapter: str) -> None:
    """A pivotal-tuned LoRA's token embeddings (its run folder's embeddings file, or those bundled in its kohya
    file) into every text encoder, under tokens named after the adapter (so two LoRAs' tokens never clash);
    the trigger word in a prompt then stands for them, as in the UIs."""
    for embeddings in embeddings_for(path):
        tokens = [f"<{adapter}_{embeddings.word}_{k}>" for k in range(len(embeddings.tokens))]
        load_into_pipeline(pipe, embeddings, tokens, f"--lora {path}")
        words = _TRIGGERS.setdefault(pipe.tokenizer, [])
        words += [(embeddings.word, "".join(tokens)), ("".join(embeddings.tokens), "".join(tokens))]
        log.info("--lora %s: its embeddings for %r are loaded; %r in a prompt stands for them", path,
                 embeddings.word, embeddings.word)


def with_trigger_tokens(pipe, prompts: list[str]) -> list[str]:
    """The prompts with each pivotal-tuned LoRA's word (or its training tokens, <s0><s1>) as its loaded tokens."""
    tokenizer = getattr(pipe, "tokenizer", None)
    for word, tokens in _TRIGGERS.get(tokenizer, []) if tokenizer is not None else []:
        prompts = [p.replace(word, tokens) if word.startswith("<") else rewrite_prompt(p, word, tokens)
                   for p in prompts]
    return prompts


def load_generator(model: str | ModelConfig, loras: Sequence[tuple[str, float]] = (), scheduler: str = "dpm++",
                   device: str | None = None, key: str = "--model"):
    """The base model's text-to-image pipeline for its family, with `loras` ((file, scale) pairs) loaded and the
    named sampler, on `device` (default: CUDA in fp16 if there is one, else the CPU in fp32). Every mode below
    takes it."""
    model = _model_config(model)
    check_scheduler(scheduler, "--scheduler")
    check_loras(list(loras))
    facts = model_facts(model, key)
    family = decide(facts, key)
    if family.inpainting:
        raise FinetuneError(f"{key}: {model.pretrained} is {family.label}; give its base model as {key} (and this "
                            "one as --inpaint-model, with --init-image and --mask)")
    return _load(model, facts, family, "text2img", loras, scheduler, device)


def load_inpainter(inpaint_model: str | ModelConfig, base_model: str | ModelConfig,
                   loras: Sequence[tuple[str, float]] = (), scheduler: str = "dpm++", device: str | None = None):
    """An inpainting checkpoint (a U-Net that also sees the mask) of `base_model`'s family, with the LoRAs trained
    on `base_model`: the layers of theirs it does not have (e.g. a LoRA on the 4-channel input convolution) are
    left out, with a notice naming them."""
    inpaint_model, base_model = _model_config(inpaint_model), _model_config(base_model)
    check_scheduler(scheduler, "--scheduler")
    check_loras(list(loras))
    base = decide(model_facts(base_model, "--model"), "--model")
    facts = model_facts(inpaint_model, "--inpaint-model")
    family = decide(facts, "--inpaint-model")
    if not family.inpainting:
        raise FinetuneError(f"--inpaint-model: {inpaint_model.pretrained} is {family.label}, not an inpainting model "
                            "(its U-Net takes no mask); leave --inpaint-model out to inpaint with --model's weights")
    if family.base != base.base:
        raise FinetuneError(f"--inpaint-model: {inpaint_model.pretrained} is {family.label}, but --model "
                            f"{base_model.pretrained}, which the LoRAs were trained on, is {base.label}")
    return _load(inpaint_model, facts, family, "inpaint", loras, scheduler, device)


def _load(model: ModelConfig, facts, family: Family, mode: str, loras, scheduler: str, device: str | None):
    # The LoRA files are read before the model loads, so a bad one costs no loading (a single file without its
    # configs shows its U-Net config only once loaded).
    weights = read_loras(list(loras), facts.unet_config, family) if facts.unet_config else None
    device, dtype = device_and_dtype(device)
    pipe: Any = load_pipeline(model, family.pipeline_class(mode), dtype=dtype)  # the family's class, as asked
    unfit = load_loras(pipe, list(loras), family, partial=family.inpainting, weights=weights)
    for path, layers in unfit.items():
        if layers:
            log.warning("notice: --lora %s: %d of its layers do not apply to %s and are left out: %s", path,
                        len(layers), model.pretrained, ", ".join(layers[:5]) + (", ..." if len(layers) > 5 else ""))
    set_scheduler(pipe, scheduler, "--scheduler")
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _model_config(model: str | ModelConfig) -> ModelConfig:
    return model if isinstance(model, ModelConfig) else ModelConfig(pretrained=str(model))


def device_and_dtype(device: str | None = None) -> tuple[str, torch.dtype]:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return device, (torch.float16 if device.startswith("cuda") else torch.float32)


@torch.no_grad()
def generate(pipe, prompts: list[str], num_images: int = 1, seed: int = 0, steps: int = 25,
             guidance: float = 7.5, resolution: int | None = None, batch_size: int = BATCH_SIZE,
             progress: bool = True, per_image: dict | None = None, **pipe_kwargs) -> list[Image.Image]:
    """`num_images` images per prompt; image k of a prompt always uses seed + k, so runs compare 1:1.

    `per_image` values (an input image, a mask) are given to every image of a batch; `pipe_kwargs` go to the
    pipeline call as they are (output_type="latent" returns latents instead of images)."""
    jobs = [(prompt, seed + k) for prompt in prompts for k in range(num_images)]
    return draw_jobs(pipe, jobs, steps, guidance, resolution, batch_size, progress, per_image, **pipe_kwargs)


def generation_batches(jobs: list[tuple[str, int]], batch_size: int = BATCH_SIZE) -> list[list[tuple[str, int]]]:
    """The batches `generate` draws `jobs` in. The batch decides an image's last bits on some hardware (CPU kernels
    differ by batch shape), so a PNG records its batch and `generate --from-png` redraws that batch."""
    return [jobs[start:start + batch_size] for start in range(0, len(jobs), batch_size)]


@torch.no_grad()
def draw_jobs(pipe, jobs: list[tuple[str, int]], steps: int = 25, guidance: float = 7.5,
              resolution: int | None = None, batch_size: int = BATCH_SIZE, progress: bool = True,
              per_image: dict | None = None, **pipe_kwargs) -> list[Image.Image]:
    """One image per (prompt, seed) job, `batch_size` jobs per pipeline call."""
    size = {"height": resolution, "width": resolution} if resolution else {}
    device = pipe._execution_device
    images = []
    for chunk in generation_batches(jobs, batch_size):
        generators = [torch.Generator(device).manual_seed(s) for _, s in chunk]
        inputs = {name: [value] * len(chunk) for name, value in (per_image or {}).items()}
        # lora.pivotal's word becomes its trained tokens (the PNG records the prompt as the user wrote it)
        images += pipe(with_trigger_tokens(pipe, [p for p, _ in chunk]), num_inference_steps=steps,
                       guidance_scale=guidance,
                       generator=generators, **size, **inputs, **pipe_kwargs).images
        if progress:
            print(f"generated {len(images)}/{len(jobs)} images", flush=True)
    return images


@dataclasses.dataclass
class Sampling:
    """How every mode draws: image k of a prompt from seed + k; the negative prompt is used for all prompts.
    `batch`, when set, is drawn instead (its (prompt, seed) jobs in one call): `generate --from-png` redraws the
    batch an image was drawn in, which decides its last bits on a CPU."""
    num_images: int = 1
    seed: int = 0
    steps: int = 25
    guidance: float = 7.5  # classifier-free guidance scale
    negative_prompt: str | None = None
    batch: list[tuple[str, int]] | None = None

    def count(self, prompts: list[str]) -> int:
        return len(self.batch) if self.batch is not None else len(prompts) * self.num_images

    def run(self, pipe, prompts: list[str], per_image: dict | None = None, **kwargs) -> list[Image.Image]:
        per_image = dict(per_image or {})
        if self.negative_prompt is not None:  # one per prompt in a batch: diffusers wants a list beside a list
            per_image["negative_prompt"] = self.negative_prompt
        if self.batch is not None:
            return draw_jobs(pipe, self.batch, self.steps, self.guidance, batch_size=len(self.batch),
                             per_image=per_image, **kwargs)
        return generate(pipe, prompts, self.num_images, self.seed, self.steps, self.guidance, per_image=per_image,
                        **kwargs)


def text_to_image(pipe, prompts: list[str], sampling: Sampling = Sampling(),
                  resolution: int | None = None) -> list[Image.Image]:
    """Images drawn from noise, `sampling.num_images` per prompt, at `resolution` (a multiple of 8; default: the
    model's own size, e.g. 1024 for SDXL base)."""
    check_resolution(resolution)
    return sampling.run(pipe, prompts, resolution=resolution)


def image_to_image(pipe, prompts: list[str], init_image: Image.Image, strength: float = IMG2IMG_STRENGTH,
                   sampling: Sampling = Sampling()) -> list[Image.Image]:
    """Images that start from `init_image` (sides multiples of 8) noised by `strength` in [0, 1]: 0 keeps it (it
    only passes through the VAE), 1 draws anew; of `sampling.steps`, strength x steps are taken."""
    check_size(init_image, "--init-image")
    check_strength(strength)
    family = family_of_pipeline(pipe)
    img2img = family.pipeline_class("img2img").from_pipe(pipe)
    img2img.set_progress_bar_config(disable=True)
    init_image = init_image.convert("RGB")
    if int(sampling.steps * strength) == 0:  # not one denoising step at this strength: what the VAE gives back
        return [vae_round_trip(img2img, init_image)] * sampling.count(prompts)
    return sampling.run(img2img, prompts, per_image={"image": init_image}, strength=strength)


def inpaint(pipe, prompts: list[str], init_image: Image.Image, mask: Image.Image, strength: float = INPAINT_STRENGTH,
            sampling: Sampling = Sampling()) -> list[Image.Image]:
    """Paint into the white part of `mask` (same size as `init_image`; grey blends): with `pipe` from
    load_generator, diffusers' inpainting pipeline runs on the base model's own weights (the LoRA's model); with
    one from load_inpainter, on the inpainting checkpoint. Outside the mask the result is `init_image` itself:
    the input is laid back over it, as the UIs do, rather than returned through the VAE."""
    check_size(init_image, "--init-image")
    check_mask(mask, init_image)
    check_strength(strength)
    family = family_of_pipeline(pipe)
    inpainting = family.pipeline_class("inpaint")
    painter = pipe if isinstance(pipe, inpainting) else inpainting.from_pipe(pipe)
    painter.set_progress_bar_config(disable=True)
    init_image, mask = init_image.convert("RGB"), mask.convert("L")
    if int(sampling.steps * strength) == 0:
        images = [vae_round_trip(painter, init_image)] * sampling.count(prompts)
    else:
        width, height = init_image.size
        images = sampling.run(painter, prompts, per_image={"image": init_image, "mask_image": mask},
                              strength=strength, height=height, width=width)
    return [painter.image_processor.apply_overlay(mask, init_image, image) for image in images]


@torch.no_grad()
def vae_round_trip(pipe, image: Image.Image) -> Image.Image:
    """`image` encoded by the pipeline's VAE (the latents' mean) and decoded: image-to-image with no step."""
    vae = pipe.vae
    pixels = pipe.image_processor.preprocess(image).to(vae.device, vae.dtype)
    latents = vae.encode(pixels).latent_dist.mode()
    return pipe.image_processor.postprocess(vae.decode(latents).sample, output_type="pil")[0]


def open_image(path: str | Path, what: str = "init-image") -> Image.Image:
    """An input image or mask for --init-image / --mask, upright and in RGB; a one-line error naming the option
    if it is missing or unreadable."""
    if not Path(path).is_file():
        raise FinetuneError(f"--{what} {path}: no such file")
    try:
        return open_rgb(path)
    except FinetuneError as exc:
        raise FinetuneError(f"--{what} {exc}") from None


def check_resolution(resolution: int | None) -> None:
    if resolution is not None and (resolution <= 0 or resolution % VAE_FACTOR):
        raise FinetuneError(f"--resolution {resolution}: give a positive multiple of {VAE_FACTOR} pixels")


def check_size(image: Image.Image, key: str) -> None:
    width, height = image.size
    if width % VAE_FACTOR or height % VAE_FACTOR:
        fit = f"{width // VAE_FACTOR * VAE_FACTOR}x{height // VAE_FACTOR * VAE_FACTOR}"
        raise FinetuneError(f"{key}: the image is {width}x{height} pixels; Stable Diffusion's VAE needs sides that "
                            f"are multiples of {VAE_FACTOR}: crop or resize it, e.g. to {fit}")


def check_mask(mask: Image.Image, image: Image.Image) -> None:
    if mask.size != image.size:
        raise FinetuneError(f"--mask: the mask is {mask.size[0]}x{mask.size[1]} pixels but the image "
                            f"{image.size[0]}x{image.size[1]}; give a mask of the image's size (white: paint there)")


def check_strength(strength: float) -> None:
    if not 0.0 <= strength <= 1.0:
        raise FinetuneError(f"--strength {strength:g}: give a value from 0 (keep the input) to 1 (draw anew)")


@dataclasses.dataclass
class Generator:
    """What `generate` draws with: the model and its LoRAs (path, scale), the sampler, the device and the size."""
    model: str
    loras: list[tuple[str, float]] = dataclasses.field(default_factory=list)
    scheduler: str = "dpm++"
    device: str | None = None
    resolution: int | None = None  # None: the model's own (or, editing, the input picture's)


@dataclasses.dataclass
class Edit:
    """What an edit starts from: image-to-image with init_image, inpainting with a mask too (and optionally an
    inpainting model); all None draws from noise."""
    init_image: str | None = None
    mask: str | None = None
    strength: float | None = None
    inpaint_model: str | None = None


def generate_command(prompts: list[str], generator: Generator, sampling: Sampling,
                     edit: Edit = Edit()) -> tuple[list[Image.Image], Image.Image | None]:
    """What `finetune generate` does: every option checked before a model loads, then the mode they ask for
    (text-to-image; image-to-image with --init-image; inpainting with --mask too). Returns the images and the
    input image, which the grid shows beside them."""
    photo, region = read_edit_inputs(edit, generator.resolution)
    if edit.inpaint_model:
        pipe = load_inpainter(edit.inpaint_model, generator.model, generator.loras, generator.scheduler,
                              generator.device)
    else:
        pipe = load_generator(generator.model, generator.loras, generator.scheduler, generator.device)
    if region is not None and photo is not None:
        strength = INPAINT_STRENGTH if edit.strength is None else edit.strength
        return inpaint(pipe, prompts, photo, region, strength, sampling), photo
    if photo is not None:
        strength = IMG2IMG_STRENGTH if edit.strength is None else edit.strength
        return image_to_image(pipe, prompts, photo, strength, sampling), photo
    return text_to_image(pipe, prompts, sampling, generator.resolution), None


def read_edit_inputs(edit: Edit, resolution: int | None) -> tuple[Image.Image | None, Image.Image | None]:
    """The input picture and mask, each checked (and the options that go with them) before any model loads."""
    if edit.init_image is None:
        for option, value in (("--mask", edit.mask), ("--strength", edit.strength),
                              ("--inpaint-model", edit.inpaint_model)):
            if value is not None:
                raise FinetuneError(f"{option} needs --init-image, the picture to start from")
    elif resolution is not None:
        raise FinetuneError("--resolution: the images take --init-image's size; leave --resolution out")
    if edit.inpaint_model is not None and edit.mask is None:
        raise FinetuneError("--inpaint-model needs --mask, the region to paint")
    check_resolution(resolution)
    if edit.strength is not None:
        check_strength(edit.strength)
    photo = open_image(edit.init_image) if edit.init_image is not None else None
    if photo is not None:
        check_size(photo, "--init-image")
    region = open_image(edit.mask, "mask") if edit.mask is not None else None
    if region is not None and photo is not None:  # a mask without --init-image was refused above
        check_mask(region, photo)
    return photo, region

