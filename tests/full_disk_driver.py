"""Runs finetune's CLI against a real, small filesystem that fills up (tests/recipes/test_run_safety.py).

Started inside a private mount namespace with a tmpfs of a few MiB mounted at MOUNT (`unshare -rm`, no root
needed), so the disk that fills is a real one: safetensors, torch.save and Pillow meet a real ENOSPC. Writes
what each command printed and the files before and after as JSON to RESULT; the test asserts on it.

    python tests/full_disk_driver.py MOUNT MODEL PHOTOS WORK RESULT
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)
logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)  # logs stay out of `err` below

from accelerate.state import AcceleratorState, GradientState, PartialState  # noqa: E402

from finetune.cli import main  # noqa: E402
from tests.helpers import tiny_overrides  # noqa: E402

SD15 = "recipes/configs/sd15_dreambooth_lora.yaml"


def cli(*args) -> dict:
    """One command in this process, as a user runs it: its exit code and what it printed on stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    for state in (AcceleratorState, GradientState, PartialState):  # as a new process would start
        state._reset_state(True) if state is AcceleratorState else state._reset_state()
    return {"code": code, "err": err.getvalue()}


def files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def fill(mount: Path, leave: int) -> None:
    """Write a filler file so that only `leave` bytes stay free on the mount."""
    free = shutil.disk_usage(mount).free
    with open(mount / "filler", "ab") as handle:
        handle.write(b"\0" * max(0, free - leave))


def unfill(mount: Path) -> None:
    (mount / "filler").unlink(missing_ok=True)


def class_images_on_a_full_disk(mount: Path, model: Path, photos: Path, work: Path) -> dict:
    """Drawing 3 class images with room for about one: one line naming the folder, no half-written PNG (that a
    later run reuses what was written is tests/data/test_class_images.py's)."""
    classes = mount / "class_images"
    overrides = tiny_overrides(model, photos, work, **{"data.class_dir": classes, "output_dir": work / "run-a",
                                                       "prior.num_class_images": 3, "train.max_steps": 1})
    fill(mount, leave=28 * 1024)  # room for one or two 64 px PNGs of noise (about 12 KiB each), not three
    full = cli("train", SD15, *overrides)
    written = files(classes) if classes.is_dir() else {}
    # Each of our class images carries the sha1 of its bytes in its name: whole ones match.
    whole = all(name[12:24] == hashlib.sha1((classes / name).read_bytes()).hexdigest()[:12] for name in written)
    hidden = [p.name for p in classes.iterdir() if p.name.startswith(".")] if classes.is_dir() else []
    unfill(mount)
    return {"full": full, "written": written, "whole": whole, "hidden": hidden}


def checkpoints_on_a_full_disk(mount: Path, model: Path, photos: Path, work: Path) -> dict:
    """A run with two checkpoints; resumed, the disk fills just before the next checkpoint: with nothing free
    (safetensors' writer fails), then with room for the LoRA file only (torch.save's writer fails)."""
    import finetune.training.loop as loop
    run = mount / "run"
    overrides = tiny_overrides(model, photos, work, **{
        "output_dir": run, "prior.num_class_images": 0, "train.max_steps": 2, "train.checkpoint_every": 1})
    result = {"first": cli("train", SD15, *overrides), "cases": []}
    real = loop.save_checkpoint
    lora_bytes = (run / "checkpoints/step-000002/lora_0.safetensors").stat().st_size
    for leave in (0, lora_bytes + 8192):  # tmpfs counts whole 4 KiB pages
        def fill_then_save(*args, leave=leave, **kwargs):
            fill(mount, leave)
            return real(*args, **kwargs)
        before = files(run)
        loop.save_checkpoint = fill_then_save
        try:
            outcome = cli("train", SD15, *overrides, "train.max_steps=3", "train.resume=latest")
        finally:
            loop.save_checkpoint = real
            unfill(mount)
        result["cases"].append({"leave": leave, **outcome, "before": before, "after": files(run),
                                "hidden": [str(p.relative_to(run)) for p in run.rglob(".*")]})
    return result


def read_only(mount: Path, model: Path, photos: Path, work: Path) -> dict:
    subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
    try:
        overrides = tiny_overrides(model, photos, work, **{"output_dir": mount / "new-run",
                                                           "prior.num_class_images": 0})
        return cli("train", SD15, *overrides)
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(mount)], check=True)


def generate_and_export_on_a_full_disk(mount: Path, model: Path, work: Path) -> dict:
    """generate into a folder with earlier images, and export over an earlier export, on a full disk."""
    from PIL import Image
    out, kohya = mount / "generated", mount / "dog.safetensors"
    out.mkdir()
    for name in ("0000.png", "0001.png", "grid.png"):  # what an earlier generate left
        Image.new("RGB", (64, 64), "gray").save(out / name)
    generate = ["generate", "--model", model, "--prompt", "a photo of dog", "--num-images", 2, "--steps", 2,
                "--resolution", 64, "--out", out]
    export = ["export", mount / "run", "--format", "kohya", "--out", kohya]
    result = {"first_export": cli(*export)}
    before = {"generated": files(out), "kohya": hashlib.sha256(kohya.read_bytes()).hexdigest()}
    fill(mount, leave=0)
    result["generate"] = cli(*generate, "--seed", 7)
    result["export"] = cli(*export, "--precision", "fp32")
    unfill(mount)
    result.update(before=before, after={"generated": files(out),
                                        "kohya": hashlib.sha256(kohya.read_bytes()).hexdigest()},
                  hidden=[p.name for p in [*out.iterdir(), *mount.iterdir()] if p.name.startswith(".")])
    return result


if __name__ == "__main__":
    mount, model, photos, work, result_path = map(Path, sys.argv[1:6])
    results = {"class_images": class_images_on_a_full_disk(mount, model, photos, work),
               "checkpoints": checkpoints_on_a_full_disk(mount, model, photos, work),
               "read_only": read_only(mount, model, photos, work),
               "generate_export": generate_and_export_on_a_full_disk(mount, model, work)}
    result_path.write_text(json.dumps(results, indent=1))
