"""What `finetune generate` writes, and where its settings come from.

Settings: the command line, over the parameters of a PNG given with `--from-png` (which re-draws that image:
same model, LoRAs and scales, prompt, seed, sampler, steps, guidance and size; for image-to-image and inpainting
also the input picture, mask, strength and inpainting model), over the defaults. Output: each image as NNNN.png
and grid.png with a legend, every PNG holding its parameters (finetune.pnginfo).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from .errors import FinetuneError
from .inference import (
    IMG2IMG_STRENGTH,
    INPAINT_STRENGTH,
    Edit,
    Generator,
    Sampling,
    generate_command,
    generation_batches,
)
from .legend import labelled_grid, seed_columns
from .pnginfo import ImageParams, LoraUse, file_sha256, model_reference, params_from_png, save_png

# The options --from-png fills when the command line leaves them out: option name -> ImageParams field.
FROM_PNG = {"model": "model", "seed": "seed", "steps": "steps", "guidance": "guidance", "scheduler": "scheduler",
            "negative_prompt": "negative_prompt", "strength": "strength", "inpaint_model": "inpaint_model"}


def resolve_settings(args: argparse.Namespace, defaults: dict) -> argparse.Namespace:
    """Fill what the command line left out: from --from-png's image, then from `defaults`. With --from-png the image
    is drawn once (--num-images 1) unless asked otherwise; --lora replaces the image's LoRAs."""
    args.redraw = None
    if args.from_png:
        from_png(args, params_from_png(args.from_png))
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not args.model or not args.prompt:
        raise FinetuneError("generate needs --model and --prompt, or --from-png IMAGE to draw an image again")
    return args


def from_png(args: argparse.Namespace, params: ImageParams) -> None:
    """The image's settings under the command line's; its batch is drawn again when nothing that changes the
    batch (prompt, seed, count) was given."""
    if args.prompt is None and args.seed is None and args.num_images is None and params.batch:
        args.redraw = ([(prompt, seed) for prompt, seed in params.batch], params.batch_index)
    for option, field in FROM_PNG.items():
        if getattr(args, option) is None:
            setattr(args, option, getattr(params, field))
    args.negative_prompt = args.negative_prompt or None  # "" in the PNG: none given, which differs for SDXL
    args.prompt = args.prompt or [params.prompt]
    args.num_images = 1 if args.num_images is None else args.num_images
    if not args.lora:
        args.lora = [f"{lora.path}:{lora.scale}" for lora in params.loras]
    for option, field in (("init_image", "init_image"), ("mask", "mask")):
        if getattr(args, option) is None and getattr(params, field) is not None:
            setattr(args, option, same_input(args.from_png, option, getattr(params, field),
                                             getattr(params, field + "_sha256")))
    if args.init_image is None and args.resolution is None:
        if params.width != params.height:
            raise FinetuneError(f"--from-png {args.from_png}: {params.width}x{params.height} is not square; "
                                "generate draws square images from noise (--resolution)")
        args.resolution = params.width


def same_input(png: str, option: str, path: str, sha256: str | None) -> str:
    """The input picture an image was drawn from, when it is still there unchanged; else a one-line error."""
    flag = "--" + option.replace("_", "-")
    if not Path(path).is_file():
        raise FinetuneError(f"--from-png {png}: it was drawn from {flag} {path}, which is missing; give {flag} "
                            "with the same picture")
    if sha256 is not None and file_sha256(path) != sha256:
        raise FinetuneError(f"--from-png {png}: {flag} {path} changed since the image was drawn (its sha256 "
                            f"differs); give {flag} with the picture it was drawn from")
    return path


def sampling_of(args: argparse.Namespace) -> Sampling:
    return Sampling(args.num_images, args.seed, args.steps, args.guidance, args.negative_prompt,
                    batch=args.redraw[0] if args.redraw else None)


def draw(args: argparse.Namespace, loras: list[tuple[str, float]]) -> tuple[list[Image.Image], Image.Image | None]:
    """generate's images and its input picture (None from noise): or, for --from-png without a new prompt, seed
    or count, the image's batch drawn again and only the image kept."""
    generator = Generator(args.model, loras, args.scheduler, args.device, args.resolution)
    edit = Edit(args.init_image, args.mask, args.strength, args.inpaint_model)
    images, shown = generate_command(args.prompt, generator, sampling_of(args), edit)
    if args.redraw:
        images = [images[args.redraw[1]]]
    return images, shown


def image_params(args: argparse.Namespace, loras: list[tuple[str, float]], size: tuple[int, int]) -> list[ImageParams]:
    """The parameters of each image in generate's order: prompt by prompt, image k of a prompt from seed + k."""
    uses = [LoraUse(str(Path(path).resolve()), scale) for path, scale in loras]
    jobs = [(prompt, args.seed + k) for prompt in args.prompt for k in range(args.num_images)]
    batches = [args.redraw] if args.redraw else [(batch, i) for batch in generation_batches(jobs)
                                                 for i in range(len(batch))]
    inputs = input_params(args)
    return [ImageParams(prompt=batch[index][0], seed=batch[index][1], steps=args.steps, guidance=args.guidance,
                        scheduler=args.scheduler, width=size[0], height=size[1], model=model_reference(args.model),
                        loras=uses, negative_prompt=args.negative_prompt or "", batch=[list(job) for job in batch],
                        batch_index=index, **inputs)
            for batch, index in batches]


def input_params(args: argparse.Namespace) -> dict:
    """The input picture, mask (by absolute path and sha256), strength and inpainting model, when given."""
    if args.init_image is None:
        return {}
    default = INPAINT_STRENGTH if args.mask is not None else IMG2IMG_STRENGTH
    found = {"init_image": str(Path(args.init_image).resolve()), "init_image_sha256": file_sha256(args.init_image),
             "strength": default if args.strength is None else args.strength,
             "inpaint_model": model_reference(args.inpaint_model) if args.inpaint_model else None}
    if args.mask is not None:
        found.update(mask=str(Path(args.mask).resolve()), mask_sha256=file_sha256(args.mask))
    return found


def describe_loras(loras: list[tuple[str, float]]) -> str:
    if not loras:
        return "no LoRA"
    return ", ".join(f"LoRA {Path(path).name} x{scale:g}" for path, scale in loras)


def write_generated(images: list, args: argparse.Namespace, loras: list[tuple[str, float]], out: Path,
                    shown: Image.Image | None = None) -> Path:
    """NNNN.png for each image and grid.png (one row per prompt, one column per seed; `shown`, the input picture,
    starts each row), each with its parameters; returns the grid's path."""
    out.mkdir(parents=True, exist_ok=True)
    params = image_params(args, loras, images[0].size)
    for i, (image, p) in enumerate(zip(images, params)):
        save_png(image, out / f"{i:04d}.png", p)
    mode = ("inpainted" if args.mask else "from the input image") if shown is not None else "from noise"
    title = (f"{Path(params[0].model).name} + {describe_loras(loras)} · {mode} · {args.scheduler}, {args.steps} "
             f"steps, guidance {args.guidance:g}, {images[0].width}x{images[0].height}")
    per_row = len(images) // len(args.prompt)
    columns = seed_columns(args.seed, per_row)
    cells = list(images)
    if shown is not None:
        columns = ["input", *columns]
        cells = [c for r in range(len(args.prompt)) for c in [shown, *images[r * per_row:(r + 1) * per_row]]]
    grid = labelled_grid(cells, args.prompt, columns, title)
    boxes = [box for k, box in enumerate(grid.boxes) if shown is None or k % len(columns)]
    records = [{"file": f"{i:04d}.png", "prompt": p.prompt, "seed": p.seed, "box": list(box)}
               for i, (p, box) in enumerate(zip(params, boxes))]
    inputs = [list(box) for k, box in enumerate(grid.boxes) if shown is not None and not k % len(columns)]
    return save_png(grid.image, out / "grid.png", params[0], records, {"input_boxes": inputs} if inputs else None)
