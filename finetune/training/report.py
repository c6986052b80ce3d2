"""What the end of a run says: what the training phase did, then where each file is and how to load the LoRA."""
from __future__ import annotations

import logging
from pathlib import Path

from ..console import plural, seconds
from ..export.diffusers_format import WEIGHT_NAME
from ..run_files import BEFORE_AFTER, SAMPLES

log = logging.getLogger("finetune")
CARD = "README.md"


def steps_done(start: int, summary: dict, recording_seconds: float = 0.0) -> str:
    """What the training phase did: the steps this run took and the speed after warm-up (none for a run resumed
    at its last step, which had nothing left to do), and the time its first step spent recording CUDA graphs."""
    done, total = summary["steps_this_run"], summary["steps"]
    if not done:
        return (f"nothing to do, the checkpoint is at step {total} = train.max_steps (raise train.max_steps to "
                "train further)")
    rate = summary.get("steady_it_per_s")
    return (f"{plural(done, 'step')} ({start + 1} to {total})" + (f", {rate:g} it/s after warm-up" if rate else "")
            + (f"; {seconds(recording_seconds)} of it recording the U-Net as CUDA graphs" if recording_seconds else ""))


def finished_run_lines(output_dir: str | Path, written: list[Path], checkpoint: Path, summary: dict,
                       skipped: int, photos: str) -> list[str]:
    """Where each file of a finished run is, and the two lines that load its LoRA: in diffusers and in a UI.
    `written`: the files this run's end wrote (exports, model card, the base-vs-LoRA grid)."""
    root = Path(output_dir)
    kohya = next((p for p in written if p.suffix == ".safetensors" and p.name != WEIGHT_NAME), None)
    files = [(root / WEIGHT_NAME, "the LoRA, diffusers format")]
    if kohya is not None:
        files.append((kohya, "the LoRA, kohya format (AUTOMATIC1111, Forge, ComfyUI)"))
    if any(p.name == CARD for p in written):
        files.append((root / CARD, "model card"))
    if root / SAMPLES / BEFORE_AFTER in written:
        files.append((root / SAMPLES / BEFORE_AFTER, "base vs LoRA, same seeds (labelled)"))
    files += [(checkpoint, "resumable state: train.resume=latest with a higher train.max_steps trains further"),
              (root / "train_summary.json", "speed, memory and optimizer state"),
              (root / "logs", f"TensorBoard: tensorboard --logdir {root / 'logs'}")]
    width = max(len(str(path)) for path, _ in files)
    this_run = summary["steps_this_run"]
    resumed = f" ({this_run} this run)" if this_run != summary["steps"] else ""
    lines = [f"done: {plural(summary['steps'], 'step')}{resumed}, {skipped} skipped (NaN/Inf); {photos}",
             *[f"  {str(path):{width}s}  {what}" for path, what in files],
             "load the LoRA:",
             f'  diffusers: pipe.load_lora_weights("{root}")']
    name = kohya.stem if kohya is not None else root.resolve().name
    if kohya is not None:
        lines.append(f"  A1111/Forge: copy {kohya} to models/Lora/ and add <lora:{name}:1> to the prompt "
                     "(ComfyUI: models/loras/, a LoraLoader node)")
    else:
        lines.append(f"  A1111/Forge/ComfyUI: finetune export {root} --format kohya --out {name}.safetensors, copy it "
                     f"to models/Lora/ and add <lora:{name}:1> to the prompt")
    return lines


def log_finished_run(*args, **kwargs) -> None:
    for line in finished_run_lines(*args, **kwargs):
        log.info("%s", line)
