"""Class images of another size than the run's: said, never reused in silence.

A class folder filled at 512 px and reused for a 768 px run (or at 64 px for a 128 px one) still trains: each
image is resized and cropped like a photo. But the prior it teaches then comes from upscaled (or downscaled)
pictures, so the run says how many differ and how to get images drawn at its own size.
"""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from PIL import Image

from ..console import plural

log = logging.getLogger("finetune")


def other_sizes(paths: list[str | Path], resolution: int) -> Counter:
    """(width, height) -> count, for the images not `resolution` px square (read from their headers only)."""
    sizes: Counter = Counter()
    for path in paths:
        with Image.open(path) as image:
            if image.size != (resolution, resolution):
                sizes[image.size] += 1
    return sizes


def notice_other_sizes(paths: list[str | Path], resolution: int) -> Counter:
    """A notice naming the sizes of the class images that are not the run's, and what to do about it."""
    sizes = other_sizes(paths, resolution)
    if sizes:
        shown = ", ".join(f"{w}x{h}: {n}" for (w, h), n in sizes.most_common(3))
        folder = Path(paths[0]).parent
        log.warning("notice: %s of %d in %s are not %dx%d (%s); they are resized like photos. To train on class "
                    "images drawn at %d px, empty the folder or set data.class_dir to a new one",
                    plural(sum(sizes.values()), "class image"), len(paths), folder, resolution, resolution, shown,
                    resolution)
    return sizes
