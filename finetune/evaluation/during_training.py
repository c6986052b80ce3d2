"""validation.metrics: the evaluation's scores of each validation grid, logged to TensorBoard beside it.

A validation prompt that names the subject phrase ("a photo of sks dog in snow") counts toward DINO, CLIP-I and
CLIP-T; one that does not ("a photo of a dog") is a class prompt and measures prior drift, against the photos and
against the base model's image with the same seed. The models load and the photos are embedded once per run.
"""
from __future__ import annotations

import torch

from ..inference import device_and_dtype
from .embedders import load_clip, load_dino
from .prompts import Subject, find_subject, prompt_pair
from .scoring import Embedded, SubjectScorer

TAG = "eval/"  # TensorBoard scalars: eval/dino, eval/clip_i, eval/clip_t, eval/class_dino, ...


class ValidationScorer:
    def __init__(self, scorer: SubjectScorer, subject: Subject, prompts: list[str], num_images: int):
        self.scorer = scorer
        names = [subject.phrase in prompt for prompt in prompts for _ in range(num_images)]
        self.subject_rows = [i for i, named in enumerate(names) if named]
        self.class_rows = [i for i, named in enumerate(names) if not named]
        self.texts = [prompt_pair(p, subject, "validation.prompts").text for p in prompts if subject.phrase in p
                      for _ in range(num_images)]

    def embed(self, images: list) -> Embedded:
        return self.scorer.embed(images)

    def scores(self, drawn: Embedded, base: Embedded) -> dict[str, float]:
        """{'eval/dino': ..., ...} of one grid (images in the validator's order: prompt by prompt, seed by seed)."""
        out = {}
        if self.subject_rows:
            out.update(self.scorer.subject_scores(rows_of(drawn, self.subject_rows), self.texts))
        if self.class_rows:
            out.update(self.scorer.drift_scores(rows_of(drawn, self.class_rows), rows_of(base, self.class_rows)))
        return {TAG + key: value for key, value in out.items()}


def rows_of(embedded: Embedded, rows: list[int]) -> Embedded:
    index = torch.tensor(rows)
    return Embedded(embedded.dino[index], embedded.clip[index])


def validation_scorer(cfg, photos: list, accelerator) -> ValidationScorer | None:
    """The scorer for a run with validation.metrics (on the main process, which draws the grids), else None.
    `photos` are the run's instance examples."""
    if not (cfg.validation.metrics and cfg.validation.prompts and accelerator.is_main_process):
        return None
    subject = find_subject(cfg.eval.subject, cfg.data.trigger or cfg.data.instance_prompt, cfg.eval.class_noun)
    device, dtype = device_and_dtype(str(accelerator.device))
    scorer = SubjectScorer(load_dino(cfg.eval.dino_model, device, dtype), load_clip(cfg.eval.clip_model, device, dtype),
                           [photo.open() for photo in photos])
    return ValidationScorer(scorer, subject, cfg.validation.prompts, cfg.validation.num_images)
