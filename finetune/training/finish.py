"""A run's exports: the diffusers file of each checkpoint, and the end of a run (final checkpoint, the diffusers
file, the run summary, the base-vs-LoRA grid, then the kohya file, model card and Hub upload as export.* asks)."""
from __future__ import annotations

import logging
from pathlib import Path

from ..console import plural
from ..export.adapters import diffusers_note
from ..export.diffusers_format import WEIGHT_NAME, save_diffusers_lora
from ..export.embeddings import TokenEmbeddings, save_embeddings
from ..export.metadata import tag_frequency
from ..export.publish import publish
from ..family import family_of_pipeline
from ..run_files import NO_EMA_WEIGHT_NAME
from .distributed import check_replicas_agree
from .pivotal import PivotalTuning, pivotal_word
from .report import log_finished_run
from .run_dir import written_by_finetune
from .run_lock import release_run_lock
from .summary import write_summary

log = logging.getLogger("finetune")


def export_info(cfg, pipe, run, steps: int, recipe: str) -> dict:
    """What the exported files say about how they were made (finetune.* header, kohya ss_* keys, model card)."""
    prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
    seen = steps * cfg.train.batch_size * cfg.train.gradient_accumulation
    instance = run.instance
    info = {"base_model": cfg.model.pretrained, "family": family_of_pipeline(pipe).name,
            "type": cfg.lora.type, "rank": cfg.lora.rank, "alpha": cfg.lora.alpha,
            "unet_targets": cfg.lora.unet_targets, "text_encoder": cfg.lora.text_encoder, "steps": steps,
            "trigger": cfg.data.trigger or cfg.data.instance_prompt, "resolution": cfg.train.resolution,
            "prediction_type": prediction, "recipe": recipe,
            "learning_rate": cfg.train.learning_rate, "batch_size": cfg.train.batch_size,
            "epochs": max(1, -(-seen // (len(instance) * cfg.data.repeats))), "num_train_images": len(instance),
            "num_class_images": cfg.prior.num_class_images, "seed": cfg.train.seed,
            "title": Path(cfg.output_dir).resolve().name, "tag_frequency": tag_frequency([e.prompt for e in instance])}
    if cfg.train.ema_decay:
        info["ema_decay"] = cfg.train.ema_decay
    if run.photos.buckets:
        info["buckets"] = sorted({f"{w}x{h}" for w, h in run.photos.buckets})
    if cfg.lora.pivotal:
        info.update(pivotal_word=pivotal_word(cfg), pivotal_tokens=cfg.lora.pivotal_tokens)
    return info


class RunExporter:
    """Writes a run's LoRA in diffusers format (a checkpoint's, or the final one) with the run's metadata."""

    def __init__(self, cfg, pipe, pipeline_class, lora_models: dict, run, recipe: str, ema,
                 pivotal: PivotalTuning | None = None):
        self.cfg, self.pipe, self.pipeline_class, self.lora_models = cfg, pipe, pipeline_class, lora_models
        self.run, self.recipe, self.ema = run, recipe, ema  # ema: finetune.training.ema's LoraEMA or NoEMA
        self.pivotal = pivotal

    def info(self, steps: int) -> dict:
        return export_info(self.cfg, self.pipe, self.run, steps, self.recipe)

    def write(self, folder: Path, steps: int) -> Path:
        """The diffusers file; with train.ema_decay it holds the EMA, and the trained weights go beside it
        (NO_EMA_WEIGHT_NAME), each file's header saying which it is (finetune.weights)."""
        encoders = {name: model for name, model in self.lora_models.items() if name != "unet"}
        if self.pivotal:  # beside the LoRA, so a checkpoint holds the rows to resume from
            save_embeddings(folder, self.pivotal.embeddings(), {"steps": steps,
                                                                 "base_model": self.cfg.model.pretrained})
        unet, info = self.lora_models["unet"], self.info(steps)
        if not self.ema.enabled:
            stale = Path(folder) / NO_EMA_WEIGHT_NAME  # an earlier run's with EMA would pass for this one's
            if stale.is_file() and written_by_finetune(stale):
                stale.unlink()
            return save_diffusers_lora(folder, self.pipeline_class, unet, encoders, info)
        save_diffusers_lora(folder, self.pipeline_class, unet, encoders, {**info, "weights": "trained (no EMA)"},
                            NO_EMA_WEIGHT_NAME)
        with self.ema.applied():
            return save_diffusers_lora(folder, self.pipeline_class, unet, encoders, {**info, "weights": "EMA"})

    def embeddings(self) -> TokenEmbeddings | None:
        return self.pivotal.embeddings() if self.pivotal else None


def finish_run(cfg, run, exporter: RunExporter, checkpointer, validator, summary: dict, skipped: int) -> Path:
    """The end of a run: every process's LoRA checked equal, a final checkpoint to resume or extend from, then
    (main process) the diffusers file, train_summary.json, the base-vs-LoRA grid, the kohya file, model card and
    upload. Returns the diffusers file."""
    accelerator, steps, output_dir = run.accelerator, cfg.train.max_steps, Path(cfg.output_dir)
    check_replicas_agree(accelerator, *exporter.lora_models.values())
    final, written, grid = output_dir / WEIGHT_NAME, [], None
    with run.phases("export") as export:
        checkpoint = checkpointer.save(steps)
        if accelerator.is_main_process:
            final = exporter.write(output_dir, steps)
            note = diffusers_note(cfg.lora.type, final, cfg.export.kohya)
            if note:
                log.info("notice: %s", note)
        with exporter.ema.applied():  # train.ema_decay: the grid and the kohya file show the EMA
            grid = validator.before_after(steps)  # before the model card, which shows it
            if accelerator.is_main_process:
                written = publish(output_dir, cfg.export, exporter.lora_models, exporter.info(steps),
                                  exporter.embeddings())
                export.add(f"{plural(len(written) + (grid is not None), 'file')} written")
    if accelerator.is_main_process:
        write_summary(output_dir, {**summary, **run.phases.summary()})
        log_finished_run(output_dir, written + ([grid] if grid else []), checkpoint, summary, skipped,
                         run.photos.summary())
    accelerator.end_training()
    if accelerator.is_main_process:
        release_run_lock(output_dir)  # the folder is free for the next run (a crashed run's lock dies with it)
    return final
