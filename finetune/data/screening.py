"""Check every subject photo before training starts, so a bad file fails (or is skipped) now, not 300 steps in.

What counts as bad, and what happens (`data.on_bad_image`):
- unreadable (truncated or corrupt, 0 bytes, not an image under an image name) or an aspect ratio beyond
  MAX_ASPECT:1 (a center crop would keep a sliver): `error` (default) stops with one line naming the file;
  `skip` warns, leaves the photo out and counts it in the run summary. No usable photo left is always an error.
- smaller than the size it trains at (the square resolution, or its aspect-ratio bucket with data.allow_upscale):
  trained on, upscaled, with a warning (counted in the summary). Buckets without allow_upscale shrink to the photo.
- any mode (grey, CMYK, 16-bit, palette, transparency) and EXIF rotation: read correctly (images.open_rgb).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import FinetuneError
from .buckets import Size, assign_bucket

log = logging.getLogger("finetune")
MAX_ASPECT = 8.0


@dataclass
class PhotoReport:
    used: int = 0
    skipped: list[Path] = field(default_factory=list)
    upscaled: list[Path] = field(default_factory=list)
    buckets: list[Size] | None = None  # with data.buckets: the size each used photo trains at

    def summary(self) -> str:
        text = f"photos: {self.used} used, {len(self.skipped)} skipped"
        return text + (f", {len(self.upscaled)} upscaled" if self.upscaled else "")


def inspect_photo(example) -> tuple[tuple[int, int], str | None]:
    """(size, why it cannot be trained on or None); decodes the whole image, so truncated files fail here."""
    path = example.path
    try:
        size = example.open().size
    except FinetuneError as exc:
        return (0, 0), str(exc)
    width, height = size
    if max(width, height) > MAX_ASPECT * min(width, height):
        return size, (f"{path}: {width}x{height} pixels, an aspect ratio beyond {MAX_ASPECT:g}:1; a square crop "
                      "would keep a sliver: crop it around the subject")
    return size, None


def screen_photos(examples: list, resolution: int, on_bad_image: str, buckets: bool = False,
                  allow_upscale: bool = False) -> tuple[list, PhotoReport]:
    """The examples whose photos can be trained on, and what was skipped or upscaled; with `buckets`, the
    report also holds each used photo's aspect-ratio bucket (from the size read here: no second decode)."""
    report, kept = PhotoReport(buckets=[] if buckets else None), []
    for example in examples:
        size, problem = inspect_photo(example)
        if problem and on_bad_image == "error":
            raise FinetuneError(f"{problem} (or set data.on_bad_image=skip to leave such files out)")
        if problem:
            log.warning("warning: skipping %s", problem)
            report.skipped.append(example.path)
            continue
        kept.append(example)
        width, height = target = assign_bucket(*size, resolution, allow_upscale) if buckets else (resolution,) * 2
        if report.buckets is not None:
            report.buckets.append(target)
        if size[0] < width or size[1] < height:
            shape = f"its bucket {width}x{height}" if buckets else f"train.resolution={resolution}"
            log.warning("warning: %s is %dx%d, smaller than %s; it is upscaled (blurrier)", example.path, *size,
                        shape)
            report.upscaled.append(example.path)
    report.used = len(kept)
    if not kept:
        key = "data.dataset" if examples[0].loader is not None else "data.instance_dir"
        raise FinetuneError(f"{key}: none of the {len(examples)} photos could be used (all skipped); "
                            "replace them with readable photos")
    return kept, report
