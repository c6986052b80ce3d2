"""What `finetune eval RUN_OR_LORA --checkpoints ...` evaluates: each checkpoint's export in a run folder (and the
final export, when no checkpoint holds its step), or one LoRA file."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from safetensors import SafetensorError

from ..console import brief
from ..errors import FinetuneError
from ..export.diffusers_format import WEIGHT_NAME, finetune_metadata
from ..training.checkpoint import PROGRESS, checkpoint_dirs


@dataclasses.dataclass(frozen=True)
class Target:
    name: str     # step-000400, as the checkpoint folder is named
    step: int     # training step (0 if the file does not say)
    path: Path    # the diffusers LoRA file
    header: dict  # its finetune.* metadata (base_model, trigger, family, resolution, ...)


def read_target(path: Path, step: int | None = None, name: str | None = None) -> Target:
    try:
        header = finetune_metadata(path)
    except (OSError, ValueError, SafetensorError) as exc:
        raise FinetuneError(f"{path}: not a readable LoRA file ({brief(exc, 200)})") from None
    if step is None:
        step = int(header["steps"]) if str(header.get("steps", "")).isdigit() else 0
    return Target(name or f"step-{step:06d}", step, path, header)


def run_targets(run: Path) -> list[Target]:
    """Every finished checkpoint with an export, oldest first, and the final export if its step is new."""
    found = [read_target(folder / WEIGHT_NAME, json.loads((folder / PROGRESS).read_text())["step"], folder.name)
             for folder in checkpoint_dirs(run) if (folder / WEIGHT_NAME).is_file()]
    if (run / WEIGHT_NAME).is_file():
        final = read_target(run / WEIGHT_NAME)
        if final.step not in {t.step for t in found}:
            found.append(final)
    return sorted(found, key=lambda t: t.step)


def find_targets(source: str | Path, which: str = "all") -> list[Target]:
    """The LoRA files `which` names ('all', 'latest' or 'step-N,step-M'; N may be written without zeros)."""
    path = Path(source).expanduser()
    if path.is_file():
        found = [read_target(path)]
    elif path.is_dir():
        found = run_targets(path)
        if not found:
            raise FinetuneError(f"{source}: no LoRA here (no checkpoints/step-N/{WEIGHT_NAME}, no {WEIGHT_NAME}); "
                                "pass the output_dir of finetune train or a LoRA file")
    else:
        raise FinetuneError(f"{source}: no such run folder or LoRA file")
    if which == "all":
        return found
    if which == "latest":
        return found[-1:]
    by_step = {t.step: t for t in found}
    chosen = []
    for item in (part.strip() for part in which.split(",") if part.strip()):
        digits = item.removeprefix("step-")
        if not digits.isdigit() or int(digits) not in by_step:
            raise FinetuneError(f"--checkpoints: {item!r} is not among {source}'s checkpoints "
                                f"({', '.join(t.name for t in found)}); use all, latest or step-N,...")
        chosen.append(by_step[int(digits)])
    if not chosen:
        raise FinetuneError("--checkpoints: name at least one, e.g. --checkpoints step-400,step-800")
    return sorted({t.step: t for t in chosen}.values(), key=lambda t: t.step)
