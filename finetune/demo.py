"""The offline demo: tiny model + real photos -> train -> export -> base-vs-LoRA grid, on a CPU in minutes."""
from __future__ import annotations

import logging
import shutil
from importlib import resources
from pathlib import Path

import torch
from PIL import Image, ImageOps

from .errors import FinetuneError

log = logging.getLogger("finetune")
DEMO_CONFIG = Path(__file__).resolve().parent.parent / "recipes" / "configs" / "demo_tiny.yaml"
# (left, top, right, bottom) boxes in chelsea.png (451 x 300): five views of one cat, as a user's photos would be.
CROPS = [(80, 0, 380, 300), (110, 20, 350, 260), (40, 0, 340, 300), (130, 40, 330, 240), (90, 10, 330, 250)]


def subject_photo() -> Image.Image:
    """scikit-image's 'chelsea' (a cat, public domain), read from the installed package's data folder."""
    try:
        path = resources.files("skimage") / "data" / "chelsea.png"
        with resources.as_file(path) as file:
            return Image.open(file).convert("RGB")
    except (ModuleNotFoundError, FileNotFoundError):
        raise FinetuneError("the demo's photos come from scikit-image: pip install 'finetune[demo]'") from None


def prepare_photos(folder: Path) -> list[Path]:
    """Write crops (one mirrored, one with a caption file) of the cat photo as the subject's photos."""
    folder.mkdir(parents=True, exist_ok=True)
    photo, paths = subject_photo(), []
    for i, box in enumerate(CROPS):
        view = photo.crop(box)
        view = ImageOps.mirror(view) if i == 2 else view
        paths.append(folder / f"cat_{i}.jpg")
        view.save(paths[-1], quality=95)
    (folder / "cat_3.txt").write_text("a close-up photo of sks cat", encoding="utf-8")
    return paths


def run_demo(out: Path, steps: int | None = None) -> Path:
    """Build everything demo_tiny.yaml points at under `out`, train, and write base_vs_lora.png there."""
    from recipes import dreambooth_lora

    from . import config as config_lib
    from .tiny import build_tiny_sd

    out = Path(out)
    model_dir, photos, run_dir = out / "tiny-sd", out / "photos", out / "run"
    if not (model_dir / "model_index.json").is_file():
        build_tiny_sd(model_dir, family="sd1", seed=0)
    prepare_photos(photos)
    shutil.rmtree(run_dir, ignore_errors=True)  # the demo always starts fresh; class images are reused
    overrides = [f"model.pretrained={model_dir}", f"data.instance_dir={photos}",
                 f"data.class_dir={out / 'class_images'}", f"output_dir={run_dir}"]
    overrides += [f"train.max_steps={steps}"] if steps else []
    cfg = config_lib.load(dreambooth_lora.Config, DEMO_CONFIG, overrides)
    log.info("demo: training a tiny SD model on %d photos in %s", len(list(photos.glob("*.jpg"))), photos)
    result = dreambooth_lora.main(cfg)
    before, after = loss_before_and_after(model_dir, result, cfg)
    grid = base_vs_lora_grid(model_dir, run_dir, cfg, out / "base_vs_lora.png")
    log.info("demo: denoising loss on the subject's photos (fixed noise): base %.4f -> LoRA %.4f", before, after)
    log.info("demo: LoRA at %s; base vs LoRA, labelled, at %s", result.export, grid)
    return grid


def loss_before_and_after(model_dir: Path, result, cfg) -> tuple[float, float]:
    from .config import ModelConfig
    from .data.dataset import instance_examples
    from .evaluate import instance_denoising_loss
    from .models import load_pipeline, training_scheduler

    pipe = load_pipeline(ModelConfig(pretrained=str(model_dir)))
    parts = (pipe.tokenizer, pipe.vae, training_scheduler(pipe), instance_examples(cfg.data), cfg.train.resolution)
    return (instance_denoising_loss(pipe.unet, pipe.text_encoder, *parts),
            instance_denoising_loss(result.unet.cpu(), result.text_encoder.cpu(), *parts))


def base_vs_lora_grid(model_dir: Path, run_dir: Path, cfg, path: Path, count: int = 4) -> Path:
    """The same prompt and seeds with and without the LoRA, one row each, with a legend; the PNG holds the
    parameters of its first image."""
    from .config import ModelConfig
    from .inference import generate, load_loras, set_scheduler
    from .legend import labelled_grid, seed_columns
    from .models import load_pipeline
    from .pnginfo import ImageParams, model_reference, save_png

    pipe = load_pipeline(ModelConfig(pretrained=str(model_dir)), dtype=torch.float32)
    set_scheduler(pipe, "dpm++")
    pipe.set_progress_bar_config(disable=True)
    prompt, size, steps = cfg.data.instance_prompt, cfg.train.resolution, 20
    base = generate(pipe, [prompt], count, seed=0, steps=steps, resolution=size, progress=False)
    load_loras(pipe, [(str(run_dir), 1.0)])
    tuned = generate(pipe, [prompt], count, seed=0, steps=steps, resolution=size, progress=False)
    # The tiny model draws 64 px images: shown at 128 px (pixels doubled) so the legend has room.
    cells = [image.resize((128, 128), Image.Resampling.NEAREST) for image in base + tuned]
    grid = labelled_grid(cells, [f"base: {prompt}", f"LoRA x1: {prompt}"], seed_columns(0, count),
                         f"demo · tiny SD · dpm++, {steps} steps, guidance 7.5, {size}x{size} (shown at 128 px)")
    params = ImageParams(prompt=prompt, seed=0, steps=steps, guidance=7.5, scheduler="dpm++", width=size,
                         height=size, model=model_reference(str(model_dir)))
    save_png(grid.image, path, params, [{"prompt": prompt, "seed": k % count, "lora": k >= count, "box": list(box)}
                                        for k, box in enumerate(grid.boxes)])
    return path
