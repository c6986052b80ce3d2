"""The output folder of a run: writable, free of half-written saves, and never silently reused.

A folder holding an earlier run (its checkpoints or its finished export) is continued only with `train.resume=`
and replaced only with `train.overwrite=true`; otherwise the run stops before writing anything.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from ..errors import FinetuneError
from ..export.diffusers_format import WEIGHT_NAME
from .checkpoint import CHECKPOINTS, checkpoint_dirs, clean_partial_saves, find_checkpoint

log = logging.getLogger("finetune")


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


def prepare_output_dir(output_dir: str | Path, resume: str | None, overwrite: bool,
                       main_process: bool = True) -> Path | None:
    """The checkpoint to resume from (None: start fresh), after checking the folder may be used for this run."""
    root = Path(output_dir)
    check_writable(root, "output_dir")
    if main_process:
        for path in clean_partial_saves(root):
            log.info("removed %s, left by an interrupted save", path)
    resume_from = find_checkpoint(root, resume)
    if resume_from is not None:
        return resume_from
    earlier, export = checkpoint_dirs(root), root / WEIGHT_NAME
    if (earlier or export.is_file()) and not overwrite:
        what = "checkpoints of an earlier run" if earlier else f"a finished run's export ({WEIGHT_NAME})"
        raise FinetuneError(f"output_dir {root} holds {what}; pass train.resume=latest to continue it, "
                            "train.overwrite=true to replace it, or choose another output_dir")
    if overwrite and earlier and main_process:
        log.warning("train.overwrite=true: deleting the checkpoints of the earlier run in %s", root / CHECKPOINTS)
        shutil.rmtree(root / CHECKPOINTS)
    return None
