"""`finetune` command line: parse, then call the library. Errors a user can fix print one line, exit 2."""
from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import sys
from pathlib import Path

from .errors import FinetuneError

DEFAULT_RECIPE = "dreambooth_lora"
DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def recipe_module(name: str):
    try:
        return importlib.import_module(f"recipes.{name}")
    except ModuleNotFoundError:
        raise FinetuneError(f"recipe: {name!r} is not a recipe; see the recipes/ folder") from None


def load_recipe_config(path: str | None, overrides: list[str], recipe: str | None = None):
    """(recipe module, typed config) for a YAML file whose `recipe:` key names the recipe."""
    from . import config as config_lib

    data = config_lib.read_yaml(path) if path else {}
    name = recipe or data.pop("recipe", DEFAULT_RECIPE)
    data.pop("recipe", None)
    module = recipe_module(name)
    return module, config_lib.build(module.Config, config_lib.with_mode(config_lib.apply_overrides(data, overrides)))


def cmd_train(args) -> None:
    from .training.interrupt import catch_stop_signals
    module, cfg = load_recipe_config(args.config, args.overrides)
    with catch_stop_signals():  # SIGINT/SIGTERM save a checkpoint, then exit 130/143
        module.main(cfg)


def cmd_show_config(args) -> None:
    import yaml

    from .config import field_docs, to_dict
    module, cfg = load_recipe_config(args.config, args.overrides)
    if args.docs:
        for key, default, doc in field_docs(module.Config):
            print(f"{key:36s} {default:42s} {doc}")
    else:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")


def cmd_plan(args) -> None:
    import json

    from .plan import parse_size, plan_report
    text, data = plan_report(args.config, args.overrides, parse_size(args.gpu_memory))
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")


def cmd_generate(args) -> None:
    from .inference import Sampling, generate_command, parse_lora_arg, save_images

    sampling = Sampling(args.num_images, args.seed, args.steps, args.guidance, args.negative_prompt)
    images, shown = generate_command(args.model, args.prompt, [parse_lora_arg(text) for text in args.lora], sampling,
                                     args.scheduler, args.device, args.resolution, args.init_image, args.mask,
                                     args.strength, args.inpaint_model)
    out = save_images(images, args.out, rows=len(args.prompt), beside=shown)
    print(f"wrote {len(images)} images and grid.png to {out}")


def cmd_export(args) -> None:
    from .config import ModelConfig
    base = ModelConfig(pretrained=args.base, single_file_config=args.base_config) if args.base else None
    if args.fuse:
        from .export.merge import fuse_lora_into
        if not base:
            raise FinetuneError("export --fuse needs --base MODEL (the model the LoRA was trained on)")
        print(f"wrote {fuse_lora_into(base, args.src, args.scale, args.out)}")
        return
    from .export.convert import convert_lora
    if not args.format:
        raise FinetuneError("export needs --format kohya|diffusers (convert) or --fuse --base MODEL (merge)")
    print(f"wrote {convert_lora(args.src, args.format, args.out, args.precision, base)}")


def cmd_demo(args) -> None:
    from .demo import run_demo
    run_demo(Path(args.out), steps=args.steps)


def cmd_env(args) -> None:
    from .env import env_report
    print("\n".join(env_report()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train with a recipe config: finetune train CONFIG [section.key=value ...]")
    train.add_argument("config", help="YAML config (see recipes/configs/)")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=800")
    train.set_defaults(func=cmd_train)

    show = sub.add_parser("show-config", help="print the resolved config (or every field with --docs)")
    show.add_argument("config", nargs="?")
    show.add_argument("overrides", nargs="*")
    show.add_argument("--docs", action="store_true", help="list every key with its default and meaning")
    show.set_defaults(func=cmd_show_config)

    plan = sub.add_parser("plan", help="estimate peak GPU memory of a config and name the settings that fit a card")
    plan.add_argument("config", help="YAML config (model.pretrained must be a local diffusers folder)")
    plan.add_argument("overrides", nargs="*", help="dotted overrides, as for train")
    plan.add_argument("--gpu-memory", default="8GiB", help="the card's memory, e.g. 8GiB, 24GB, 6144MiB")
    plan.add_argument("--json", default=None, help="also write the estimates to this JSON file")
    plan.set_defaults(func=cmd_plan)

    gen = sub.add_parser("generate", help="generate images with a base model and LoRAs: from noise, from an image "
                                          "(--init-image), or into a masked region of it (--mask)")
    gen.add_argument("--model", required=True, help="base model: Hub id, diffusers folder or .safetensors file")
    gen.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                     help="LoRA file or run folder, optionally with its scale; repeat for several")
    gen.add_argument("--prompt", action="append", required=True, help="prompt; repeat for several")
    gen.add_argument("--negative-prompt", default=None, help="what to steer away from, for every prompt")
    gen.add_argument("--num-images", type=int, default=4, help="images per prompt")
    gen.add_argument("--seed", type=int, default=0, help="image k of each prompt uses seed + k")
    gen.add_argument("--steps", type=int, default=25, help="sampler steps")
    gen.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    gen.add_argument("--scheduler", default="dpm++", help="dpm++, ddim, euler, euler_a, pndm or default")
    gen.add_argument("--resolution", type=int, default=None, help="image size in pixels, a multiple of 8 (default: "
                                                                  "the model's; with --init-image: the image's)")
    gen.add_argument("--init-image", default=None, help="image-to-image: start from this picture (sides multiples "
                                                        "of 8)")
    gen.add_argument("--strength", type=float, default=None, help="with --init-image: how far to move from it, 0 "
                                                                  "(keep) to 1 (draw anew); default 0.75, with "
                                                                  "--mask 1.0")
    gen.add_argument("--mask", default=None, help="with --init-image: inpaint where this image (same size) is white")
    gen.add_argument("--inpaint-model", default=None, help="with --mask: an inpainting checkpoint of --model's "
                                                           "family to paint with (default: --model's own weights)")
    gen.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    gen.add_argument("--out", default="generated", help="folder for the PNGs and grid.png")
    gen.set_defaults(func=cmd_generate)

    exp = sub.add_parser("export", help="convert a LoRA between kohya and diffusers formats, or fuse it into "
                                        "its base model")
    exp.add_argument("src", help="LoRA file (either format) or run folder")
    exp.add_argument("--format", choices=["kohya", "diffusers"], help="convert to this LoRA format")
    exp.add_argument("--precision", default="fp16", choices=["fp16", "bf16", "fp32"], help="kohya weight precision")
    exp.add_argument("--fuse", action="store_true", help="write the base model with the LoRA fused in")
    exp.add_argument("--base", help="the model the LoRA was trained on (Hub id, diffusers folder or .safetensors "
                                    "file): needed with --fuse, and to convert a file that does not name its family "
                                    "or uses the original U-Net layout (sd-scripts' SDXL files)")
    exp.add_argument("--base-config", default=None, help="with a single-file --base: its config folder or Hub id")
    exp.add_argument("--scale", type=float, default=1.0, help="with --fuse: LoRA strength")
    exp.add_argument("--out", required=True, help="output .safetensors file, or folder")
    exp.set_defaults(func=cmd_export)

    demo = sub.add_parser("demo", help="offline demo: tiny model, real photos, train, export, generate")
    demo.add_argument("--out", default="demo-output", help="folder for everything the demo writes")
    demo.add_argument("--steps", type=int, default=None, help="training steps (default: the demo config's)")
    demo.set_defaults(func=cmd_demo)

    env = sub.add_parser("env", help="versions, CUDA and bitsandbytes status, known bad combinations: paste it "
                                     "into bug reports")
    env.set_defaults(func=cmd_env)
    return parser


def quiet_libraries() -> None:
    """Our progress bars and notices, not the libraries' loading chatter."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("accelerate", "peft"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import diffusers.utils.logging
    import transformers.utils.logging
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except FinetuneError as exc:
        print(f"finetune: error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    except OSError as exc:
        if exc.errno not in DISK_ERRORS:
            raise
        # A full disk or a read-only folder mid-run: every file is written under a temporary name and renamed,
        # so what was written before (checkpoints, the previous export) is intact.
        print(f"finetune: error: {exc.filename or 'writing'}: {exc.strerror}; earlier files are intact: free disk "
              "space or fix permissions, then run again (train.resume=latest continues training)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("finetune: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
