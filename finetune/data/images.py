"""Decode photos the same way everywhere: EXIF orientation applied, any mode to RGB, resize and crop."""
from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, PngImagePlugin

from ..console import brief
from ..errors import FinetuneError

log = logging.getLogger("finetune")
# Every file ending Pillow can open (BMP, TIFF, GIF, ...), not only the common four: a photo in a format Pillow
# reads is trained on, never silently dropped. Image.OPEN leaves out the endings Pillow can only write (.pdf).
Image.init()
IMAGE_SUFFIXES = tuple(sorted(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN))
COMMON_SUFFIXES = ".jpg, .png, .webp"
# Files that sit beside photos and are not photos: captions and metadata, read elsewhere or not at all.
COMPANION_SUFFIXES = (".txt", ".caption", ".json", ".jsonl", ".md", ".csv", ".yaml", ".yml")


def list_images(folder: str | Path, key: str, companions: tuple[str, ...] = COMPANION_SUFFIXES) -> list[Path]:
    """The photos in `folder`, sorted; a one-line error naming `key` if the folder is missing or has none.

    Hidden files (macOS' ._* AppleDouble twins, .DS_Store) are not photos. A broken symbolic link with a photo's
    ending is listed, so screening names it. Anything else that is not a photo (a .heic Pillow cannot read, a
    subfolder) is named in one warning rather than dropped silently; captions and `companions` are expected."""
    if not folder:
        raise FinetuneError(f"{key} is not set; point it at a folder of photos")
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FinetuneError(f"{key}: folder {folder} does not exist; create it or fix the path")
    paths, ignored = [], []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES and (path.is_file() or not path.exists()):
            paths.append(path)
        elif path.is_dir():
            ignored.append(path.name + "/")
        elif path.suffix.lower() not in companions:
            ignored.append(path.name)
    if ignored:
        log.warning("warning: %s: ignoring %s (not photos Pillow reads; subfolders are not searched)", key,
                    ", ".join(ignored[:10]) + (f" and {len(ignored) - 10} more" if len(ignored) > 10 else ""))
    if not paths:
        raise FinetuneError(f"{key}: {folder} has no photos ({COMMON_SUFFIXES} or another format Pillow reads); "
                            "add some")
    return paths


def open_rgb(path: str | Path) -> Image.Image:
    """Open a photo upright and in 8-bit RGB, whatever its mode; a one-line error if it is not an image."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise FinetuneError(f"{path}: a symbolic link to {os.readlink(path)}, which does not exist; fix or remove "
                            "the link")
    try:
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)  # type: ignore[assignment]  # an Image, no longer a file
    except Image.DecompressionBombError as exc:
        raise FinetuneError(f"{path}: not decoded, too many pixels ({exc}); downscale it") from None
    except (MemoryError, RecursionError) as exc:
        raise FinetuneError(f"{path}: not decoded ({type(exc).__name__}); re-save it smaller") from None
    except Exception as exc:  # noqa: BLE001 - Pillow's plugins raise a zoo of types on corrupt input
        reason = brief(exc, 200)
        raise FinetuneError(f"{path}: not a readable image ({reason}); replace or remove the file") from None
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit and float grey: scale to the 8-bit range instead of letting convert() clip it.
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I") and array.max() > 255 else max(float(array.max()), 255.0)
        image = Image.fromarray(np.clip(array / peak * 255.0, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        # Transparent pixels carry arbitrary colours; put them on white, the usual background.
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def resize_and_crop(image: Image.Image, width: int, height: int, top_left: tuple[float, float] | None = None
                    ) -> tuple[Image.Image, tuple[int, int]]:
    """Resize so the image covers width x height, then crop; `top_left` in [0, 1]^2 picks the crop (None: center).

    Returns the crop and its top-left corner in resized pixels (SDXL conditions on it).
    """
    scale = max(width / image.width, height / image.height)
    resized_w, resized_h = max(width, round(image.width * scale)), max(height, round(image.height * scale))
    image = image.resize((resized_w, resized_h), Image.Resampling.BICUBIC)
    fx, fy = top_left if top_left is not None else (0.5, 0.5)
    left, top = round((resized_w - width) * fx), round((resized_h - height) * fy)
    return image.crop((left, top, left + width, top + height)), (top, left)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> float tensor of shape (3, H, W) in [-1, 1], as the VAE expects."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def to_image(tensor: torch.Tensor) -> Image.Image:
    array = ((tensor.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def read_caption(image_path: Path, extension: str) -> str | None:
    """The caption file beside a photo (photo.txt for photo.jpg), or None."""
    caption_path = image_path.with_suffix(extension)
    if not caption_path.is_file():
        return None
    try:
        text = caption_path.read_text(encoding="utf-8-sig").strip()  # -sig: Notepad's byte-order mark is not text
    except UnicodeDecodeError:
        raise FinetuneError(f"{caption_path}: caption is not UTF-8 text; re-save it as UTF-8") from None
    return text or None


def save_png_atomically(image: Image.Image, path: Path, data: bytes | None = None,
                        pnginfo: PngImagePlugin.PngInfo | None = None) -> Path:
    """Write `image` (with its text chunks `pnginfo`, or its already encoded PNG `data`) to `path` under a
    temporary name, then rename: a full disk or a crash leaves the earlier file at `path`, or none, never half a
    PNG. The temporary file goes too. Written as any new file is, so it follows the umask."""
    if data is None:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", pnginfo=pnginfo)
        data = buffer.getvalue()
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
