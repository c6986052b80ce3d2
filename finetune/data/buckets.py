"""Aspect-ratio buckets: photos of any shape train at about the configured area, batched by shape.

Pure functions of their arguments (no state, no global RNG), so the batch order stays a function of
(seed, position) and a resumed run draws the same batches.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch

STEP = 64          # bucket sides are multiples of this: 8x the VAE's factor, so every U-Net level divides evenly
MAX_ASPECT = 4.0   # wider or taller buckets than 4:1 only waste pixels on crops of extreme panoramas

Size = tuple[int, int]  # (width, height) in pixels


def bucket_sizes(resolution: int, step: int = STEP, max_aspect: float = MAX_ASPECT) -> list[Size]:
    """Every (width, height) in multiples of `step` with the largest area up to resolution^2, by aspect ratio.

    For each width the height is the largest multiple of `step` that keeps the area within resolution^2.
    """
    area = resolution * resolution
    sizes = set()
    for width in range(step, area // step + 1, step):
        height = (area // width) // step * step
        if height >= step and max(width / height, height / width) <= max_aspect:
            sizes.add((width, height))
    if not sizes:  # a resolution under one step: the single square bucket
        sizes.add((max(step, resolution // step * step),) * 2)
    return sorted(sizes, key=lambda s: s[0] / s[1])


def nearest_bucket(width: int, height: int, sizes: list[Size]) -> Size:
    """The bucket whose aspect ratio is nearest the image's (in log ratio, so 2:1 and 1:2 are equally far from 1:1)."""
    ratio = math.log(width / height)
    return min(sizes, key=lambda s: (abs(math.log(s[0] / s[1]) - ratio), -s[0] * s[1]))


def shrink_to_fit(bucket: Size, width: int, height: int, step: int = STEP) -> Size:
    """The bucket scaled down, in whole steps, until the image covers it without being enlarged.

    An image smaller than one step in a side still gets that one step (the smallest the model takes).
    """
    scale = min(1.0, width / bucket[0], height / bucket[1])
    return (max(step, int(bucket[0] * scale) // step * step), max(step, int(bucket[1] * scale) // step * step))


def assign_bucket(width: int, height: int, resolution: int, allow_upscale: bool = False, step: int = STEP) -> Size:
    """The training size for a width x height image: the nearest-ratio bucket of about resolution^2 pixels,
    shrunk to the image's own size unless `allow_upscale`."""
    bucket = nearest_bucket(width, height, bucket_sizes(resolution, step))
    return bucket if allow_upscale else shrink_to_fit(bucket, width, height, step)


def epoch_batches(seed: int, epoch: int, buckets: list[Size], batch_size: int, repeats: int = 1) -> list[list[int]]:
    """One epoch of batches of example indices, each batch from a single bucket.

    Each bucket's examples (times `repeats`) are shuffled and cut into batches; a short last batch is filled up
    from the start of the same shuffled bucket, so every batch has `batch_size` items and one shape. Then the
    batches are shuffled. The number of batches is the same in every epoch.
    """
    return [list(batch) for batch in _epoch_batches(seed, epoch, tuple(buckets), batch_size, repeats)]


@lru_cache(maxsize=16)
def _epoch_batches(seed: int, epoch: int, buckets: tuple[Size, ...], batch_size: int, repeats: int
                   ) -> tuple[tuple[int, ...], ...]:
    generator = torch.Generator().manual_seed((seed * 1_000_003 + 104_729 * (epoch + 1)) % (2**63))
    groups: dict[Size, list[int]] = {}
    for index, bucket in enumerate(buckets):
        groups.setdefault(bucket, []).extend([index] * repeats)
    batches = []
    for bucket in sorted(groups):
        items = groups[bucket]
        order = [items[j] for j in torch.randperm(len(items), generator=generator)]
        count = -(-len(order) // batch_size)
        filled = (order * (count * batch_size // len(order) + 1))[:count * batch_size]
        batches += [tuple(filled[k * batch_size:(k + 1) * batch_size]) for k in range(count)]
    return tuple(batches[j] for j in torch.randperm(len(batches), generator=generator))


def batches_per_epoch(buckets: list[Size], batch_size: int, repeats: int = 1) -> int:
    counts: dict[Size, int] = {}
    for bucket in buckets:
        counts[bucket] = counts.get(bucket, 0) + repeats
    return sum(-(-n // batch_size) for n in counts.values())


def bucket_batch(seed: int, number: int, buckets: list[Size], batch_size: int, repeats: int = 1
                 ) -> tuple[list[int], Size]:
    """Batch `number` of an endless run of bucketed epochs, and its size."""
    epoch, offset = divmod(number, batches_per_epoch(buckets, batch_size, repeats))
    batch = epoch_batches(seed, epoch, buckets, batch_size, repeats)[offset]
    return batch, buckets[batch[0]]
