"""The end of a run, after the diffusers file: the kohya file, the model card, and the Hub upload if asked."""
from __future__ import annotations

import logging
from pathlib import Path

from ..config import ExportConfig
from ..family import Family
from ..run_files import BEFORE_AFTER, SAMPLES
from .adapters import kohya_note
from .convert import export_kohya
from .diffusers_format import WEIGHT_NAME
from .hub import push_to_hub
from .lora_weights import weights_from_models
from .model_card import write_model_card

log = logging.getLogger("finetune")


def kohya_file_name(output_dir: str | Path) -> str:
    """The UIs show the file name as the LoRA's name (<lora:NAME:1>): name it after the run."""
    return f"{Path(output_dir).resolve().name}.safetensors"


def sample_grid(output_dir: Path) -> str | None:
    """The validation grid to show, relative to output_dir: the base-vs-LoRA grid of the run's end, else the
    newest grid drawn while training (samples/step-N.png); None for a run without validation prompts."""
    final = output_dir / SAMPLES / BEFORE_AFTER
    grids = [final] if final.is_file() else sorted((output_dir / SAMPLES).glob("step-*.png"))
    return grids[-1].relative_to(output_dir).as_posix() if grids else None


def publish(output_dir: str | Path, export: ExportConfig, models: dict, info: dict) -> list[Path]:
    """Write what `export` asks for beside output_dir's diffusers file; return every file written."""
    output_dir = Path(output_dir)
    written, kohya_file = [output_dir / WEIGHT_NAME], None
    if export.kohya:
        kohya_file = kohya_file_name(output_dir)
        weights = weights_from_models(models, Family.from_name(info["family"]))
        written.append(export_kohya(weights, output_dir / kohya_file, info, export.kohya_precision))
        log.info("%s", kohya_note(weights.kind, written[-1]) or f"exported {written[-1]} (kohya format)")
    if export.model_card:
        written.append(write_model_card(output_dir, info, export.license, kohya_file, sample_grid(output_dir)))
    if export.push_to_hub:
        grid = sample_grid(output_dir)
        files = [p.name for p in written] + ([grid] if grid else [])
        log.info("uploaded to %s", push_to_hub(export.push_to_hub, output_dir, files))
    return written
