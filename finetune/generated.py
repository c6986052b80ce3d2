"""What `finetune generate` writes, and where its settings come from.

Settings: the command line, over the parameters of a PNG given with `--from-png` (which re-draws that image:
same model, LoRAs and scales, prompt, seed, sampler, steps, guidance and size), over the defaults. Output: each
image as NNNN.png and grid.png with a legend, every PNG holding its parameters (finetune.pnginfo).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .errors import FinetuneError
from .inference import draw_jobs, generate, generation_batches
from .legend import labelled_grid, seed_columns
from .pnginfo import ImageParams, LoraUse, model_reference, params_from_png, save_png


def resolve_settings(args: argparse.Namespace, defaults: dict) -> argparse.Namespace:
    """Fill what the command line left out: from --from-png's image, then from `defaults`. With --from-png the image
    is drawn once (--num-images 1) unless asked otherwise; --lora replaces the image's LoRAs."""
    args.redraw = None
    if args.from_png:
        params = params_from_png(args.from_png)
        if args.prompt is None and args.seed is None and args.num_images is None and params.batch:
            args.redraw = ([tuple(job) for job in params.batch], params.batch_index)
        found = {"model": params.model, "prompt": [params.prompt], "seed": params.seed, "steps": params.steps,
                 "guidance": params.guidance, "scheduler": params.scheduler, "num_images": 1,
                 "negative_prompt": params.negative_prompt, "resolution": params.width}
        if params.width != params.height:
            raise FinetuneError(f"--from-png {args.from_png}: {params.width}x{params.height} is not square; "
                                "generate draws square images (--resolution)")
        for key, value in found.items():
            if getattr(args, key) in (None, []):
                setattr(args, key, value)
        if not args.lora:
            args.lora = [f"{lora.path}:{lora.scale}" for lora in params.loras]
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not args.model or not args.prompt:
        raise FinetuneError("generate needs --model and --prompt, or --from-png IMAGE to draw an image again")
    return args


def draw_images(pipe, args: argparse.Namespace) -> list:
    """generate's images: or, for --from-png without a new prompt, seed or count, the image's batch drawn again
    and only the image kept."""
    extra = {"negative_prompt": args.negative_prompt} if args.negative_prompt else {}
    if args.redraw:
        batch, index = args.redraw
        return [draw_jobs(pipe, batch, args.steps, args.guidance, args.resolution, len(batch), **extra)[index]]
    return generate(pipe, args.prompt, args.num_images, args.seed, args.steps, args.guidance, args.resolution,
                    **extra)


def image_params(args: argparse.Namespace, loras: list[tuple[str, float]], size: tuple[int, int]) -> list[ImageParams]:
    """The parameters of each image in generate's order: prompt by prompt, image k of a prompt from seed + k."""
    uses = [LoraUse(str(Path(path).resolve()), scale) for path, scale in loras]
    jobs = [(prompt, args.seed + k) for prompt in args.prompt for k in range(args.num_images)]
    batches = [args.redraw] if args.redraw else [(batch, i) for batch in generation_batches(jobs)
                                                 for i in range(len(batch))]
    return [ImageParams(prompt=prompt, seed=seed, steps=args.steps, guidance=args.guidance,
                        scheduler=args.scheduler, width=size[0], height=size[1], model=model_reference(args.model),
                        loras=uses, negative_prompt=args.negative_prompt, batch=[list(job) for job in batch],
                        batch_index=index)
            for (prompt, seed), (batch, index) in zip(jobs, batches)]


def describe_loras(loras: list[tuple[str, float]]) -> str:
    if not loras:
        return "no LoRA"
    return ", ".join(f"LoRA {Path(path).name} x{scale:g}" for path, scale in loras)


def write_generated(images: list, args: argparse.Namespace, loras: list[tuple[str, float]], out: Path) -> Path:
    """NNNN.png for each image and grid.png (one row per prompt, one column per seed), each with its parameters;
    returns the grid's path."""
    out.mkdir(parents=True, exist_ok=True)
    params = image_params(args, loras, images[0].size)
    for i, (image, p) in enumerate(zip(images, params)):
        save_png(image, out / f"{i:04d}.png", p)
    title = (f"{Path(params[0].model).name} + {describe_loras(loras)} · {args.scheduler}, {args.steps} steps, "
             f"guidance {args.guidance:g}, {images[0].width}x{images[0].height}")
    grid = labelled_grid(images, args.prompt, seed_columns(args.seed, args.num_images), title)
    cells = [{"file": f"{i:04d}.png", "prompt": p.prompt, "seed": p.seed, "box": list(box)}
             for i, (p, box) in enumerate(zip(params, grid.boxes))]
    return save_png(grid.image, out / "grid.png", params[0], cells)
