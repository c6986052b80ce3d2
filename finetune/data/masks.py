"""Loss masks (data.masks): which pixels of a photo are the subject, so the loss can weight the background less.

A mask is a grey image per photo (white = subject, black = background, grey in between), found by the photo's
file stem in the data.masks folder, or the photo's own alpha channel with data.masks=alpha. Every mask is checked
before training (there, readable, the photo's aspect ratio); while training it goes through the photo's own
resize, crop, bucket and flip, and is averaged down to the latent grid (finetune.data.dataset.LatentSource), where
the loss weights each latent pixel by it (finetune.training.loss). Class images have no mask.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from ..console import brief
from ..errors import FinetuneError
from .images import IMAGE_SUFFIXES, resize_and_crop, to_rgb

ALPHA = "alpha"          # data.masks=alpha: each photo's alpha channel is its mask
ASPECT_TOLERANCE = 0.01  # a mask saved at another size may differ from its photo's aspect ratio by rounding only
HIGH_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "F")


@dataclass(frozen=True)
class MaskSource:
    path: Path   # the mask file, or the photo itself (alpha)
    alpha: bool  # take the alpha channel of `path` rather than its grey values


def read_mask(source: MaskSource) -> Image.Image | None:
    """The mask upright, as an 8-bit grey image (None: `source` is a photo without an alpha channel); a one-line
    error naming the file if it does not decode."""
    image: Image.Image
    try:
        with Image.open(source.path) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)
    except Exception as exc:  # noqa: BLE001 - Pillow's plugins raise many types on corrupt input
        raise FinetuneError(f"{source.path}: not a readable image ({brief(exc, 200)}); replace or remove the "
                            "file") from None
    if source.alpha:
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")
        return image.getchannel("A") if image.mode in ("RGBA", "LA", "PA") else None
    return (to_rgb(image) if image.mode in HIGH_BIT_MODES else image).convert("L")


def mask_files(folder: Path) -> dict[str, list[Path]]:
    """The images in the masks folder by file stem."""
    found: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            found.setdefault(path.stem, []).append(path)
    return found


def attach_masks(examples: list, data) -> list:
    """The photos (after screening) with their masks attached, every mask checked: one for each photo, readable,
    of the photo's aspect ratio (data.masks=alpha: each photo has an alpha channel). Unchanged without
    data.masks. Reads, writes nothing."""
    if not data.masks:
        return examples
    if data.masks == ALPHA:
        sources = {e.path: MaskSource(Path(e.path), True) for e in examples}
    else:
        sources = {e.path: MaskSource(find_mask(e.path, data), False) for e in examples}
    for example in examples:
        check_mask(example, sources[example.path])
    return [dataclasses.replace(e, mask=sources[e.path]) for e in examples]


def find_mask(photo: Path, data) -> Path:
    folder = Path(data.masks).expanduser()
    if not folder.is_dir():
        raise FinetuneError(f"data.masks: folder {folder} does not exist; create it or fix the path (or "
                            f"data.masks={ALPHA} for the photos' alpha channel)")
    if folder.resolve() == Path(data.instance_dir).expanduser().resolve():
        raise FinetuneError(f"data.masks and data.instance_dir are the same folder ({folder}); put the masks in a "
                            "folder of their own, each named like its photo")
    candidates = mask_files(folder).get(Path(photo).stem, [])
    if not candidates:
        raise FinetuneError(f"data.masks: no mask for {photo} in {folder} (a mask has the photo's file stem, e.g. "
                            f"{Path(photo).stem}.png); add one (white = subject), or drop data.masks")
    if len(candidates) > 1:
        raise FinetuneError(f"data.masks: {candidates[0]} and {candidates[1]} are both masks for {photo}; keep one")
    return candidates[0]


def check_mask(example, source: MaskSource) -> None:
    mask = read_mask(source)
    if mask is None:
        raise FinetuneError(f"{source.path}: has no alpha channel, but data.masks={ALPHA} takes the loss mask from "
                            "it; save it with transparency (PNG, WebP), or give data.masks a folder of masks")
    (width, height), (w, h) = example.open().size, mask.size
    if abs(w * height - h * width) > ASPECT_TOLERANCE * h * width:
        raise FinetuneError(f"{source.path}: {w}x{h} pixels, but its photo {example.path} is {width}x{height}; a "
                            "mask must have its photo's aspect ratio (save it at the photo's size)")


def load_mask(source: MaskSource, photo_size: tuple[int, int], size: tuple[int, int], flip: bool,
              corner: tuple[float, float]) -> torch.Tensor:
    """The mask as the photo is trained: scaled to the photo's own size, then the same resize and crop to `size`
    (width, height) and flip, as a (1, height, width) tensor in [0, 1]."""
    mask = read_mask(source)
    assert mask is not None, "attach_masks checked every mask"
    if mask.size != photo_size:
        mask = mask.resize(photo_size, Image.Resampling.BILINEAR)
    cropped, _ = resize_and_crop(mask, *size, corner)
    tensor = torch.from_numpy(np.asarray(cropped, dtype=np.float32) / 255.0)[None]
    return tensor.flip(-1) if flip else tensor


def to_latent_grid(mask: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """A pixel mask (1, H, W) averaged over each latent pixel's patch of the image: (1, h, w)."""
    return F.adaptive_avg_pool2d(mask[None], latent_size)[0]
