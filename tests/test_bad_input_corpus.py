"""Issue 13's corpus: what a careful user gets wrong, through the CLI, each row with its exact outcome.

A row is (setup, command, error): `setup(env)` builds the situation on fresh copies of the photos, the class
images and a finished run (3 steps, a checkpoint at each); `command(env)` is what the user types; `error` is
the one line they must see, a template over env's paths (with <any> where Pillow's or json's own words sit).
Every row also checks that the command left the disk exactly as it was: each file under the test's folder with
the same sha256, nothing added, nothing removed. Rows fail before any model loads (milliseconds each); the
finished run is trained once for the module.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import tiny_overrides

SD15 = "recipes/configs/sd15_dreambooth_lora.yaml"
CKPT = "{run}/checkpoints/step-{step:06d}"


@dataclass
class Env:
    tmp: Path
    model: Path
    sd2: Path
    values: dict = field(default_factory=dict)  # what a setup measured, for the error template
    cleanup: list = field(default_factory=list)

    @property
    def photos(self) -> Path:
        return self.tmp / "photos"

    @property
    def run(self) -> Path:
        return self.tmp / "run"

    @property
    def fmt(self) -> dict:
        return {"tmp": self.tmp, "photos": self.photos, "run": self.run, "model": self.model, "sd2": self.sd2,
                "classes": self.tmp / "class_images", **self.values}

    def base(self) -> list[str]:
        """A fresh run of the tiny model; rows override what they are about."""
        return tiny_overrides(self.model, self.photos, self.tmp, **{
            "output_dir": self.tmp / "fresh", "prior.num_class_images": 0, "train.max_steps": 3,
            "train.checkpoint_every": 1, "train.keep_checkpoints": 3})


@dataclass
class Row:
    name: str
    command: Callable[[Env], list[str]]
    error: str
    setup: Callable[[Env], None] | None = None


def train(*extra: str) -> Callable[[Env], list[str]]:
    return lambda env: ["train", SD15, *env.base(), *(x.format(**env.fmt) for x in extra)]


def cli(*args: str) -> Callable[[Env], list[str]]:
    return lambda env: [a.format(**env.fmt) for a in args]


ON_RUN = "output_dir={run}"  # the finished run's folder
SKIP_HINT = " (or set data.on_bad_image=skip to leave such files out)"


# ----- what the setups write

def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def decompression_bomb(path: Path, side: int = 20000) -> None:
    """A valid PNG header claiming side x side pixels (400 million): Pillow refuses it before decoding."""
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) +
                     png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + png_chunk(b"IEND", b""))


def truncated(path: Path, fmt: str) -> None:
    Image.new("RGB", (96, 96), (200, 120, 40)).save(path, format=fmt)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def cut_in_half(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return len(data) // 2, len(data)


def write(relative: str, text: str | bytes) -> Callable[[Env], None]:
    def setup(env: Env) -> None:
        path = env.tmp / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return setup


def only(*names_and_writers) -> Callable[[Env], None]:
    """A photo folder `tmp/only` holding just these files."""
    def setup(env: Env) -> None:
        folder = env.tmp / "only"
        folder.mkdir()
        for name, writer in names_and_writers:
            writer(folder / name)
    return setup


def damage_all_checkpoints(env: Env) -> None:
    (env.run / "checkpoints/step-000003/progress.json").write_text('{"step": 3, "samples"')
    cut_in_half(env.run / "checkpoints/step-000002/lora_0.safetensors")
    (env.run / "checkpoints/step-000001/optimizer.bin").unlink()


def truncate_named_checkpoint(env: Env) -> None:
    env.values["half"], env.values["full"] = cut_in_half(env.run / "checkpoints/step-000002/lora_0.safetensors")


def hold_lock(env: Env) -> None:
    """Another process holding output_dir's lock, as a run in progress does."""
    script = ("import fcntl, json, os, sys, time\n"
              f"fd = os.open({str(env.run / '.finetune.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
              "fcntl.flock(fd, fcntl.LOCK_EX)\n"
              "os.write(fd, json.dumps({'pid': os.getpid(), 'host': 'gpu-box', 'since': '2026-12-01 10:00:00'})"
              ".encode())\n"
              "print('locked', flush=True)\n"
              "time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    env.cleanup.append(proc.kill)
    assert proc.stdout.readline().strip() == "locked"
    env.values["holder"] = proc.pid


def masks(*, skip: str = "", wrong_shape: str = "", also: tuple[str, str] | None = None) -> Callable[[Env], None]:
    """A masks folder with a white mask per photo of the photo's size, but for `skip` (none), `wrong_shape` (half
    as tall) and `also` ((name, bytes): one more file)."""
    def setup(env: Env) -> None:
        folder = env.tmp / "masks"
        folder.mkdir()
        for photo in sorted(env.photos.glob("*.jpg")):
            width, height = Image.open(photo).size
            if photo.stem == skip:
                continue
            if photo.stem == wrong_shape:
                height = height // 2
                env.values.update(w=width, h=height * 2, mh=height)
            Image.new("L", (width, height), 255).save(folder / f"{photo.stem}.png")
        if also:
            (folder / also[0]).write_bytes(also[1])
    return setup


def class_dir_is_photos(env: Env) -> None:
    (env.tmp / "alias").symlink_to(env.photos)


YAML_SECTION_TWICE = """recipe: dreambooth_lora
train:
  max_steps: 3
data:
  instance_prompt: a photo of sks cat
train:
  learning_rate: 0.001
"""
YAML_KEY_TWICE = """train:
  max_steps: 3
  max_steps: 30
"""

ROWS = [
    # 1. Everything is checked before anything is touched: with train.overwrite=true on a finished run, a bad
    #    input stops the run and the earlier run is still all there (the tree check below).
    Row("overwrite, misspelled photo folder", train(ON_RUN, "train.overwrite=true", "data.instance_dir={tmp}/photoz"),
        "data.instance_dir: folder {tmp}/photoz does not exist; create it or fix the path"),
    Row("overwrite, a truncated photo", train(ON_RUN, "train.overwrite=true"),
        "{photos}/broken.jpg: not a readable image (<any>); replace or remove the file" + SKIP_HINT,
        lambda env: truncated(env.photos / "broken.jpg", "JPEG")),
    Row("overwrite, model that is not there", train(ON_RUN, "train.overwrite=true", "model.pretrained={tmp}/no-model"),
        "model.pretrained: {tmp}/no-model does not exist; give a Hub id, a diffusers folder or a .safetensors file"),
    Row("overwrite, LoRA to start from that is not there",
        train(ON_RUN, "train.overwrite=true", "lora.init_from={tmp}/nope.safetensors"),
        "{tmp}/nope.safetensors: no such LoRA file; give a .safetensors file or a folder holding "
        "pytorch_lora_weights.safetensors"),
    Row("overwrite, LoRA to start from of another rank",
        train(ON_RUN, "train.overwrite=true", "lora.init_from={run}", "lora.rank=8"),
        "lora.init_from: {run} has rank 4 on unet; set lora.rank=4"),
    Row("overwrite, a class image of the user's that does not decode",
        train(ON_RUN, "train.overwrite=true", "prior.num_class_images=2"),
        "data.class_dir: {classes}/mine.png: not a readable image (<any>); replace or remove the file",
        write("class_images/mine.png", b"not a png")),
    Row("overwrite, a caption that is not UTF-8", train(ON_RUN, "train.overwrite=true"),
        "{photos}/cat_0.txt: caption is not UTF-8 text; re-save it as UTF-8",
        write("photos/cat_0.txt", "un chat à la plage".encode("latin-1"))),
    Row("a finished run, neither resumed nor overwritten", train(ON_RUN),
        "output_dir {run} holds checkpoints of an earlier run; pass train.resume=latest to continue it, "
        "train.overwrite=true to replace it, or choose another output_dir"),

    # 2. Folders that must not overlap, and files finetune did not write.
    Row("class_dir is the photo folder", train("prior.num_class_images=2", "data.class_dir={photos}"),
        "data.instance_dir and data.class_dir are the same folder ({photos}); give each its own folder"),
    Row("class_dir is a symbolic link to the photo folder",
        train("prior.num_class_images=2", "data.class_dir={tmp}/alias"),
        "data.instance_dir and data.class_dir are the same folder ({photos}); give each its own folder",
        class_dir_is_photos),
    Row("output_dir is the photo folder (its README.md stays)", train("output_dir={photos}"),
        "output_dir and data.instance_dir are the same folder ({photos}); give each its own folder",
        write("photos/README.md", "# my cat photos\n")),
    Row("output_dir inside the photo folder", train("output_dir={photos}/run"),
        "output_dir ({photos}/run) is inside data.instance_dir ({photos}); finetune would mix their files: give "
        "each its own folder, side by side"),
    Row("class_dir inside output_dir", train(ON_RUN, "train.resume=latest", "train.max_steps=4",
                                             "prior.num_class_images=2", "data.class_dir={run}/checkpoints"),
        "data.class_dir ({run}/checkpoints) is inside output_dir ({run}); finetune would mix their files: give "
        "each its own folder, side by side"),
    Row("data.dataset is output_dir", train("data.instance_dir=", "data.dataset={photos}", "output_dir={photos}"),
        "output_dir and data.dataset are the same folder ({photos}); give each its own folder"),
    Row("output_dir is empty", train("output_dir="), "output_dir: must name a folder for the run, e.g. runs/my-dog"),
    Row("output_dir is a file", train("output_dir={tmp}/notes.txt"),
        "output_dir: cannot write to {tmp}/notes.txt (Not a directory); choose a folder you can write to",
        write("notes.txt", "my notes")),
    Row("output_dir holds the user's README.md", train("output_dir={tmp}/mine"),
        "output_dir {tmp}/mine holds README.md, which finetune did not write and would replace; choose a new or "
        "empty output_dir, or move the file away", write("mine/README.md", "# my project\n")),
    Row("output_dir holds a LoRA another tool wrote", train("output_dir={tmp}/mine"),
        "output_dir {tmp}/mine holds pytorch_lora_weights.safetensors, which finetune did not write and would "
        "replace; choose a new or empty output_dir, or move the file away",
        write("mine/pytorch_lora_weights.safetensors", b"\x08\0\0\0\0\0\0\0{}      ")),
    Row("output_dir holds a file the kohya export would replace", train("output_dir={tmp}/mine", "export.kohya=true"),
        "output_dir {tmp}/mine holds mine.safetensors, which finetune did not write and would replace; choose a "
        "new or empty output_dir, or move the file away", write("mine/mine.safetensors", b"weights of mine")),

    # 3. One run per output folder (a real concurrent training run: tests/recipes/test_run_safety.py).
    Row("another process holds output_dir's lock", train(ON_RUN, "train.resume=latest", "train.max_steps=4"),
        "output_dir {run} is in use by another finetune run (pid {holder} on gpu-box, since 2026-12-01 10:00:00); "
        "wait for it to end or choose another output_dir", hold_lock),

    # 4. Resume that survives damage, and settings that cannot match.
    Row("every checkpoint damaged (bad JSON, cut short, a part missing)",
        train(ON_RUN, "train.resume=latest", "train.max_steps=4"),
        "train.resume=latest: none of the 3 checkpoints in {run}/checkpoints is usable (the newest: progress.json is "
        "unreadable (JSONDecodeError: <any>)); start afresh with train.overwrite=true and no train.resume, or "
        "choose another output_dir", damage_all_checkpoints),
    Row("a named checkpoint cut short", train(ON_RUN, f"train.resume={CKPT.format(run='{run}', step=2)}"),
        "train.resume: cannot resume from {run}/checkpoints/step-000002: lora_0.safetensors is {half} bytes, but "
        "{full} were written; name an intact checkpoint, or pass train.resume=latest to take the newest intact one",
        truncate_named_checkpoint),
    Row("resume with another rank", train(ON_RUN, "train.resume=latest", "train.max_steps=4", "lora.rank=8"),
        "train.resume: {run}/checkpoints/step-000003 was trained with lora.rank=4, this run sets lora.rank=8; resume "
        "with the checkpoint's settings, or start afresh (train.overwrite=true or another output_dir)"),
    Row("resume with other targets", train(ON_RUN, "train.resume=latest", "train.max_steps=4",
                                           "lora.unet_targets=all_attention"),
        "train.resume: {run}/checkpoints/step-000003 was trained with lora.unet_targets=cross_attention, this run "
        "sets lora.unet_targets=all_attention; resume with the checkpoint's settings, or start afresh "
        "(train.overwrite=true or another output_dir)"),
    Row("resume with text-encoder LoRA added", train(ON_RUN, "train.resume=latest", "train.max_steps=4",
                                                     "lora.text_encoder=true"),
        "train.resume: {run}/checkpoints/step-000003 was trained with lora.text_encoder=false, this run sets "
        "lora.text_encoder=true; resume with the checkpoint's settings, or start afresh (train.overwrite=true or "
        "another output_dir)"),
    Row("resume on another model", train(ON_RUN, "train.resume=latest", "train.max_steps=4", "model.pretrained={sd2}"),
        "train.resume: {run}/checkpoints/step-000003 was trained on {model} (an sd1 model), but "
        "model.pretrained={sd2} is an sd2-v model; resume with the model it was trained on"),
    Row("resume past max_steps", train(ON_RUN, "train.resume=latest", "train.max_steps=2"),
        "train.resume: {run}/checkpoints/step-000003 is at step 3, past train.max_steps=2; raise train.max_steps to "
        "train on from it"),
    Row("resume=latest with no checkpoint", train("train.resume=latest"),
        "train.resume=latest: no checkpoint in {tmp}/fresh/checkpoints; drop train.resume to start fresh"),
    Row("resume from a folder that is not a checkpoint", train(ON_RUN, "train.resume={photos}"),
        "train.resume: {photos} is not a checkpoint folder (no progress.json); use latest or a folder under "
        "{run}/checkpoints"),

    # 5. Every number and choice checked before any model loads; YAML keys given twice.
    Row("learning rate inf", train("train.learning_rate=.inf"),
        "train.learning_rate: must be a finite number, got inf"),
    Row("learning rate nan", train("train.learning_rate=.nan"),
        "train.learning_rate: must be a finite number, got nan"),
    Row("alpha nan", train("lora.alpha=nan"), "lora.alpha: must be a finite number, got nan"),
    Row("snr gamma inf", train("loss.snr_gamma=-.inf"), "loss.snr_gamma: must be a finite number, got -inf"),
    Row("negative prior weight", train("prior.loss_weight=-1"), "prior.loss_weight: must be 0 or more"),
    Row("resolution not a multiple of 8", train("train.resolution=100"), "train.resolution: must be a multiple of 8"),
    Row("rank 0", train("lora.rank=0"), "lora.rank: must be at least 1"),
    Row("caption dropout above 1", train("data.caption_dropout=1.5"), "data.caption_dropout: must be in [0, 1]"),
    Row("negative gradient clipping", train("train.max_grad_norm=-1"),
        "train.max_grad_norm: must be 0 (no clipping) or positive"),
    Row("negative weight decay", train("train.weight_decay=-0.1"), "train.weight_decay: must be 0 or more"),
    Row("negative validation guidance", train("validation.guidance=-1"), "validation.guidance: must be 0 or more"),
    Row("caption extension without its dot", train("data.caption_extension=txt"),
        "data.caption_extension: must be a file ending such as .txt"),
    Row("unknown lr schedule", train("train.lr_scheduler=cosin"),
        "train.lr_scheduler: 'cosin' is not one of constant, constant_with_warmup, linear, cosine, "
        "cosine_with_restarts, polynomial"),
    Row("unknown class-image sampler", train("prior.generation_scheduler=fast"),
        "prior.generation_scheduler: 'fast' is not one of dpm++, ddim, euler, euler_a, pndm, default"),
    Row("unknown precision", train("train.mixed_precision=fp8"),
        "train.mixed_precision: 'fp8' is not one of no, fp16, bf16"),
    Row("a section given twice", cli("train", "{tmp}/twice.yaml", "output_dir={tmp}/fresh"),
        "{tmp}/twice.yaml: line 6: train is given twice (first on line 2); YAML would keep only the second, so "
        "delete or merge one of them", write("twice.yaml", YAML_SECTION_TWICE)),
    Row("a key given twice in a section", cli("train", "{tmp}/twice.yaml"),
        "{tmp}/twice.yaml: line 3: train.max_steps is given twice (first on line 2); YAML would keep only the "
        "second, so delete or merge one of them", write("twice.yaml", YAML_KEY_TWICE)),
    Row("an override where the config belongs", cli("train", "train.max_steps=5"),
        "train.max_steps=5: config file not found (it looks like an override: the config file comes first); pass "
        "the path of a YAML file (see recipes/configs/)"),

    # 5b. Issue 17: EMA and loss masks, checked before anything is written.
    Row("ema decay of 1", train("train.ema_decay=1"), "train.ema_decay: must be in [0, 1) (0 turns the EMA off)"),
    Row("unknown ema device", train("train.ema_device=gpu"), "train.ema_device: 'gpu' is not one of accelerator, cpu"),
    Row("resume with EMA added", train(ON_RUN, "train.resume=latest", "train.max_steps=4", "train.ema_decay=0.9"),
        "train.resume: {run}/checkpoints/step-000003 was trained with no EMA (train.ema_decay=0), this run sets "
        "train.ema_decay=0.9; resume with the checkpoint's setting, or start afresh (train.overwrite=true or another "
        "output_dir)"),
    Row("mask weight above 1", train("data.masks={tmp}/masks", "data.mask_weight=1.5"),
        "data.mask_weight: must be in [0, 1]"),
    Row("masks folder that is not there", train("data.masks={tmp}/maskz"),
        "data.masks: folder {tmp}/maskz does not exist; create it or fix the path (or data.masks=alpha for the "
        "photos' alpha channel)"),
    Row("masks folder is the photo folder", train("data.masks={photos}"),
        "data.masks and data.instance_dir are the same folder ({photos}); put the masks in a folder of their own, "
        "each named like its photo"),
    Row("a photo without a mask", train("data.masks={tmp}/masks"),
        "data.masks: no mask for {photos}/cat_2.jpg in {tmp}/masks (a mask has the photo's file stem, e.g. "
        "cat_2.png); add one (white = subject), or drop data.masks", masks(skip="cat_2")),
    Row("two masks for one photo", train("data.masks={tmp}/masks"),
        "data.masks: {tmp}/masks/cat_1.jpg and {tmp}/masks/cat_1.png are both masks for {photos}/cat_1.jpg; keep one",
        masks(also=("cat_1.jpg", b"a second mask"))),
    Row("a mask that does not decode", train("data.masks={tmp}/masks"),
        "{tmp}/masks/cat_0.png: not a readable image (<any>); replace or remove the file",
        masks(skip="cat_0", also=("cat_0.png", b"not a png"))),
    Row("a mask of another aspect ratio", train("data.masks={tmp}/masks"),
        "{tmp}/masks/cat_3.png: {w}x{mh} pixels, but its photo {photos}/cat_3.jpg is {w}x{h}; a mask must have its "
        "photo's aspect ratio (save it at the photo's size)", masks(wrong_shape="cat_3")),
    Row("alpha masks from photos without alpha", train("data.masks=alpha"),
        "{photos}/cat_0.jpg: has no alpha channel, but data.masks=alpha takes the loss mask from it; save it with "
        "transparency (PNG, WebP), or give data.masks a folder of masks"),
    Row("masks with a datasets folder", train("data.instance_dir=", "data.dataset={photos}", "data.masks=alpha"),
        "data.masks: masks are matched to photos by file name, which data.dataset rows do not have; use "
        "data.instance_dir with data.masks"),

    # 6. Photos: decode errors land in data.on_bad_image; formats Pillow reads are read; junk is ignored, not fatal.
    Row("a decompression bomb", train(), "{photos}/bomb.png: not decoded, too many pixels (Image size (400000000 "
        "pixels) exceeds limit of <any> pixels, could be decompression bomb DOS attack.); downscale it" + SKIP_HINT,
        lambda env: decompression_bomb(env.photos / "bomb.png")),
    Row("a broken symbolic link", train(), "{photos}/gone.jpg: a symbolic link to {tmp}/moved.jpg, which does not "
        "exist; fix or remove the link" + SKIP_HINT,
        lambda env: (env.photos / "gone.jpg").symlink_to(env.tmp / "moved.jpg")),
    Row("a truncated BMP is read, so named", train(),
        "{photos}/scan.bmp: not a readable image (<any>); replace or remove the file" + SKIP_HINT,
        lambda env: truncated(env.photos / "scan.bmp", "BMP")),
    Row("a truncated TIFF is read, so named", train(),
        "{photos}/scan.tiff: not a readable image (<any>); replace or remove the file" + SKIP_HINT,
        lambda env: truncated(env.photos / "scan.tiff", "TIFF")),
    Row("AppleDouble and hidden files are not photos", train("data.instance_dir={tmp}/only"),
        "data.instance_dir: {tmp}/only has no photos (.jpg, .png, .webp or another format Pillow reads); add some",
        only(("._cat.jpg", lambda p: p.write_bytes(b"\0\x05\x16\x07AppleDouble junk")),
             (".hidden.png", lambda p: p.write_bytes(b"junk")), (".DS_Store", lambda p: p.write_bytes(b"\0")))),

    # 7. The other commands check their arguments before loading anything.
    Row("generate: no images", cli("generate", "--model", "{model}", "--prompt", "a cat", "--num-images", "0"),
        "--num-images 0: must be at least 1"),
    Row("generate: odd resolution", cli("generate", "--model", "{model}", "--prompt", "a cat", "--resolution", "100"),
        "--resolution 100: must be a positive multiple of 8, e.g. 512"),
    Row("generate: no steps", cli("generate", "--model", "{model}", "--prompt", "a cat", "--steps", "0"),
        "--steps 0: must be at least 1"),
    Row("generate: guidance nan", cli("generate", "--model", "{model}", "--prompt", "a cat", "--guidance", "nan"),
        "--guidance nan: must be a finite number, 0 or more"),
    Row("generate: empty prompt", cli("generate", "--model", "{model}", "--prompt", " "),
        "--prompt is empty; describe the image, e.g. --prompt 'a photo of sks dog'"),
    Row("generate: unknown sampler", cli("generate", "--model", "{model}", "--prompt", "a cat", "--scheduler", "fast"),
        "--scheduler: 'fast' is unknown; choose one of dpm++, ddim, euler, euler_a, pndm, default"),
    Row("generate: model that is not there", cli("generate", "--model", "{tmp}/no-model", "--prompt", "a cat"),
        "--model {tmp}/no-model does not exist; give a Hub id, a diffusers folder or a .safetensors file"),
    Row("generate: LoRA scale nan", cli("generate", "--model", "{model}", "--prompt", "a cat", "--lora", "{run}:nan"),
        "--lora {run}:nan: the scale after ':' must be a finite number, e.g. {run}:0.8"),
    Row("generate: not a device", cli("generate", "--model", "{model}", "--prompt", "a cat", "--device", "gpu0"),
        "--device gpu0: not a device; use cpu, cuda or cuda:N"),
    Row("generate: --out is a file", cli("generate", "--model", "{model}", "--prompt", "a cat", "--out",
                                         "{tmp}/notes.txt"),
        "--out: cannot write to {tmp}/notes.txt (Not a directory); choose a folder you can write to",
        write("notes.txt", "my notes")),
    Row("generate: --from-png that is not there", cli("generate", "--from-png", "{tmp}/drawn.png"),
        "--from-png {tmp}/drawn.png: no such file"),
    Row("generate: --from-png of a photo", cli("generate", "--from-png", "{photos}/cat_0.jpg"),
        "--from-png {photos}/cat_0.jpg: the image holds no finetune parameters (it was not written by finetune "
        "generate)"),
    Row("generate: neither --model nor --from-png", cli("generate", "--prompt", "a cat"),
        "generate needs --model and --prompt, or --from-png IMAGE to draw an image again"),
    Row("export: --out is the LoRA it converts", cli("export", "{run}", "--format", "diffusers", "--out", "{run}"),
        "--out {run} would overwrite the LoRA it is made from ({run}/pytorch_lora_weights.safetensors); choose "
        "another --out"),
    Row("export: --out is a file finetune did not write", cli("export", "{run}", "--format", "kohya", "--out",
                                                              "{tmp}/mine.safetensors"),
        "--out {tmp}/mine.safetensors exists and finetune did not write it; choose another --out or move the file "
        "away", write("mine.safetensors", b"my own weights")),
    Row("export: fuse into the base model's folder", cli("export", "{run}", "--fuse", "--base", "{model}", "--out",
                                                         "{model}/unet"),
        "--out {model}/unet is the base model or inside it, which would be overwritten; choose another --out"),
    Row("export: fuse into a folder that is not empty", cli("export", "{run}", "--fuse", "--base", "{model}", "--out",
                                                            "{tmp}/photos"),
        "--out {tmp}/photos is a folder that is not empty; a fused model goes to a new or empty folder"),
    Row("export: scale nan", cli("export", "{run}", "--fuse", "--base", "{model}", "--scale", "nan", "--out",
                                 "{tmp}/merged"), "--scale nan: must be a finite number, e.g. 0.8"),
    Row("export: source that is not there",
        cli("export", "{tmp}/nope", "--format", "kohya", "--out", "{tmp}/x.safetensors"),
        "{tmp}/nope: no such LoRA file or run folder"),
    Row("plan: a card of 0 GiB", cli("plan", SD15, "model.pretrained={model}", "--gpu-memory", "0GiB"),
        "--gpu-memory '0GiB': must be a size above 0, e.g. 8GiB, 6GB or 6144MiB"),
    Row("plan: a size that is not a number", cli("plan", SD15, "model.pretrained={model}", "--gpu-memory", "1.2.3"),
        "--gpu-memory '1.2.3': must be a size above 0, e.g. 8GiB, 6GB or 6144MiB"),
    Row("plan: --json is a folder", cli("plan", SD15, "model.pretrained={model}", "--gpu-memory", "8GiB", "--json",
                                        "{photos}"),
        "--json {photos} is a folder; give a file name, e.g. plan.json"),
    Row("show-config: a key given twice", cli("show-config", "{tmp}/twice.yaml"),
        "{tmp}/twice.yaml: line 3: train.max_steps is given twice (first on line 2); YAML would keep only the "
        "second, so delete or merge one of them", write("twice.yaml", YAML_KEY_TWICE)),
    Row("show-config: a value that is not finite", cli("show-config", SD15, "prior.guidance_scale=.inf"),
        "prior.guidance_scale: must be a finite number, got inf"),
]


@pytest.fixture(scope="module")
def finished_run(tiny_sd1, photos_master, tmp_path_factory) -> Path:
    """Photos, 2 class images and a finished 3-step run with a checkpoint at each step, trained once."""
    from finetune.cli import main
    root = tmp_path_factory.mktemp("finished")
    shutil.copytree(photos_master, root / "photos")
    overrides = tiny_overrides(tiny_sd1, root / "photos", root, **{
        "prior.num_class_images": 2, "train.max_steps": 3, "train.checkpoint_every": 1, "train.keep_checkpoints": 3})
    assert main(["train", SD15, *overrides]) == 0
    return root


def tree(folder: Path) -> dict[str, str]:
    """Every entry under `folder`: a file's sha256, a link's target, or 'folder'."""
    entries = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            key = str(path.relative_to(folder))
            if path.is_symlink():
                entries[key] = "link to " + os.readlink(path)
            elif path.is_dir():
                entries[key] = "folder"
            else:
                entries[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return entries


def expected_line(template: str, env: Env) -> re.Pattern:
    """The error line, after any `warning: ...` lines said on the way (a damaged checkpoint passed over), which the
    console prints above it as the user sees them."""
    text = template.format(**env.fmt)
    return re.compile("(warning: [^\n]*\n)*finetune: error: " + re.escape(text).replace(re.escape("<any>"), ".+")
                      + "\n")


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_bad_input_is_one_line_and_changes_nothing(row, finished_run, tiny_sd1, tiny_sd2, tmp_path, run_cli):
    for name in ("photos", "class_images", "run"):
        shutil.copytree(finished_run / name, tmp_path / name, symlinks=True)
    env = Env(tmp_path, tiny_sd1, tiny_sd2)
    try:
        if row.setup:
            row.setup(env)
        before = tree(tmp_path)
        code, out, err = run_cli(*row.command(env))
        assert (code, "Traceback" in out + err) == (2, False), err
        assert expected_line(row.error, env).fullmatch(err), err
        assert tree(tmp_path) == before, "the command changed files although it stopped"
    finally:
        for stop in env.cleanup:
            stop()


def test_the_corpus_covers_every_point_of_the_issue_with_forty_rows_or_more():
    assert len(ROWS) >= 40 and len({row.name for row in ROWS}) == len(ROWS)


def test_resume_passes_over_damaged_checkpoints_and_redraws_a_cut_short_class_image(
        finished_run, tmp_path, tiny_sd1, run_cli, caplog):
    """An earlier run killed on a filesystem without atomic renames: its newest checkpoint's progress.json is
    half written, the one before lost half its LoRA file, one class image is cut short. The run goes on from the
    newest intact checkpoint (step 1), moves the damaged ones aside (kept, not deleted), and draws the class
    image again (from the same seed; drawn alone rather than in a batch of two, so not bit for bit the same)."""
    import logging
    caplog.set_level(logging.INFO, logger="finetune")
    for name in ("photos", "class_images", "run"):
        shutil.copytree(finished_run / name, tmp_path / name)
    run, classes = tmp_path / "run", tmp_path / "class_images"
    (run / "checkpoints/step-000003/progress.json").write_text('{"step": 3, "sampl')
    half, full = cut_in_half(run / "checkpoints/step-000002/lora_0.safetensors")
    damaged = {step: tree(run / f"checkpoints/step-00000{step}") for step in (2, 3)}
    drawn, kept = sorted(classes.iterdir())
    kept_bytes = kept.read_bytes()
    cut_in_half(drawn)
    photos_before = tree(tmp_path / "photos")

    overrides = tiny_overrides(tiny_sd1, tmp_path / "photos", tmp_path, **{
        "prior.num_class_images": 2, "train.max_steps": 3, "train.checkpoint_every": 1, "train.keep_checkpoints": 3,
        "train.resume": "latest"})
    code, _, err = run_cli("train", SD15, *overrides)
    assert code == 0, err
    ckpt = run / "checkpoints"
    assert (f"warning: cannot resume from {ckpt}/step-000003: progress.json is unreadable (JSONDecodeError: "
            in caplog.text)
    assert (f"warning: cannot resume from {ckpt}/step-000002: lora_0.safetensors is {half} bytes, but {full} were "
            "written; trying the one before") in caplog.text
    assert f"resumed from {ckpt}/step-000001 at step 1" in caplog.text
    from finetune.training.checkpoint import checkpoint_dirs, checkpoint_problem
    assert [p.name for p in checkpoint_dirs(run)] == ["step-000001", "step-000002", "step-000003"]
    assert all(checkpoint_problem(p) is None for p in checkpoint_dirs(run))
    for step, entries in damaged.items():  # moved aside whole, for whoever wants to look at them
        assert tree(ckpt / f"step-00000{step}.damaged") == entries
    assert f"warning: {drawn} is cut short or does not decode (left by an interrupted run); drawing it again" \
        in caplog.text
    redrawn = sorted(set(classes.iterdir()) - {kept})
    assert len(redrawn) == 1 and redrawn[0].name.startswith("class-00000-") and kept.read_bytes() == kept_bytes
    assert redrawn[0].name[12:24] == hashlib.sha1(redrawn[0].read_bytes()).hexdigest()[:12]  # whole, as named
    assert Image.open(redrawn[0]).size == (64, 64)
    assert tree(tmp_path / "photos") == photos_before
    assert not (run / ".finetune.lock").exists()  # released at the end
