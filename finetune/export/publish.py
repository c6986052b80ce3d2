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
from .embeddings import EMBEDDINGS_NAME, UI_FOLDER, TokenEmbeddings
from .hub import push_to_hub
from .license import model_card_license
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


def publish(output_dir: str | Path, export: ExportConfig, models: dict, info: dict,
            embeddings: TokenEmbeddings | None = None) -> list[Path]:
    """Write what `export` asks for beside output_dir's diffusers file (and lora.pivotal's embeddings files,
    already written); return every file written. The kohya file bundles the embeddings."""
    output_dir = Path(output_dir)
    written, kohya_file = [output_dir / WEIGHT_NAME], None
    if embeddings is not None:
        written += [output_dir / EMBEDDINGS_NAME, output_dir / UI_FOLDER / f"{embeddings.word}.safetensors"]
    if export.kohya:
        kohya_file = kohya_file_name(output_dir)
        bundled = embeddings if export.bundle_embeddings else None
        weights = weights_from_models(models, Family.from_name(info["family"]))
        written.append(export_kohya(weights, output_dir / kohya_file, info, export.kohya_precision, bundled))
        note = kohya_note(weights.kind, written[-1])
        if note:
            log.info("notice: %s", note)
        if bundled is not None:
            log.info("notice: %s bundles the %r embeddings (A1111 and ComfyUI read them; diffusers' "
                     "load_lora_weights refuses the file: there, load %s and %s, or set "
                     "export.bundle_embeddings=false)", kohya_file, bundled.word, WEIGHT_NAME, EMBEDDINGS_NAME)
    if export.model_card:
        license = model_card_license(export.license, str(info.get("base_model", "")))
        written.append(write_model_card(output_dir, info, license, kohya_file, sample_grid(output_dir)))
    if export.push_to_hub:
        grid = sample_grid(output_dir)
        files = [p.name for p in written] + ([grid] if grid else [])
        log.info("uploaded to %s", push_to_hub(export.push_to_hub, output_dir, files))
    return written
