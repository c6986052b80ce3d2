"""The output folder of a run: apart from the photo folders, free of files finetune did not write, used by one run
at a time, and never silently reused.

Checking and claiming are two steps. `check_output_dir` (with the other checks of preflight.validate_run) reads
and writes nothing; `claim_output_dir` runs only once every input is known good: it takes the folder's lock,
removes what interrupted saves left, moves damaged checkpoints aside and, with train.overwrite=true, deletes the
earlier run's checkpoints. A folder holding an earlier run is continued only with `train.resume=` and replaced
only with `train.overwrite=true`.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from ..errors import FinetuneError
from ..export.diffusers_format import WEIGHT_NAME, read_header
from ..export.publish import kohya_file_name
from ..run_files import NO_EMA_WEIGHT_NAME
from .checkpoint import checkpoint_dirs, clean_partial_saves, step_folders
from .run_lock import acquire_run_lock, lock_holder

log = logging.getLogger("finetune")
SUMMARY, MODEL_CARD = "train_summary.json", "README.md"


def check_writable(folder: Path, key: str) -> None:
    """Create `folder` and write a probe file there; a one-line error naming `key` if that fails."""
    probe = folder / f".write-test-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise FinetuneError(f"{key}: cannot write to {folder} ({exc.strerror or exc}); choose a folder you can "
                            "write to") from None


def check_could_write(folder: Path, key: str) -> None:
    """check_writable without writing: the nearest existing folder on the way must be a folder we may write."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise FinetuneError(f"{key}: cannot write to {folder} (Not a directory); choose a folder you can write to")
    if not os.access(existing, os.W_OK | os.X_OK):
        reason = "Read-only file system" if _read_only(existing) else "Permission denied"
        raise FinetuneError(f"{key}: cannot write to {folder} ({reason}); choose a folder you can write to")


def _read_only(folder: Path) -> bool:
    return bool(os.statvfs(folder).f_flag & os.ST_RDONLY) if hasattr(os, "statvfs") else False


def check_folders_apart(folders: dict[str, str | None]) -> None:
    """No two of the run's folders (key -> path) may be the same folder or one inside the other: class images
    would be trained as the subject (or the subject as class images), and an export or model card would land
    among the photos. Paths are compared resolved, so a symbolic link to the same folder counts as the same."""
    named = [(key, Path(path).expanduser().resolve()) for key, path in folders.items() if path]
    for i, (key_a, a) in enumerate(named):
        for key_b, b in named[i + 1:]:
            if a == b:
                raise FinetuneError(f"{key_a} and {key_b} are the same folder ({a}); give each its own folder")
            for inner, outer, inner_path, outer_path in ((key_a, key_b, a, b), (key_b, key_a, b, a)):
                if inner_path.is_relative_to(outer_path):
                    raise FinetuneError(f"{inner} ({folders[inner]}) is inside {outer} ({folders[outer]}); "
                                        "finetune would mix their files: give each its own folder, side by side")


def written_by_finetune(path: Path) -> bool:
    """A .safetensors file whose header carries finetune.* entries (every LoRA file finetune exports does)."""
    try:
        return any(key.startswith("finetune.") for key in read_header(path))
    except Exception:  # noqa: BLE001 - not a readable safetensors file: certainly not one of ours
        return False


def is_finetune_run(root: Path) -> bool:
    """Whether `root` holds a finetune run: finished checkpoints, or an export with finetune's header."""
    return bool(checkpoint_dirs(root)) or ((root / WEIGHT_NAME).is_file() and written_by_finetune(root / WEIGHT_NAME))


def foreign_file(root: Path, export, ema: bool = False) -> str | None:
    """The first file in `root` that the run would replace but finetune did not write, or None.

    The LoRA files are ours when their header says so; the model card and run summary are ours when the folder
    holds a finetune run (they are written beside its export)."""
    weights = [WEIGHT_NAME] + ([kohya_file_name(root)] if export.kohya else []) + ([NO_EMA_WEIGHT_NAME] if ema else [])
    for name in weights:
        if (root / name).exists() and not written_by_finetune(root / name):
            return name
    if is_finetune_run(root):
        return None
    for name in [SUMMARY] + ([MODEL_CARD] if export.model_card else []):
        if (root / name).exists():
            return name
    return None


def check_output_dir(cfg, resuming: bool, main_process: bool = True) -> list[Path]:
    """Every check of output_dir, writing nothing; returns the earlier run's step folders there (what
    train.overwrite=true deletes)."""
    root = Path(cfg.output_dir)
    check_could_write(root, "output_dir")
    holder = lock_holder(root) if main_process else None
    if holder:
        raise FinetuneError(f"output_dir {root} is in use by another finetune run ({holder}); wait for it to end "
                            "or choose another output_dir")
    if not root.is_dir():
        return []
    foreign = foreign_file(root, cfg.export, bool(cfg.train.ema_decay))
    if foreign:
        raise FinetuneError(f"output_dir {root} holds {foreign}, which finetune did not write and would replace; "
                            "choose a new or empty output_dir, or move the file away")
    earlier, export = checkpoint_dirs(root), root / WEIGHT_NAME
    if (earlier or export.is_file()) and not resuming and not cfg.train.overwrite:
        what = "checkpoints of an earlier run" if earlier else f"a finished run's export ({WEIGHT_NAME})"
        raise FinetuneError(f"output_dir {root} holds {what}; pass train.resume=latest to continue it, "
                            "train.overwrite=true to replace it, or choose another output_dir")
    return step_folders(root)


def claim_output_dir(output_dir: str | Path, earlier: list[Path], damaged: list[Path], overwrite: bool,
                     main_process: bool = True) -> None:
    """The run's first writes, after every check passed: create the folder, take its lock (main process), remove
    what interrupted saves left, move damaged checkpoints aside, and with `overwrite` delete the earlier run's
    checkpoints (only the step folders finetune wrote; the export is replaced at the end)."""
    root = Path(output_dir)
    check_writable(root, "output_dir")
    if not main_process:
        return
    acquire_run_lock(root)
    for path in clean_partial_saves(root):
        log.info("removed %s, left by an interrupted save", path)
    for path in damaged:
        aside = path.with_name(path.name + ".damaged")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(path, aside)
        log.warning("warning: moved the damaged checkpoint %s aside to %s", path, aside.name)
    if overwrite and earlier:
        log.warning("train.overwrite=true: deleting the checkpoints of the earlier run in %s", root / "checkpoints")
        for path in earlier:
            shutil.rmtree(path)
