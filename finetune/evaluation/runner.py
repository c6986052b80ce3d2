"""`finetune eval`: draw the prompt set with fixed seeds for the base model and each checkpoint, score the images,
and write the table, the plot, the contact sheets and the best checkpoint.

Everything a mistake could stop is checked before a model loads (output folder, prompts, subject phrase, sampler,
photos); then the embedding models, the photos' embeddings and the pipeline are made once, and each checkpoint's
LoRA is loaded into the one pipeline, drawn in batches, scored and unloaded.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from ..console import plural
from ..data.dataset import instance_examples
from ..errors import FinetuneError
from ..inference import SCHEDULERS, device_and_dtype, generate, load_loras, set_scheduler
from ..models import load_pipeline
from ..pnginfo import ImageParams, LoraUse, model_reference, save_png
from ..training.run_dir import check_writable
from .embedders import load_clip, load_dino
from .plot import plot_metrics
from .prompts import PromptPair, Subject, class_prompt, find_subject, prompt_pair, prompt_templates
from .report import legend, table, write_tables
from .scoring import Embedded, SubjectScorer
from .selection import choose_checkpoint
from .sheets import contact_sheet
from .targets import Target

log = logging.getLogger("finetune")
EVAL_DIR = "eval"


def pipeline_class_for(family: str | None):
    """The pipeline a LoRA of `family` (its finetune.family header) draws with. One place to point at a shared
    family-to-pipeline resolver once `finetune generate` has one."""
    return StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline


def default_output(source: str | Path) -> Path:
    """RUN/eval for a run folder; NAME-eval beside a LoRA file."""
    source = Path(source)
    return source / EVAL_DIR if source.is_dir() else source.with_name(f"{source.stem}-{EVAL_DIR}")


@dataclasses.dataclass
class Plan:
    """What every checkpoint draws, settled before any model loads."""
    subject: Subject
    pairs: list[PromptPair]
    prompt_source: str
    class_prompt: str
    seeds: list[int]
    resolution: int | None


def plan_evaluation(cfg, header: dict) -> Plan:
    ev = cfg.eval
    if ev.scheduler != "default" and ev.scheduler not in SCHEDULERS:
        raise FinetuneError(f"eval.scheduler: {ev.scheduler!r} is unknown; choose default or one of "
                            f"{', '.join(SCHEDULERS)}")
    trigger = header.get("trigger") or cfg.data.trigger or cfg.data.instance_prompt
    subject = find_subject(ev.subject, trigger, ev.class_noun)
    templates, source = prompt_templates(ev)
    pairs = [prompt_pair(t, subject, f"{source} prompt {i + 1}" if source.endswith("file") else f"{source}[{i}]")
             for i, t in enumerate(templates)]
    resolution = ev.resolution or (int(header["resolution"]) if str(header.get("resolution", "")).isdigit() else None)
    return Plan(subject, pairs, source, class_prompt(ev.class_prompt, subject),
                [ev.seed + k for k in range(ev.num_images)], resolution)


def check_output(out: Path, overwrite: bool) -> None:
    if (out / "metrics.json").exists() and not overwrite:
        raise FinetuneError(f"{out} holds an earlier evaluation (metrics.json); pass --overwrite to replace it, or "
                            "--out another folder")
    check_writable(out, "--out")


class Drawer:
    """The prompt set and the class prompt, drawn in batches with the same seeds for every checkpoint."""

    def __init__(self, pipe, cfg, plan: Plan):
        self.pipe, self.ev, self.plan, self.model = pipe, cfg.eval, plan, cfg.model.pretrained
        self.images, self.seconds = 0, 0.0  # drawn so far, and the time spent drawing them: the summary's speed
        self.size = (0, 0)  # the images' (width, height), known once drawn

    def draw(self) -> tuple[list, list]:
        ev, plan = self.ev, self.plan
        start = time.perf_counter()
        common = dict(steps=ev.steps, guidance=ev.guidance, resolution=plan.resolution, batch_size=ev.batch_size,
                      progress=False)
        subject = generate(self.pipe, [p.prompt for p in plan.pairs], ev.num_images, ev.seed, **common)
        drift = generate(self.pipe, [plan.class_prompt], ev.num_class_images, ev.seed, **common)
        self.seconds += time.perf_counter() - start
        self.images += len(subject) + len(drift)
        self.size = subject[0].size
        return subject, drift


def score_target(target: Target | None, drawer: Drawer, scorer: SubjectScorer, plan: Plan, out: Path,
                 base_class: Embedded | None) -> tuple[dict, Embedded]:
    """Draw, score and write the contact sheet of the pipeline as it is now: the base model (`target` None) or
    with the target's LoRA at scale 1."""
    name, step = (target.name, target.step) if target is not None else ("base", 0)
    images, class_images = drawer.draw()
    drawn, drawn_class = scorer.embed(images), scorer.embed(class_images)
    texts = [p.text for p in plan.pairs for _ in plan.seeds]
    row = {"checkpoint": name, "step": step, **scorer.subject_scores(drawn, texts),
           **scorer.drift_scores(drawn_class, drawn_class if base_class is None else base_class)}
    lora = f"step {step}, LoRA x1" if target is not None else "base model, no LoRA"
    title = f"{name} ({lora}): {plural(len(plan.pairs), 'prompt')} x {plural(len(plan.seeds), 'seed')}"
    sheet = contact_sheet(images, [p.prompt for p in plan.pairs], plan.seeds, title)
    params = drawn_params(drawer, plan, images[0].size, target)
    cells = [{"prompt": pair.prompt, "seed": seed} for pair in plan.pairs for seed in plan.seeds]
    save_png(sheet, out / "sheets" / f"{name}.png", params, cells)
    log.info("%s: DINO %.4f  CLIP-I %.4f  CLIP-T %.4f", name, row["dino"], row["clip_i"], row["clip_t"])
    return row, drawn_class


def drawn_params(drawer: Drawer, plan: Plan, size: tuple[int, int], target: Target | None) -> ImageParams:
    """The parameters of a sheet's first image (A1111 stores a grid's first image's), for its PNG."""
    ev = drawer.ev
    loras = [LoraUse(str(Path(target.path).resolve()), 1.0)] if target is not None else []
    return ImageParams(prompt=plan.pairs[0].prompt, seed=plan.seeds[0], steps=ev.steps, guidance=ev.guidance,
                       scheduler=ev.scheduler, width=size[0], height=size[1], model=model_reference(drawer.model),
                       loras=loras, step=target.step if target is not None else None)


def evaluate(cfg, targets: list[Target], out: str | Path, device: str | None = None, overwrite: bool = False
             ) -> tuple[dict, str]:
    """Evaluate the base model and each target; returns (the report written to out/metrics.json, the text to
    print)."""
    started, out, header = time.perf_counter(), Path(out), targets[-1].header
    check_output(out, overwrite)
    plan = plan_evaluation(cfg, header)
    photos = [example.open() for example in instance_examples(cfg.data)]
    device, dtype = device_and_dtype(device)
    scorer = SubjectScorer(load_dino(cfg.eval.dino_model, device, dtype), load_clip(cfg.eval.clip_model, device, dtype),
                           photos)  # the photos' embeddings: once
    pipe = load_pipeline(cfg.model, pipeline_class_for(header.get("family")), dtype=dtype)
    set_scheduler(pipe, cfg.eval.scheduler, "eval.scheduler")
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    (out / "sheets").mkdir(parents=True, exist_ok=True)
    drawer = Drawer(pipe, cfg, plan)
    base, base_class = score_target(None, drawer, scorer, plan, out, None)
    rows = [base]
    for target in targets:
        load_loras(pipe, [(str(target.path), 1.0)])
        rows.append(score_target(target, drawer, scorer, plan, out, base_class)[0])
        pipe.unload_lora_weights()
    verdict = choose_checkpoint(base, rows[1:], cfg.eval.max_clip_t_drop)
    speed = {"images": drawer.images, "generation_seconds": round(drawer.seconds, 2),
             "images_per_second": round(drawer.images / max(drawer.seconds, 1e-9), 3),
             "total_seconds": round(time.perf_counter() - started, 2), "device": str(device)}
    report = {"protocol": protocol(cfg, plan, header, len(photos)), "rows": rows,
              "best": {"checkpoint": verdict.best, "rule": verdict.rule}, "warnings": verdict.warnings,
              "speed": speed}
    floor = base["clip_t"] - cfg.eval.max_clip_t_drop
    best_step = next(row["step"] for row in rows if row["checkpoint"] == verdict.best)
    title = f"finetune eval: {header.get('title') or targets[-1].path.stem}"
    # The plot holds the settings of what it scores: the base sheet's parameters, and the whole protocol.
    save_png(plot_metrics(rows, title, floor, best_step), out / "metrics.png",
             drawn_params(drawer, plan, drawer.size, None), extra={"protocol": report["protocol"]})
    write_tables(out, report)
    return report, summary_text(report, out)


def protocol(cfg, plan: Plan, header: dict, num_photos: int) -> dict:
    ev = cfg.eval
    return {"base_model": cfg.model.pretrained, "family": header.get("family", "sd1"),
            "dino_model": ev.dino_model, "clip_model": ev.clip_model, "subject": plan.subject.phrase,
            "class_noun": plan.subject.class_noun, "prompt_source": plan.prompt_source,
            "prompts": [p.prompt for p in plan.pairs], "clip_t_texts": [p.text for p in plan.pairs],
            "class_prompt": plan.class_prompt, "seeds": plan.seeds, "num_class_images": ev.num_class_images,
            "steps": ev.steps, "guidance": ev.guidance, "scheduler": ev.scheduler, "resolution": plan.resolution,
            "photos": num_photos, "max_clip_t_drop": ev.max_clip_t_drop}


def summary_text(report: dict, out: Path) -> str:
    speed, best = report["speed"], report["best"]
    lines = [table(report["rows"], best["checkpoint"]), "", legend(), "",
             f"best: {best['checkpoint']} ({best['rule']})"]
    lines += [f"warning: {w}" for w in report["warnings"]]
    lines += [f"generated {speed['images']} images in {speed['generation_seconds']} s "
              f"({speed['images_per_second']} images/s on {speed['device']}); {speed['total_seconds']} s in all",
              f"wrote {out / 'metrics.json'}, metrics.csv, metrics.png and sheets/"]
    return "\n".join(lines)
