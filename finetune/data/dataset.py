"""The subject dataset: instance and class examples, a resumable sampling order, and the encoded batch."""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..config import DataConfig
from ..errors import FinetuneError
from .buckets import Size, bucket_batch
from .captions import batch_prompts, example_prompt, find_caption
from .images import list_images, open_rgb, resize_and_crop, to_tensor
from .masks import MaskSource, load_mask, to_latent_grid

INSTANCE_STREAM, CLASS_STREAM, AUGMENT_STREAM, CAPTION_STREAM, NOISE_STREAM = 1, 2, 3, 4, 10


@dataclass(frozen=True)
class Example:
    path: Path | str                  # the photo, or `dataset[row]` for a row of a `datasets` dataset
    prompt: str
    loader: Callable[[], Image.Image] | None = field(default=None, compare=False, repr=False)
    mask: MaskSource | None = field(default=None, compare=False)  # data.masks: its loss mask (finetune.data.masks)

    def open(self) -> Image.Image:
        return self.loader() if self.loader is not None else open_rgb(self.path)


def instance_examples(data: DataConfig) -> list[Example]:
    """Every photo of the subject (a folder, or data.dataset), prompted by its caption with the trigger phrase,
    or else by the instance prompt."""
    if data.dataset:
        if data.instance_dir:
            raise FinetuneError("data.dataset and data.instance_dir are both set; keep one of them")
        return dataset_examples(data)
    paths = list_images(data.instance_dir, "data.instance_dir")
    # Decoding every photo up front (fail now, not 300 steps in) is data.screening's job.
    return [Example(p, example_prompt(find_caption(p, data.caption_extension), data.instance_prompt,
                                      data.trigger, f"{p}'s caption")) for p in paths]


def dataset_examples(data: DataConfig) -> list[Example]:
    from .hf_dataset import dataset_rows, row_image

    name = data.dataset or ""  # instance_examples calls this only with data.dataset set
    dataset, rows = dataset_rows(name, data.dataset_split, data.image_column, data.caption_column)

    def loader(i: int) -> Callable[[], Image.Image]:
        return lambda: row_image(dataset, i, data.image_column)
    return [Example(f"{name}[{i}]", example_prompt(caption, data.instance_prompt, data.trigger,
                                                   f"data.dataset row {i}'s caption"), loader(i))
            for i, caption in rows]


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
    """One micro-batch: instance samples first, then class samples, as indices into the run's example list (the
    instance examples, then the class examples), so every reader indexes that one list directly."""
    instance: list[int]   # indices of instance examples
    classes: list[int]    # indices of class examples (empty without prior preservation)
    flips: list[bool]     # one per sample, instance samples first
    crops: list[tuple[float, float]]  # relative crop corners, one per sample
    positions: list[int]  # the samples' places in the run's one global sample order
    size: Size | None = None  # (width, height) of every sample in the batch with buckets; None: the square resolution

    @property
    def examples(self) -> list[int]:
        return self.instance + self.classes


@dataclass(frozen=True)
class SampleOrder:
    """The run's one global sample order: everything plan_batch needs besides the micro-step and the process."""
    seed: int
    batch_size: int                 # instance samples per micro-batch (as many class samples, with a prior)
    num_instance: int               # instance examples, at the front of the example list
    num_class: int = 0              # class examples after them (0: no prior preservation)
    repeats: int = 1                # data.repeats: each photo this many times per epoch
    random_flip: bool = False
    random_crop: bool = False
    offset: int = 0                 # samples already seen: a resumed run goes on from here
    buckets: list[Size] | None = None  # each instance example's bucket, with data.buckets


def plan_batch(order: SampleOrder, micro_step: int, rank: int = 0, world_size: int = 1) -> BatchPlan:
    """Which samples micro-step `micro_step` (counted from sample `order.offset`) trains on: a pure function, so
    resumable.

    The run has one global order of sample positions; micro-step m of process `rank` takes positions
    offset + (m x world_size + rank) x batch_size onwards, so processes never share a sample, and 2 processes x
    batch 1 take the same samples per step as 1 process x batch 2. Flips and crops depend on the position only.

    With buckets (each instance example's size), the global order is one of whole batches, each from one bucket:
    position p is slot p % batch_size of bucketed batch p // batch_size, so a process's batch_size positions are
    always one such batch (its size is the plan's `size`), whatever the process count.
    """
    batch_size, seed = order.batch_size, order.seed
    first = order.offset + (micro_step * world_size + rank) * batch_size
    positions = list(range(first, first + batch_size))
    size = None
    if order.buckets:
        if order.offset % batch_size:
            raise FinetuneError(f"train.batch_size: this run has seen {order.offset} samples, not a multiple of "
                                f"batch_size={batch_size}; resume a run with data.buckets at the batch size it "
                                "was saved with")
        instance, size = bucket_batch(seed, first // batch_size, order.buckets, batch_size, order.repeats)
    else:
        instance = [stream_index(seed, INSTANCE_STREAM, p, order.num_instance * order.repeats) % order.num_instance
                    for p in positions]
    with_class = order.num_class > 0
    classes = [order.num_instance + stream_index(seed, CLASS_STREAM, p, order.num_class) for p in positions] \
        if with_class else []
    draws = [torch.rand(6, generator=step_generator(seed, AUGMENT_STREAM, p)).tolist() for p in positions]
    # Per position: (instance flip, class flip, instance corner x/y, class corner x/y).
    flips = [d[0] < 0.5 for d in draws] + ([d[1] < 0.5 for d in draws] if with_class else [])
    corners = [(d[2], d[3]) for d in draws] + ([(d[4], d[5]) for d in draws] if with_class else [])
    return BatchPlan(instance, classes, flips if order.random_flip else [False] * len(flips),
                     corners if order.random_crop else [(0.5, 0.5)] * len(corners), positions, size)


def sample_generators(seed: int, plan: BatchPlan, device="cpu") -> list[torch.Generator]:
    """One noise generator per sample, keyed by its position (instance 2p, class 2p + 1), not by process or batch:
    each sample draws the same latent noise, diffusion noise and timestep however the batch is split."""
    keys = [2 * p for p in plan.positions] + [2 * p + 1 for p in plan.positions[:len(plan.classes)]]
    return [step_generator(seed, NOISE_STREAM, k, device) for k in keys]


def plan_prompts(seed: int, plan: BatchPlan, examples: list[Example], data: DataConfig) -> list[str]:
    """This micro-step's prompts, instance samples first: each photo's prompt with caption dropout and tag
    shuffling drawn from a generator keyed by the sample's position (as the noise is), class prompts as they are."""
    prompts = [examples[i].prompt for i in plan.examples]
    generators = [step_generator(seed, CAPTION_STREAM, p) for p in plan.positions[:len(plan.instance)]] \
        if data.caption_dropout or data.shuffle_tags else []
    return batch_prompts(prompts, len(plan.instance), data.caption_dropout, data.shuffle_tags, data.keep_tags,
                         generators)


def cache_keys(plans: list[BatchPlan]) -> set[tuple[int, bool, Size | None]]:
    """The (example, flip, size) triples these plans read: what one process's share of the run needs encoded.

    With buckets a class image is read at the size of each batch it joins, so only at the buckets it meets."""
    return {(i, f, plan.size) for plan in plans for i, f in zip(plan.examples, plan.flips)}


Geometry = tuple[int, int, int, int, int, int]  # original (h, w), crop top-left (top, left), target (h, w)


def load_pixels(example: Example, size: Size, flip: bool, corner: tuple[float, float]
                ) -> tuple[torch.Tensor, Geometry]:
    """The example resized and cropped to size (width, height), and where the crop came from (SDXL's
    conditioning; for a flipped crop, the corner it has in the flipped image)."""
    original = example.open()
    width, height = size
    image, (top, left) = resize_and_crop(original, width, height, corner)
    pixels = to_tensor(image)
    if flip:
        resized_w = max(width, round(original.width * max(width / original.width, height / original.height)))
        pixels, left = pixels.flip(-1), resized_w - width - left
    return pixels, (original.height, original.width, top, left, height, width)


class LatentSource:
    """VAE latents of examples; with `cache`, each (example, flip, size) is encoded once and its distribution kept.

    `keys` limits the cache to the (example, flip, size) triples a process will read (its share, see cache_keys);
    a size of None is the square training resolution. Default: every example and flip at that resolution.
    """

    def __init__(self, vae, examples: list[Example], resolution: int, cache: bool, flips: bool, device,
                 keys: set[tuple[int, bool, Size | None]] | None = None):
        self.vae, self.examples, self.resolution, self.device = vae, examples, resolution, device
        self.scale = vae.config.scaling_factor
        self.shift = getattr(vae.config, "shift_factor", None) or 0.0
        # (example, flip, size) -> (latent mean, std, geometry, loss mask on the latent grid or None)
        self.cache: dict[tuple[int, bool, Size], tuple[torch.Tensor, torch.Tensor, Geometry, torch.Tensor | None]] = {}
        if cache:
            if keys is None:
                keys = {(i, f, None) for i in range(len(examples)) for f in ((False, True) if flips else (False,))}
            todo = sorted({(i, f, self.size(s)) for i, f, s in keys})
            # One image per VAE call: a latent must not depend on which others share its batch (float results
            # do), or a process's share, or a resumed run, would encode the same photo slightly differently.
            for i, f, size in tqdm(todo, desc="caching latents", leave=False, disable=len(todo) <= 8):
                mean, std, geometry, masks = self._load_and_encode([i], [f], [(0.5, 0.5)], size)
                self.cache[(i, f, size)] = (mean[0], std[0], geometry[0], masks[0])

    def size(self, size: Size | None) -> Size:
        return size or (self.resolution, self.resolution)

    def _load_and_encode(self, indices, flips, corners, size: Size):
        loaded = [load_pixels(self.examples[i], size, f, c) for i, f, c in zip(indices, flips, corners)]
        mean, std = self._encode([pixels for pixels, _ in loaded])
        geometries = [geometry for _, geometry in loaded]
        latent_size = (mean.shape[-2], mean.shape[-1])
        masks = [self._latent_mask(self.examples[i], g, size, f, c, latent_size)
                 for i, g, f, c in zip(indices, geometries, flips, corners)]
        return mean, std, geometries, masks

    def _latent_mask(self, example: Example, geometry: Geometry, size: Size, flip: bool, corner,
                     latent_size: tuple[int, int]) -> torch.Tensor | None:
        """The example's loss mask through its photo's crop and flip, on the latent grid (None: no mask)."""
        if example.mask is None:
            return None
        photo_size = (geometry[1], geometry[0])  # geometry starts with the photo's (height, width)
        return to_latent_grid(load_mask(example.mask, photo_size, size, flip, corner), latent_size).to(self.device)

    @torch.no_grad()
    def _encode(self, pixels: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = torch.stack(pixels).to(self.device, dtype=self.vae.dtype)
        dist = self.vae.encode(batch).latent_dist
        return dist.mean.float(), dist.std.float()

    def sample(self, indices: list[int], flips: list[bool], corners, generators: list[torch.Generator],
               size: Size | None = None) -> torch.Tensor:
        """Draw latents (already scaled for the U-Net) for the given examples, all at one size (None: square);
        sample k's noise from generators[k]."""
        return self.sample_with_geometry(indices, flips, corners, generators, size)[0]

    def sample_with_geometry(self, indices: list[int], flips: list[bool], corners,
                             generators: list[torch.Generator], size: Size | None = None
                             ) -> tuple[torch.Tensor, list[Geometry]]:
        """Latents and, per sample, (original h, w, crop top, left, target h, w): SDXL's size conditioning."""
        latents, geometry, _ = self.sample_batch(indices, flips, corners, generators, size)
        return latents, geometry

    def sample_batch(self, indices: list[int], flips: list[bool], corners, generators: list[torch.Generator],
                     size: Size | None = None) -> tuple[torch.Tensor, list[Geometry], list[torch.Tensor | None]]:
        """sample_with_geometry, and each sample's loss mask on the latent grid (None for one without a mask)."""
        size = self.size(size)
        if self.cache:
            rows = [self.cache[(i, f, size)] for i, f in zip(indices, flips)]
            mean, std = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
            geometry, masks = [r[2] for r in rows], [r[3] for r in rows]
        else:
            mean, std, geometry, masks = self._load_and_encode(indices, flips, corners, size)
        noise = torch.cat([torch.randn((1, *mean.shape[1:]), generator=g, device=mean.device) for g in generators])
        return (mean + std * noise - self.shift) * self.scale, geometry, masks


class PromptEmbeddings:
    """Text-encoder outputs for prompts; computed once per prompt when the encoder is frozen and `cache` is on.

    `encode` may return one tensor or a tuple of them (SDXL: embeddings and pooled embeddings); both cache.
    """

    def __init__(self, tokenizer, text_encoder, prompts: list[str], cache: bool, device):
        self.tokenizer, self.text_encoder, self.device = tokenizer, text_encoder, device
        self.cache: dict[str, torch.Tensor | tuple[torch.Tensor, ...]] = {}
        if cache:
            unique = sorted(set(prompts))
            with torch.no_grad():
                for start in range(0, len(unique), 16):
                    chunk = unique[start:start + 16]
                    out = self.encode(chunk)
                    self.cache.update(zip(chunk, zip(*out) if isinstance(out, tuple) else out))

    def token_ids(self, prompts: list[str], tokenizer=None) -> torch.Tensor:
        tokenizer = tokenizer or self.tokenizer
        return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids

    def encode(self, prompts: list[str]) -> Any:  # a tensor (SD); SDXL's subclass returns (embeddings, pooled)
        return self.text_encoder(self.token_ids(prompts).to(self.device))[0]

    def __call__(self, prompts: list[str]):
        if self.cache:
            rows = [self.cache[p] for p in prompts]
            if isinstance(rows[0], tuple):
                return tuple(torch.stack(list(column)) for column in zip(*rows))
            return torch.stack([row for row in rows if isinstance(row, torch.Tensor)])
        return self.encode(prompts)
