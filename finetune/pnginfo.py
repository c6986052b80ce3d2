"""Generation parameters inside each PNG we write, so an image can be reproduced from itself.

Two text chunks: `parameters`, in AUTOMATIC1111's form (prompt, `Negative prompt:`, then `Steps: .., Sampler: ..,
CFG scale: .., Seed: .., Size: WxH, Model: .., Lora hashes: ..`), which A1111's PNG Info tab, Forge, ComfyUI's
loaders and image sites parse; and `finetune`, the same as JSON with full paths, which `finetune generate
--from-png IMG` reads to draw the image again. A1111 names LoRAs in the prompt (`<lora:NAME:SCALE>`) and
identifies each file by the first 12 hex digits of a sha256 over its tensor bytes (the safetensors header
skipped, so editing metadata keeps the hash): written the same way here. Grids carry the parameters of their first
image in `parameters` (as A1111's grids do) and every cell's prompt, seed and box in the JSON.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path

from PIL import Image, PngImagePlugin

from . import __version__
from .console import brief
from .data.images import save_png_atomically
from .errors import FinetuneError

KEY, TEXT_KEY = "finetune", "parameters"
# Our sampler names -> A1111's names for the same samplers (DPMSolverMultistep with dpmsolver++ is "DPM++ 2M";
# diffusers' PNDM as SD configures it, skipping the Runge-Kutta steps, is PLMS).
A1111_SAMPLERS = {"dpm++": "DPM++ 2M", "ddim": "DDIM", "euler": "Euler", "euler_a": "Euler a", "pndm": "PLMS"}
KOHYA_WEIGHT_SUFFIX = ".safetensors"


@dataclasses.dataclass
class LoraUse:
    path: str     # the file or run folder as loaded (absolute)
    scale: float


@dataclasses.dataclass
class ImageParams:
    """Everything that decides one generated image."""
    prompt: str
    seed: int
    steps: int
    guidance: float
    scheduler: str  # our name: dpm++, ddim, euler, euler_a, pndm or default
    width: int
    height: int
    model: str      # Hub id, or the absolute path of a folder or file
    loras: list[LoraUse] = dataclasses.field(default_factory=list)
    negative_prompt: str = ""
    step: int | None = None  # for images drawn while training: the training step
    # The (prompt, seed) jobs drawn in one pipeline call with this image, and its place among them: the batch
    # decides the last bits of an image on some hardware, so --from-png redraws it to re-create the image exactly.
    batch: list[list] | None = None
    batch_index: int | None = None
    # generate --init-image (image-to-image) and --mask (inpainting): the input files by absolute path and
    # sha256, so that --from-png draws from the very same pixels or says which file is missing or changed.
    init_image: str | None = None
    init_image_sha256: str | None = None
    mask: str | None = None
    mask_sha256: str | None = None
    strength: float | None = None
    inpaint_model: str | None = None


def addnet_hash(path: str | Path) -> str:
    """sha256 of a .safetensors file's tensor bytes (after its 8-byte length and JSON header): the hash A1111 and
    sd-scripts show for a LoRA. Every PNG of a generate call names the same LoRAs: each file is read once, and
    again only when it changed (its size or modification time)."""
    stat = Path(path).stat()
    return _tensor_bytes_sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _tensor_bytes_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        header_length = int.from_bytes(handle.read(8), "little")
        handle.seek(8 + header_length)
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def lora_name_and_file(path: str | Path) -> tuple[str, Path | None]:
    """The name A1111 shows a LoRA under and the file it would load: a run folder's kohya file
    (<folder name>.safetensors) when there is one, else its diffusers file; a file stands for itself."""
    path = Path(path)
    if path.is_dir():
        kohya = path / (path.name + KOHYA_WEIGHT_SUFFIX)
        diffusers_file = path / "pytorch_lora_weights.safetensors"
        found = kohya if kohya.is_file() else diffusers_file if diffusers_file.is_file() else None
        return path.name, found
    return path.stem, path if path.is_file() else None


def quote(value: str) -> str:
    """A1111's rule: a value holding a comma, colon or newline is written as a JSON string."""
    return json.dumps(value, ensure_ascii=False) if any(c in value for c in ",:\n") else value


def a1111_text(params: ImageParams) -> str:
    """The `parameters` text A1111 writes for these settings."""
    names = [lora_name_and_file(lora.path) for lora in params.loras]
    prompt = params.prompt + "".join(f" <lora:{name}:{lora.scale:g}>" for (name, _), lora in zip(names, params.loras))
    lines = [prompt]
    if params.negative_prompt:
        lines.append(f"Negative prompt: {params.negative_prompt}")
    fields = {"Steps": params.steps, "Sampler": A1111_SAMPLERS.get(params.scheduler, params.scheduler),
              "CFG scale": f"{params.guidance:g}", "Seed": params.seed, "Size": f"{params.width}x{params.height}",
              "Model": Path(params.model).stem if Path(params.model).suffix else Path(params.model).name}
    hashes = [f"{name}: {addnet_hash(file)[:12]}" for name, file in names if file is not None]
    if hashes:
        fields["Lora hashes"] = ", ".join(hashes)
    if params.strength is not None:
        fields["Denoising strength"] = f"{params.strength:g}"
    if params.mask is not None:
        fields["Inpaint"] = "masked region"  # our word: A1111 says how its mask was made, which differs
    if params.step is not None:
        fields["Training step"] = params.step
    fields["Version"] = f"finetune {__version__}"
    lines.append(", ".join(f"{key}: {quote(str(value))}" for key, value in fields.items()))
    return "\n".join(lines)


def save_png(image: Image.Image, path: str | Path, params: ImageParams, cells: list[dict] | None = None,
             extra: dict | None = None) -> Path:
    """Write `image` atomically as a PNG holding `params` (A1111's text and our JSON); `cells` describes a grid's
    images, `extra` adds entries to the JSON (e.g. the protocol behind eval's plot)."""
    info = PngImagePlugin.PngInfo()
    info.add_text(TEXT_KEY, a1111_text(params))  # Pillow writes iTXt itself when the text is not Latin-1
    record = {"version": 1, **dataclasses.asdict(params), **(extra or {})}
    if cells is not None:
        record["grid"] = cells
    info.add_text(KEY, json.dumps(record, ensure_ascii=False))
    return save_png_atomically(image, Path(path), pnginfo=info)


def read_params(path: str | Path) -> dict:
    """The JSON a PNG of ours carries; a one-line error for any other file."""
    if not Path(path).is_file():
        raise FinetuneError(f"--from-png {path}: no such file")
    try:
        with Image.open(path) as image:
            text = getattr(image, "text", {}).get(KEY)
    except (OSError, ValueError) as exc:
        raise FinetuneError(f"--from-png {path}: not a readable PNG ({brief(exc, 200)})") from None
    if not text:
        raise FinetuneError(f"--from-png {path}: the image holds no finetune parameters (it was not written by "
                            "finetune generate)")
    try:
        return json.loads(text)
    except ValueError:
        raise FinetuneError(f"--from-png {path}: its finetune parameters are not valid JSON (edited by hand?); "
                            "give an image as generate wrote it") from None


def params_from_png(path: str | Path) -> ImageParams:
    """The settings that drew a single image (not a grid: pick one of its images instead)."""
    record = read_params(path)
    if "grid" in record:
        raise FinetuneError(f"--from-png {path}: is a grid of {len(record['grid'])} images; give one image "
                            "(generate writes each one as NNNN.png beside grid.png)")
    fields = {f.name for f in dataclasses.fields(ImageParams)}
    values = {key: value for key, value in record.items() if key in fields}
    values["loras"] = [LoraUse(**lora) for lora in values.get("loras", [])]
    return ImageParams(**values)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_reference(model: str) -> str:
    """A model as a later run can find it again: a local path made absolute, a Hub id as it is."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model
