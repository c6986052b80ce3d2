"""`finetune` command line: parse, then call the library. Errors a user can fix print one line, exit 2."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import os
import sys
from pathlib import Path

from safetensors import SafetensorError

from .errors import FinetuneError
from .storage import storage_reason, writing_into

DEFAULT_RECIPE = "dreambooth_lora"
# The defaults of the generate options --from-png can fill: the parser's are None, so a value given on the command
# line is told apart from one left out; --help shows these.
GENERATE_DEFAULTS = {"num_images": 4, "seed": 0, "steps": 25, "guidance": 7.5, "scheduler": "dpm++"}


def recipe_module(name: str):
    try:
        return importlib.import_module(f"recipes.{name}")
    except ModuleNotFoundError:
        raise FinetuneError(f"recipe: {name!r} is not a recipe; see the recipes/ folder") from None


def load_recipe_config(path: str | None, overrides: list[str], default_recipe: str = DEFAULT_RECIPE):
    """(recipe module, typed config) for a YAML file whose `recipe:` key names the recipe (else `default_recipe`)."""
    from .config import load, recipe_name

    module = recipe_module(recipe_name(path, default_recipe))
    return module, load(module.Config, path, overrides)


# Argument checks of generate, export and plan: each a one-line error naming the flag, before any model loads.

def check_at_least(flag: str, value: int, least: int = 1) -> None:
    if value < least:
        raise FinetuneError(f"{flag} {value}: must be at least {least}")


def check_finite(flag: str, value: float) -> None:
    if not math.isfinite(value) or value < 0:
        raise FinetuneError(f"{flag} {value}: must be a finite number, 0 or more")


def check_model_arg(flag: str, model: str) -> None:
    """The model path or Hub id exists and is not pickle weights (the checks load_pipeline makes first)."""
    from .models import describe_source
    try:
        describe_source(model)
    except FinetuneError as exc:  # its message names the config key; here the user typed a flag
        raise FinetuneError(str(exc).replace("model.pretrained:", f"{flag}", 1)) from None


def check_generate_args(args) -> None:
    import torch

    from .config import SAMPLERS
    from .inference import parse_lora_arg
    from .training.run_dir import check_could_write
    check_at_least("--num-images", args.num_images)
    check_at_least("--steps", args.steps)
    check_at_least("--seed", args.seed, 0)
    check_finite("--guidance", args.guidance)
    if args.resolution is not None and (args.resolution < 8 or args.resolution % 8):
        raise FinetuneError(f"--resolution {args.resolution}: must be a positive multiple of 8, e.g. 512")
    if not all(prompt.strip() for prompt in args.prompt):
        raise FinetuneError("--prompt is empty; describe the image, e.g. --prompt 'a photo of sks dog'")
    if args.scheduler not in SAMPLERS:
        raise FinetuneError(f"--scheduler: {args.scheduler!r} is unknown; choose one of {', '.join(SAMPLERS)}")
    check_model_arg("--model", args.model)
    for text in args.lora:
        path, scale = parse_lora_arg(text)
        if not Path(path).exists():
            raise FinetuneError(f"--lora {path}: no such file or folder")
        if not math.isfinite(scale):
            raise FinetuneError(f"--lora {text}: the scale after ':' must be a finite number, e.g. {path}:0.8")
    if args.device:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise FinetuneError(f"--device {args.device}: not a device; use cpu, cuda or cuda:N") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise FinetuneError(f"--device {args.device}: no CUDA GPU here; use --device cpu")
    check_could_write(Path(args.out), "--out")


def check_export_args(args) -> None:
    """The source exists, --out replaces neither its source, its base model nor a file finetune did not write."""
    from .export.diffusers_format import WEIGHT_NAME
    from .training.run_dir import check_could_write, written_by_finetune
    src, out = Path(args.src), Path(args.out)
    if not src.exists():
        raise FinetuneError(f"{src}: no such LoRA file or run folder")
    if not math.isfinite(args.scale):
        raise FinetuneError(f"--scale {args.scale}: must be a finite number, e.g. 0.8")
    source_file = src / WEIGHT_NAME if src.is_dir() else src
    target = out if out.suffix == ".safetensors" else out / WEIGHT_NAME
    if args.fuse and args.base:
        check_model_arg("--base", args.base)
        base = Path(args.base).resolve()
        if out.resolve() == base or out.resolve().is_relative_to(base):
            raise FinetuneError(f"--out {out} is the base model or inside it, which would be overwritten; choose "
                                "another --out")
        if out.suffix != ".safetensors" and out.is_dir() and any(out.iterdir()):
            raise FinetuneError(f"--out {out} is a folder that is not empty; a fused model goes to a new or empty "
                                "folder")
        target = out
    if target.resolve() == source_file.resolve():
        raise FinetuneError(f"--out {out} would overwrite the LoRA it is made from ({source_file}); choose another "
                            "--out")
    if target.is_file() and not written_by_finetune(target):
        raise FinetuneError(f"--out {target} exists and finetune did not write it; choose another --out or move "
                            "the file away")
    check_could_write(target.parent, "--out")


def check_plan_args(args) -> float:
    """--gpu-memory in MiB, after checking it and --json."""
    from .plan import parse_size
    from .training.run_dir import check_could_write
    try:
        mib = parse_size(args.gpu_memory)
    except ValueError:
        mib = math.nan
    if not (math.isfinite(mib) and mib > 0):
        raise FinetuneError(f"--gpu-memory {args.gpu_memory!r}: must be a size above 0, e.g. 8GiB, 6GB or 6144MiB")
    if args.json:
        if Path(args.json).is_dir():
            raise FinetuneError(f"--json {args.json} is a folder; give a file name, e.g. plan.json")
        check_could_write(Path(args.json).resolve().parent, "--json")
    return mib


def cmd_train(args) -> None:
    from .allocator import ask_for_expandable_segments
    from .config import setting_as_written
    from .training.interrupt import catch_stop_signals
    from .training.run_lock import release_run_lock
    if setting_as_written(args.config, args.overrides, "train", "expandable_segments") is True:
        ask_for_expandable_segments()  # before the recipe's import starts CUDA: finetune.allocator says why
    module, cfg = load_recipe_config(args.config, args.overrides)
    advice = ("earlier files are intact: free disk space or fix permissions, then run again "
              "(train.resume=latest continues training)")
    try:
        with catch_stop_signals(), writing_into(cfg.output_dir, f"output_dir {cfg.output_dir}", advice):
            module.main(cfg)  # SIGINT/SIGTERM save a checkpoint, then exit 130/143
    finally:
        release_run_lock(cfg.output_dir)


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

    from .plan import describe_size, plan_report
    gpu_mib = check_plan_args(args)
    module, _ = load_recipe_config(args.config, args.overrides)
    text, data = plan_report(module.Config, args.config, args.overrides, gpu_mib,
                             describe_size(args.gpu_memory, gpu_mib))
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")


def cmd_generate(args) -> None:
    from .console import plural
    from .generated import draw, resolve_settings, write_generated
    from .inference import parse_lora_arg

    resolve_settings(args, GENERATE_DEFAULTS)  # --from-png's, then the defaults, under the command line's
    check_generate_args(args)
    loras = [parse_lora_arg(text) for text in args.lora]
    images, shown = draw(args, loras)
    write_generated(images, args, loras, Path(args.out), shown)
    print(f"wrote {plural(len(images), 'image')} and grid.png to {args.out}")


def cmd_eval(args) -> None:
    import json

    from .evaluation.runner import default_output, evaluate
    from .evaluation.targets import find_targets
    targets = find_targets(args.run, args.checkpoints)
    header = targets[-1].header
    # The base model the LoRA was trained on (its header) wins over a shared YAML's; a model.pretrained= override,
    # applied after it, over both. JSON quoting keeps the name a string whatever YAML would make of it.
    trained_on = [f"model.pretrained={json.dumps(header['base_model'])}"] if header.get("base_model") else []
    _, cfg = load_recipe_config(args.config, trained_on + args.overrides, header.get("recipe", DEFAULT_RECIPE))
    _, text = evaluate(cfg, targets, args.out or default_output(args.run), args.device, args.overwrite)
    print(text)


def cmd_export(args) -> None:
    from .config import ModelConfig
    check_export_args(args)
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
    """Every option says its default in --help (written into each help text, since argparse's defaults formatter
    would also print the None of options whose default is computed)."""
    parser = argparse.ArgumentParser(prog="finetune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true",
                        help="also show the libraries' info messages and the warnings held back as not concerning "
                             "this run")
    add_config_parsers(sub, common)
    add_generate_parser(sub, common)
    add_eval_parser(sub, common)
    add_export_parser(sub, common)
    add_tool_parsers(sub, common)
    return parser


def add_config_parsers(sub, common: argparse.ArgumentParser) -> None:
    """The commands that read a recipe config: train, show-config, plan."""
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


def add_export_parser(sub, common: argparse.ArgumentParser) -> None:
    exp = sub.add_parser("export", parents=[common],
                         help="convert a LoRA between kohya and diffusers formats, or fuse it into its base model")
    exp.add_argument("src", help="LoRA file (either format) or run folder")
    exp.add_argument("--format", choices=["kohya", "diffusers"],
                     help="convert to this LoRA format (default: none; one of --format or --fuse is needed)")
    exp.add_argument("--precision", default="fp16", choices=["fp16", "bf16", "fp32"],
                     help="kohya weight precision (default: %(default)s)")
    exp.add_argument("--fuse", action="store_true", help="write the base model with the LoRA fused in")
    exp.add_argument("--base", help="the model the LoRA was trained on (Hub id, diffusers folder or .safetensors "
                                    "file): needed with --fuse, and to convert a file that does not name its family "
                                    "or uses the original U-Net layout (sd-scripts' SDXL files) (default: none)")
    exp.add_argument("--base-config", default=None,
                     help="with a single-file --base: its config folder or Hub id (default: inferred by diffusers)")
    exp.add_argument("--scale", type=float, default=1.0, help="with --fuse: LoRA strength (default: %(default)s)")
    exp.add_argument("--out", required=True, help="output .safetensors file, or folder (required)")
    exp.set_defaults(func=cmd_export)


def add_tool_parsers(sub, common: argparse.ArgumentParser) -> None:
    """demo and env: the offline demo, and what to paste into a bug report."""
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


def add_generate_parser(sub, common: argparse.ArgumentParser) -> None:
    """generate's options: those --from-png can fill default to None (their defaults: GENERATE_DEFAULTS)."""
    defaults = GENERATE_DEFAULTS
    gen = sub.add_parser("generate", parents=[common], help="generate images with a base model and LoRAs: from "
                         "noise, from an image (--init-image), or into a masked region of it (--mask)")
    gen.add_argument("--model", default=None,
                     help="base model: Hub id, diffusers folder or .safetensors file (required, unless --from-png)")
    gen.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                     help="LoRA file or run folder, optionally with its scale (default scale 1); repeat for several "
                          "(default: none)")
    gen.add_argument("--prompt", action="append", default=None,
                     help="prompt; repeat for several (required, unless --from-png)")
    gen.add_argument("--negative-prompt", default=None,
                     help="what to steer away from, for every prompt (default: none)")
    gen.add_argument("--num-images", type=int, default=None,
                     help=f"images per prompt (default: {defaults['num_images']})")
    gen.add_argument("--seed", type=int, default=None,
                     help=f"image k of each prompt uses seed + k (default: {defaults['seed']})")
    gen.add_argument("--steps", type=int, default=None, help=f"sampler steps (default: {defaults['steps']})")
    gen.add_argument("--guidance", type=float, default=None,
                     help=f"classifier-free guidance scale (default: {defaults['guidance']})")
    gen.add_argument("--scheduler", default=None,
                     help=f"dpm++, ddim, euler, euler_a, pndm or default (default: {defaults['scheduler']})")
    gen.add_argument("--resolution", type=int, default=None, help="image size in pixels, a multiple of 8 (default: "
                     "the model's, e.g. 512 for SD 1.5; with --init-image: the image's)")
    gen.add_argument("--init-image", default=None, metavar="IMAGE",
                     help="image-to-image: start from this picture, sides multiples of 8 (default: none, draw from "
                          "noise)")
    gen.add_argument("--strength", type=float, default=None,
                     help="with --init-image: how far to move from it, 0 (keep) to 1 (draw anew) (default: 0.75, "
                          "with --mask 1.0)")
    gen.add_argument("--mask", default=None, metavar="IMAGE",
                     help="with --init-image: inpaint where this image (same size) is white (default: none)")
    gen.add_argument("--inpaint-model", default=None, metavar="MODEL",
                     help="with --mask: an inpainting checkpoint of --model's family to paint with (default: "
                          "--model's own weights)")
    gen.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available, else cpu)")
    gen.add_argument("--from-png", default=None, metavar="IMAGE",
                     help="draw an image again from the parameters inside one of the NNNN.png images generate "
                          "wrote; options given as well replace the image's (default: none)")
    gen.add_argument("--out", default="generated", help="folder for the PNGs and grid.png (default: %(default)s)")
    gen.set_defaults(func=cmd_generate)


def add_eval_parser(sub, common: argparse.ArgumentParser) -> None:
    ev = sub.add_parser("eval", parents=[common], help="subject and prompt fidelity (DINO, CLIP-I, CLIP-T) and "
                        "prior drift of each checkpoint, by the DreamBooth paper's protocol")
    ev.add_argument("run", help="run folder (output_dir of finetune train) or a LoRA file")
    ev.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.instance_dir=photos/ "
                                                 "eval.num_images=2 (default: none)")
    ev.add_argument("--checkpoints", default="all",
                    help="all, latest, or step-N,step-M,... (default: %(default)s)")
    ev.add_argument("--config", default=None, metavar="YAML",
                    help="the training YAML, for data.instance_dir, eval.* and the model (default: none, the "
                         "recipe's defaults and the LoRA's header)")
    ev.add_argument("--out", default=None, help="folder for the results (default: RUN/eval)")
    ev.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available, else cpu)")
    ev.add_argument("--overwrite", action="store_true", help="replace an earlier evaluation in --out")
    ev.set_defaults(func=cmd_eval)


def error_line(text: str) -> None:
    """An error on its own line, also when a progress bar was left open by the failure."""
    from tqdm.auto import tqdm
    tqdm.write(text, file=sys.stderr)


# The folder each command writes into, named when the disk fills or turns out read-only there (train names its
# output_dir itself). Every file is written under a temporary name and renamed, so earlier ones are intact.
WRITES_INTO = {"generate": "out", "export": "out", "demo": "out"}


def parse_args(argv: list[str] | None):
    """argparse stops filling a positional list at the first option (`eval RUN --config C a.b=1` leaves `a.b=1`
    over), so leftover `section.key=value` words join the command's overrides wherever they were written."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in word and not word.startswith("-") for word in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from .console import configure
    args = parse_args(argv)
    configure(verbose=args.verbose)  # before the libraries are imported: some warn while importing
    folder = getattr(args, WRITES_INTO.get(args.command, ""), None)
    message, code = None, 0
    try:
        with logging_redirect_tqdm(), (  # log lines through tqdm.write: never on a progress bar's line
                writing_into(folder, f"--out {folder}", "earlier files are intact: free disk space or fix "
                             "permissions, then run again") if folder else contextlib.nullcontext()):
            args.func(args)
    except FinetuneError as exc:
        message, code = f"finetune: error: {exc}", getattr(exc, "exit_code", 2)
    except (OSError, RuntimeError, SafetensorError) as exc:
        reason = storage_reason(exc, getattr(exc, "filename", None))
        if reason is None:
            raise
        # A full disk or a read-only folder that no command named: every file is written under a temporary name
        # and renamed, so what was written before (checkpoints, the previous export) is intact.
        filename = getattr(exc, "filename", None)
        where = os.path.dirname(filename) if filename else "writing"
        message, code = (f"finetune: error: {where}: {reason}; earlier files are intact: free disk space or fix "
                         "permissions, then run again (train.resume=latest continues training)"), 2
    except KeyboardInterrupt:
        message, code = "finetune: interrupted", 130
    if message:
        # Printed once the exception is gone: a progress bar it held open has been closed (its line ended), so the
        # error is the last line and no bar is drawn again below it.
        error_line(message)
    return code


if __name__ == "__main__":
    sys.exit(main())
