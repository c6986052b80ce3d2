"""Resumable checkpoints through Accelerate: LoRA weights, optimizer, scheduler, RNG and the step count."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import zipfile
from pathlib import Path

from accelerate import Accelerator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..console import brief
from ..errors import FinetuneError
from ..lora import load_lora_state, lora_state
from ..storage import follow_umask, storage_reason

log = logging.getLogger("finetune")
CHECKPOINTS = "checkpoints"
PROGRESS = "progress.json"
STEP_FOLDER = re.compile(r"step-(\d+)")


def register_lora_only_saving(accelerator: Accelerator) -> None:
    """Make save_state/load_state store the LoRA weights of each prepared model, not the whole frozen model."""

    def save(models, weights, output_dir):
        if accelerator.is_main_process:
            for i, model in enumerate(models):
                path = os.path.join(output_dir, f"lora_{i}.safetensors")
                save_file(lora_state(accelerator.unwrap_model(model)), path)
                follow_umask(path)  # safetensors writes 0600 (finetune.storage)
        weights.clear()

    def load(models, input_dir):
        for i, model in enumerate(list(models)):
            path = os.path.join(input_dir, f"lora_{i}.safetensors")
            if not os.path.isfile(path):
                raise FinetuneError(f"{input_dir}: checkpoint has no lora_{i}.safetensors; it was written with "
                                    "other LoRA settings (lora.text_encoder?) than this run's")
            try:
                load_lora_state(accelerator.unwrap_model(model), load_file(path))
            except RuntimeError as exc:  # shapes of another model or rank
                raise FinetuneError(f"{path}: does not fit this run's model and LoRA settings "
                                    f"({brief(exc, 200)}); resume with the model and lora.* "
                                    "settings it was trained with") from None
        models.clear()

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def step_folders(output_dir: str | Path) -> list[Path]:
    """Every checkpoints/step-N folder, finished or not, oldest first (by the N in its name)."""
    root = Path(output_dir) / CHECKPOINTS
    found = [p for p in root.iterdir() if p.is_dir() and STEP_FOLDER.fullmatch(p.name)] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))  # STEP_FOLDER matched: step-NNNNNN


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Finished checkpoints, oldest first (a folder counts once its progress file is in place)."""
    return [p for p in step_folders(output_dir) if (p / PROGRESS).is_file()]


def checkpoint_problem(path: Path) -> str | None:
    """Why checkpoint folder `path` cannot be resumed from (cut short, a part missing, unreadable), or None.

    progress.json lists every file of the checkpoint with its size when it was written, so a part that is
    missing or cut short shows without loading anything; each file is also parsed (safetensors header and
    data, the zip archives torch.save writes), which catches what a listing cannot."""
    try:
        progress = json.loads((path / PROGRESS).read_text())
        int(progress["step"])
    except FileNotFoundError:
        return f"no {PROGRESS}: the save was cut short"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{PROGRESS} is unreadable ({type(exc).__name__}: {str(exc)[:80]})"
    listed = progress.get("files") or {"lora_0.safetensors": None}  # checkpoints written before the list
    for name, size in listed.items():
        part = path / name
        if not part.is_file():
            return f"{name} is missing"
        if size is not None and part.stat().st_size != size:
            return f"{name} is {part.stat().st_size} bytes, but {size} were written"
    for part in sorted(path.rglob("*")):
        problem = unreadable(part) if part.is_file() else None
        if problem:
            return f"{part.relative_to(path)} is unreadable ({problem})"
    return None


def unreadable(part: Path) -> str | None:
    try:
        if part.suffix == ".safetensors":
            load_file(part)
        elif part.suffix in (".bin", ".pkl", ".pt"):  # torch.save writes zip archives: check every member's CRC
            with zipfile.ZipFile(part) as archive:
                bad = archive.testzip()
            if bad:
                return f"member {bad} is corrupt"
        elif part.suffix == ".json":
            json.loads(part.read_text())
    except (OSError, ValueError, SafetensorError, zipfile.BadZipFile, EOFError) as exc:
        return f"{type(exc).__name__}: {str(exc)[:80]}"
    return None


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
        # Each process writes its own files (its RNG state) and save_state does not wait for the others: without
        # this, the main process could rename the folder while another still writes into it (seen in CI: "Parent
        # directory .step-000004.tmp does not exist" on rank 1), and progress.json could miss that file.
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if extra_files is not None:
                extra_files(tmp)
            # Every part with its size, so a resume can tell a checkpoint cut short from a whole one.
            files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
            (tmp / PROGRESS).write_text(json.dumps({"step": step, **(progress or {}), "files": files}))
            _replace_dir(tmp, final)
            for old in checkpoint_dirs(output_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    except (OSError, SafetensorError, RuntimeError) as exc:  # safetensors and torch.save do not raise OSError
        reason = storage_reason(exc, tmp.parent)
        if reason is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # give the space of the half-written save back
        raise FinetuneError(f"{final}: could not write the checkpoint ({reason}); the previous "
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


def find_checkpoint(output_dir: str | Path, resume: str | None) -> tuple[Path | None, list[Path]]:
    """(the checkpoint `train.resume` names, the damaged ones passed over): `latest` is the newest intact one,
    with a warning for each newer one that is damaged; a named folder must be intact; None starts fresh."""
    if not resume:
        return None, []
    if resume == "latest":
        found, damaged = step_folders(output_dir), list[Path]()
        if not found:
            raise FinetuneError(f"train.resume=latest: no checkpoint in {Path(output_dir) / CHECKPOINTS}; "
                                "drop train.resume to start fresh")
        for path in reversed(found):
            problem = checkpoint_problem(path)
            if problem is None:
                return path, damaged
            log.warning("warning: cannot resume from %s: %s; trying the one before", path, problem)
            damaged.append(path)
        raise FinetuneError(f"train.resume=latest: none of the {len(found)} checkpoints in "
                            f"{Path(output_dir) / CHECKPOINTS} is usable (the newest: "
                            f"{checkpoint_problem(found[-1])}); start afresh with train.overwrite=true and no "
                            "train.resume, or choose another output_dir")
    path = Path(resume)
    if not (path / PROGRESS).is_file() and not STEP_FOLDER.fullmatch(path.name):
        raise FinetuneError(f"train.resume: {resume} is not a checkpoint folder (no {PROGRESS}); use latest or "
                            f"a folder under {Path(output_dir) / CHECKPOINTS}")
    problem = checkpoint_problem(path)
    if problem:
        raise FinetuneError(f"train.resume: cannot resume from {path}: {problem}; name an intact checkpoint, or "
                            "pass train.resume=latest to take the newest intact one")
    return path, []


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
