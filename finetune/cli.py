"""`finetune` command line: parse, then call the library. Errors a user can fix print one line, exit 2."""
from __future__ import annotations

import argparse
import errno
import importlib
import sys
from pathlib import Path

from .errors import FinetuneError

DEFAULT_RECIPE = "dreambooth_lora"
# The defaults of the generate options --from-png can fill: the parser's are None, so a value given on the command
# line is told apart from one left out; --help shows these.
GENERATE_DEFAULTS = {"num_images": 4, "seed": 0, "steps": 25, "guidance": 7.5, "scheduler": "dpm++",
                     "negative_prompt": ""}
DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def recipe_module(name: str):
    try:
        return importlib.import_module(f"recipes.{name}")
    except ModuleNotFoundError:
        raise FinetuneError(f"recipe: {name!r} is not a recipe; see the recipes/ folder") from None


def load_recipe_config(path: str | None, overrides: list[str]):
    """(recipe module, typed config) for a YAML file whose `recipe:` key names the recipe."""
    from .config import load, recipe_name

    module = recipe_module(recipe_name(path, DEFAULT_RECIPE))
    return module, load(module.Config, path, overrides)


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

    from .plan import describe_size, parse_size, plan_report
    module, _ = load_recipe_config(args.config, args.overrides)
    gpu_mib = parse_size(args.gpu_memory)
    text, data = plan_report(module.Config, args.config, args.overrides, gpu_mib,
                             describe_size(args.gpu_memory, gpu_mib))
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")


def cmd_generate(args) -> None:
    from .config import ModelConfig
    from .console import plural
    from .generated import draw_images, resolve_settings, write_generated
    from .inference import device_and_dtype, load_loras, parse_lora_arg, set_scheduler
    from .models import load_pipeline

    args = resolve_settings(args, GENERATE_DEFAULTS)  # --from-png's, then the defaults, under the command line's
    device, dtype = device_and_dtype(args.device)
    pipe = load_pipeline(ModelConfig(pretrained=args.model), dtype=dtype)
    loras = [parse_lora_arg(text) for text in args.lora]
    load_loras(pipe, loras)
    set_scheduler(pipe, args.scheduler, "--scheduler")
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    images = draw_images(pipe, args)
    out = Path(args.out)
    write_generated(images, args, loras, out)
    print(f"wrote {plural(len(images), 'image')} and grid.png to {out}")


def cmd_export(args) -> None:
    from .config import ModelConfig
    if args.fuse:
        from .export.merge import fuse_lora_into
        if not args.base:
            raise FinetuneError("export --fuse needs --base MODEL (the model the LoRA was trained on)")
        base = ModelConfig(pretrained=args.base, single_file_config=args.base_config)
        print(f"wrote {fuse_lora_into(base, args.src, args.scale, args.out)}")
        return
    from .export.convert import convert_lora
    if not args.format:
        raise FinetuneError("export needs --format kohya|diffusers (convert) or --fuse --base MODEL (merge)")
    print(f"wrote {convert_lora(args.src, args.format, args.out, args.precision)}")


def cmd_demo(args) -> None:
    from .demo import run_demo
    run_demo(Path(args.out), steps=args.steps)


def cmd_env(args) -> None:
    from .env import env_report
    print("\n".join(env_report()))


def build_parser() -> argparse.ArgumentParser:
    """Every option says its default in --help (written into each help text, since argparse's defaults formatter
    would also print the None of options whose default is computed)."""
    parser = argparse.ArgumentParser(prog="finetune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true",
                        help="also show the libraries' info messages and the warnings held back as not concerning "
                             "this run")

    train = sub.add_parser("train", parents=[common],
                           help="train with a recipe config: finetune train CONFIG [section.key=value ...]")
    train.add_argument("config", help="YAML config (see recipes/configs/)")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=800 (default: none)")
    train.set_defaults(func=cmd_train)

    show = sub.add_parser("show-config", parents=[common],
                          help="print the resolved config (or every field with --docs)")
    show.add_argument("config", nargs="?", help="YAML config (default: none, the recipe's defaults)")
    show.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=800 (default: none)")
    show.add_argument("--docs", action="store_true", help="list every key with its default and meaning")
    show.set_defaults(func=cmd_show_config)

    plan = sub.add_parser("plan", parents=[common],
                          help="estimate peak GPU memory of a config and name the settings that fit a card")
    plan.add_argument("config", help="YAML config (model.pretrained must be a local diffusers folder)")
    plan.add_argument("overrides", nargs="*", help="dotted overrides, as for train (default: none)")
    plan.add_argument("--gpu-memory", required=True, metavar="SIZE",
                      help="the card's memory with its unit: GiB/MiB (2^30/2^20 bytes, as nvidia-smi counts) or "
                           "GB/MB (10^9/10^6 bytes), e.g. 8GiB, 24GB, 6144MiB (required)")
    plan.add_argument("--json", default=None, metavar="FILE",
                      help="also write the estimates to this JSON file (default: none)")
    plan.set_defaults(func=cmd_plan)

    add_generate_parser(sub, common)

    exp = sub.add_parser("export", parents=[common],
                         help="convert a LoRA between kohya and diffusers formats, or fuse it into its base model")
    exp.add_argument("src", help="LoRA file (either format) or run folder")
    exp.add_argument("--format", choices=["kohya", "diffusers"],
                     help="convert to this LoRA format (default: none; one of --format or --fuse is needed)")
    exp.add_argument("--precision", default="fp16", choices=["fp16", "bf16", "fp32"],
                     help="kohya weight precision (default: %(default)s)")
    exp.add_argument("--fuse", action="store_true", help="write the base model with the LoRA fused in")
    exp.add_argument("--base", help="with --fuse: base model (Hub id, diffusers folder or .safetensors file) "
                                    "(default: none, required with --fuse)")
    exp.add_argument("--base-config", default=None,
                     help="with --fuse and a single-file base: its config folder (default: inferred by diffusers)")
    exp.add_argument("--scale", type=float, default=1.0, help="with --fuse: LoRA strength (default: %(default)s)")
    exp.add_argument("--out", required=True, help="output .safetensors file, or folder (required)")
    exp.set_defaults(func=cmd_export)

    demo = sub.add_parser("demo", parents=[common], help="offline demo: tiny model, real photos, train, export, "
                                                         "generate")
    demo.add_argument("--out", default="demo-output",
                      help="folder for everything the demo writes (default: %(default)s)")
    demo.add_argument("--steps", type=int, default=None,
                      help="training steps (default: the demo config's train.max_steps)")
    demo.set_defaults(func=cmd_demo)

    env = sub.add_parser("env", parents=[common], help="versions, CUDA and bitsandbytes status, known bad "
                                                       "combinations: paste it into bug reports")
    env.set_defaults(func=cmd_env)
    return parser


def add_generate_parser(sub, common: argparse.ArgumentParser) -> None:
    """generate's options: those --from-png can fill default to None (their defaults: GENERATE_DEFAULTS)."""
    defaults = GENERATE_DEFAULTS
    gen = sub.add_parser("generate", parents=[common], help="generate images with a base model and LoRAs")
    gen.add_argument("--model", default=None,
                     help="base model: Hub id, diffusers folder or .safetensors file (required, unless --from-png)")
    gen.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                     help="LoRA file or run folder, optionally with its scale (default scale 1); repeat for several "
                          "(default: none)")
    gen.add_argument("--prompt", action="append", default=None,
                     help="prompt; repeat for several (required, unless --from-png)")
    gen.add_argument("--negative-prompt", default=None,
                     help="what the images should not show (default: none)")
    gen.add_argument("--num-images", type=int, default=None,
                     help=f"images per prompt (default: {defaults['num_images']})")
    gen.add_argument("--seed", type=int, default=None,
                     help=f"image k of each prompt uses seed + k (default: {defaults['seed']})")
    gen.add_argument("--steps", type=int, default=None, help=f"sampler steps (default: {defaults['steps']})")
    gen.add_argument("--guidance", type=float, default=None,
                     help=f"classifier-free guidance scale (default: {defaults['guidance']})")
    gen.add_argument("--scheduler", default=None,
                     help=f"dpm++, ddim, euler, euler_a, pndm or default (default: {defaults['scheduler']})")
    gen.add_argument("--resolution", type=int, default=None,
                     help="image size in pixels (default: the model's, e.g. 512 for SD 1.5)")
    gen.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available, else cpu)")
    gen.add_argument("--from-png", default=None, metavar="IMAGE",
                     help="draw an image again from the parameters inside a PNG that generate or validation wrote; "
                          "options given as well replace the image's (default: none)")
    gen.add_argument("--out", default="generated", help="folder for the PNGs and grid.png (default: %(default)s)")
    gen.set_defaults(func=cmd_generate)


def error_line(text: str) -> None:
    """An error on its own line, also when a progress bar was left open by the failure."""
    from tqdm.auto import tqdm
    tqdm.write(text, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from .console import configure
    args = build_parser().parse_args(argv)
    configure(verbose=args.verbose)  # before the libraries are imported: some warn while importing
    message, code = None, 0
    try:
        with logging_redirect_tqdm():  # log lines through tqdm.write: never on a progress bar's line
            args.func(args)
    except FinetuneError as exc:
        message, code = f"finetune: error: {exc}", getattr(exc, "exit_code", 2)
    except OSError as exc:
        if exc.errno not in DISK_ERRORS:
            raise
        # A full disk or a read-only folder mid-run: every file is written under a temporary name and renamed,
        # so what was written before (checkpoints, the previous export) is intact.
        message, code = (f"finetune: error: {exc.filename or 'writing'}: {exc.strerror}; earlier files are intact: "
                         "free disk space or fix permissions, then run again (train.resume=latest continues "
                         "training)"), 2
    except KeyboardInterrupt:
        message, code = "finetune: interrupted", 130
    if message:
        # Printed once the exception is gone: a progress bar it held open has been closed (its line ended), so the
        # error is the last line and no bar is drawn again below it.
        error_line(message)
    return code


if __name__ == "__main__":
    sys.exit(main())
