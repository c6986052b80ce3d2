"""Resumable checkpoints through Accelerate: LoRA weights, optimizer, scheduler, RNG and the step count."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from ..errors import FinetuneError
from ..files import follow_umask
from ..lora import load_lora_state, lora_state

CHECKPOINTS = "checkpoints"
PROGRESS = "progress.json"


def register_lora_only_saving(accelerator: Accelerator) -> None:
    """Make save_state/load_state store the LoRA weights of each prepared model, not the whole frozen model."""

    def save(models, weights, output_dir):
        if accelerator.is_main_process:
            for i, model in enumerate(models):
                path = os.path.join(output_dir, f"lora_{i}.safetensors")
                save_file(lora_state(accelerator.unwrap_model(model)), path)
                follow_umask(path)  # safetensors writes 0600 (finetune.files)
        weights.clear()

    def load(models, input_dir):
        for i, model in enumerate(list(models)):
            path = os.path.join(input_dir, f"lora_{i}.safetensors")
            if not os.path.isfile(path):
                raise FinetuneError(f"{input_dir}: checkpoint has no lora_{i}.safetensors; it was written with "
                                    "other LoRA settings (lora.text_encoder?) than this run's")
            load_lora_state(accelerator.unwrap_model(model), load_file(path))
        models.clear()

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Finished checkpoints, oldest first (a folder counts once its progress file is in place)."""
    root = Path(output_dir) / CHECKPOINTS
    found = [p for p in root.glob("step-*") if (p / PROGRESS).is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: json.loads((p / PROGRESS).read_text())["step"])


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, step: int, keep: int, extra_files=None,
                    progress: dict | None = None) -> Path:
    """Write checkpoints/step-N under a temporary name and rename it, so a crash never leaves half a checkpoint.

    `extra_files(folder)` may add files (the export) before the rename; `progress` adds to the step in
    progress.json (e.g. samples seen). Only once the new checkpoint is complete
    are older ones beyond the newest `keep` deleted, so the last good checkpoint always survives a failed save.
    A failed write (full disk, permissions) is a one-line error that says the previous checkpoints are intact.
    """
    final = Path(output_dir) / CHECKPOINTS / f"step-{step:06d}"
    tmp = final.with_name(f".{final.name}.tmp")
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            if extra_files is not None:
                extra_files(tmp)
            (tmp / PROGRESS).write_text(json.dumps({"step": step, **(progress or {})}))
            _replace_dir(tmp, final)
            for old in checkpoint_dirs(output_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        raise FinetuneError(f"{final}: could not write the checkpoint ({exc.strerror or exc}); the previous "
                            "checkpoints and export are intact: free disk space or fix permissions, then resume "
                            "with train.resume=latest") from None
    accelerator.wait_for_everyone()
    return final


def _replace_dir(new: Path, final: Path) -> None:
    """Put folder `new` at `final`; an existing `final` is moved aside first, and restored if we die in between."""
    aside = final.with_name(f".{final.name}.old")
    if final.exists():
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
    os.replace(new, final)
    shutil.rmtree(aside, ignore_errors=True)


def clean_partial_saves(output_dir: str | Path) -> list[Path]:
    """Remove what a killed save left behind (.step-N.tmp, export scratch folders); restore a moved-aside step."""
    root = Path(output_dir)
    removed = []
    for folder in (root / CHECKPOINTS).glob(".step-*.old") if (root / CHECKPOINTS).is_dir() else []:
        final = folder.with_name(folder.name[1:-len(".old")])
        if not final.exists() and (folder / PROGRESS).is_file():
            os.replace(folder, final)
        else:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    leftovers = list((root / CHECKPOINTS).glob(".step-*.tmp")) + list(root.glob(".export-*")) + \
        list((root / CHECKPOINTS).glob("step-*/.export-*"))
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def find_checkpoint(output_dir: str | Path, resume: str | None) -> Path | None:
    """The checkpoint `train.resume` names: `latest`, a folder, or None (start fresh)."""
    if not resume:
        return None
    if resume == "latest":
        found = checkpoint_dirs(output_dir)
        if not found:
            raise FinetuneError(f"train.resume=latest: no checkpoint in {Path(output_dir) / CHECKPOINTS}; "
                                "drop train.resume to start fresh")
        return found[-1]
    path = Path(resume)
    if not (path / PROGRESS).is_file():
        raise FinetuneError(f"train.resume: {resume} is not a checkpoint folder (no {PROGRESS}); use latest or "
                            f"a folder under {Path(output_dir) / CHECKPOINTS}")
    return path


def read_progress(path: Path) -> dict:
    """What progress.json of a checkpoint says: at least the step to continue from."""
    return json.loads((path / PROGRESS).read_text())


def resume_point(checkpoint: Path | None, samples_per_step: int) -> tuple[int, int]:
    """(optimizer steps done, samples seen) at the checkpoint; (0, 0) for a fresh run. A checkpoint without a
    sample count (written before it was recorded) saw step x samples_per_step samples."""
    if checkpoint is None:
        return 0, 0
    progress = read_progress(checkpoint)
    return progress["step"], progress.get("samples", progress["step"] * samples_per_step)


def load_checkpoint(accelerator: Accelerator, path: Path) -> int:
    """Restore everything save_checkpoint wrote; return the step to continue from.

    It may have been written by another number of processes: LoRA weights, optimizer and schedule are one copy
    for all; Accelerate's per-process RNG files are restored where they exist, but nothing depends on them
    (data order and noise are keyed by sample position), which is what makes resuming on M != N exact.
    """
    accelerator.load_state(str(path))
    return int(read_progress(path)["step"])
