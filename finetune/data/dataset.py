"""The subject dataset: instance and class examples, a resumable sampling order, and the encoded batch."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import hashlib

import torch
from tqdm.auto import tqdm

from ..config import DataConfig
from ..errors import FinetuneError
from .images import list_images, open_rgb, read_caption, resize_and_crop, to_tensor

INSTANCE_STREAM, CLASS_STREAM, AUGMENT_STREAM, NOISE_STREAM = 1, 2, 3, 10


@dataclass(frozen=True)
class Example:
    path: Path
    prompt: str


def instance_examples(data: DataConfig) -> list[Example]:
    """Every photo of the subject, captioned by its caption file or else by the instance prompt."""
    paths = list_images(data.instance_dir, "data.instance_dir")
    # Decoding every photo up front (fail now, not 300 steps in) is data.screening's job.
    return [Example(p, read_caption(p, data.caption_extension) or data.instance_prompt) for p in paths]


def class_examples(class_dir: str, prompt: str, count: int) -> list[Example]:
    paths = list_images(class_dir, "data.class_dir")
    if len(paths) < count:
        raise FinetuneError(f"data.class_dir: {class_dir} has {len(paths)} class images, prior.num_class_images "
                            f"asks for {count}; generate them (the recipe does) or lower the number")
    return [Example(p, prompt) for p in paths[:count]]


def step_generator(seed: int, stream: int, position: int, device="cpu") -> torch.Generator:
    """A generator that depends only on (seed, stream, position), so a resumed run draws the same numbers.

    On the training device it draws noise there directly: no host-to-device copy, no sync per step. The three
    numbers are hashed, so no (stream, position) pair shares its numbers with another.
    """
    digest = hashlib.blake2b(f"{seed}/{stream}/{position}".encode(), digest_size=8).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little") % (2**63))


def stream_index(seed: int, stream: int, position: int, length: int) -> int:
    """Item `position` of an endless run of seeded shuffles of range(length): every item once per epoch."""
    epoch, offset = divmod(position, length)
    return epoch_order(seed, stream, epoch, length)[offset]


@lru_cache(maxsize=64)
def epoch_order(seed: int, stream: int, epoch: int, length: int) -> tuple[int, ...]:
    return tuple(torch.randperm(length, generator=step_generator(seed, stream, -1 - epoch)).tolist())


@dataclass
class BatchPlan:
    instance: list[int]   # indices into the instance examples
    classes: list[int]    # indices into the class examples (empty without prior preservation)
    flips: list[bool]     # one per sample, instance samples first
    crops: list[tuple[float, float]]  # relative crop corners, one per sample
    positions: list[int]  # the samples' places in the run's one global sample order


def plan_batch(seed: int, micro_step: int, batch_size: int, num_instance: int, repeats: int, num_class: int,
               random_flip: bool, random_crop: bool, rank: int = 0, world_size: int = 1,
               offset: int = 0) -> BatchPlan:
    """Which samples micro-step `micro_step` (counted from sample `offset`) trains on: a pure function, so resumable.

    The run has one global order of sample positions; micro-step m of process `rank` takes positions
    offset + (m x world_size + rank) x batch_size onwards, so processes never share a sample, and 2 processes x
    batch 1 take the same samples per step as 1 process x batch 2. Flips and crops depend on the position only.
    """
    first = offset + (micro_step * world_size + rank) * batch_size
    positions = list(range(first, first + batch_size))
    instance = [stream_index(seed, INSTANCE_STREAM, p, num_instance * repeats) % num_instance for p in positions]
    classes = [stream_index(seed, CLASS_STREAM, p, num_class) for p in positions] if num_class else []
    draws = [torch.rand(6, generator=step_generator(seed, AUGMENT_STREAM, p)).tolist() for p in positions]
    # Per position: (instance flip, class flip, instance corner x/y, class corner x/y).
    flips = [d[0] < 0.5 for d in draws] + ([d[1] < 0.5 for d in draws] if num_class else [])
    corners = [(d[2], d[3]) for d in draws] + ([(d[4], d[5]) for d in draws] if num_class else [])
    return BatchPlan(instance, classes, flips if random_flip else [False] * len(flips),
                     corners if random_crop else [(0.5, 0.5)] * len(corners), positions)


def sample_generators(seed: int, plan: BatchPlan, device="cpu") -> list[torch.Generator]:
    """One noise generator per sample, keyed by its position (instance 2p, class 2p + 1), not by process or batch:
    each sample draws the same latent noise, diffusion noise and timestep however the batch is split."""
    keys = [2 * p for p in plan.positions] + [2 * p + 1 for p in plan.positions[:len(plan.classes)]]
    return [step_generator(seed, NOISE_STREAM, k, device) for k in keys]


def cache_keys(plans: list[BatchPlan], num_instance: int) -> set[tuple[int, bool]]:
    """The (example, flip) pairs these plans read: what one process's share of the run needs encoded."""
    return {(i, f) for plan in plans
            for i, f in zip(plan.instance + [num_instance + c for c in plan.classes], plan.flips)}


def load_pixels(example: Example, resolution: int, flip: bool, corner: tuple[float, float]) -> torch.Tensor:
    image, _ = resize_and_crop(open_rgb(example.path), resolution, resolution, corner)
    pixels = to_tensor(image)
    return pixels.flip(-1) if flip else pixels


class LatentSource:
    """VAE latents of examples; with `cache`, each (example, flip) is encoded once and its distribution kept.

    `keys` limits the cache to the (example, flip) pairs a process will read (its share); default: all of them.
    """

    def __init__(self, vae, examples: list[Example], resolution: int, cache: bool, flips: bool, device,
                 keys: set[tuple[int, bool]] | None = None):
        self.vae, self.examples, self.resolution, self.device = vae, examples, resolution, device
        self.scale = vae.config.scaling_factor
        self.shift = getattr(vae.config, "shift_factor", None) or 0.0
        self.cache: dict[tuple[int, bool], tuple[torch.Tensor, torch.Tensor]] = {}
        if cache:
            every = [(i, f) for i in range(len(examples)) for f in ((False, True) if flips else (False,))]
            # One image per VAE call: a latent must not depend on which others share its batch (float results
            # do), or a process's share, or a resumed run, would encode the same photo slightly differently.
            for i, f in tqdm([k for k in every if keys is None or k in keys], desc="caching latents", leave=False,
                             disable=len(every) <= 8):
                mean, std = self._encode([load_pixels(examples[i], resolution, f, (0.5, 0.5))])
                self.cache[(i, f)] = (mean[0], std[0])

    @torch.no_grad()
    def _encode(self, pixels: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = torch.stack(pixels).to(self.device, dtype=self.vae.dtype)
        dist = self.vae.encode(batch).latent_dist
        return dist.mean.float(), dist.std.float()

    def sample(self, indices: list[int], flips: list[bool], corners, generators: list[torch.Generator]) -> torch.Tensor:
        """Draw latents (already scaled for the U-Net) for the given examples, sample k's noise from generators[k]."""
        if self.cache:
            mean = torch.stack([self.cache[(i, f)][0] for i, f in zip(indices, flips)])
            std = torch.stack([self.cache[(i, f)][1] for i, f in zip(indices, flips)])
        else:
            mean, std = self._encode([load_pixels(self.examples[i], self.resolution, f, c)
                                      for i, f, c in zip(indices, flips, corners)])
        noise = torch.cat([torch.randn((1, *mean.shape[1:]), generator=g, device=mean.device) for g in generators])
        return (mean + std * noise - self.shift) * self.scale


class PromptEmbeddings:
    """Text-encoder outputs for prompts; computed once per prompt when the encoder is frozen and `cache` is on."""

    def __init__(self, tokenizer, text_encoder, prompts: list[str], cache: bool, device):
        self.tokenizer, self.text_encoder, self.device = tokenizer, text_encoder, device
        self.cache: dict[str, torch.Tensor] = {}
        if cache:
            unique = sorted(set(prompts))
            with torch.no_grad():
                for start in range(0, len(unique), 16):
                    chunk = unique[start:start + 16]
                    self.cache.update(zip(chunk, self.encode(chunk)))

    def token_ids(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return self.text_encoder(self.token_ids(prompts).to(self.device))[0]

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        if self.cache:
            return torch.stack([self.cache[p] for p in prompts])
        return self.encode(prompts)
