"""Scores of one set of generated images against the subject's photos: the metrics of a checkpoint.

The photos' embeddings are computed once per scorer, and each CLIP-T text once, however many checkpoints follow.
"""
from __future__ import annotations

import dataclasses

import torch
from PIL import Image

from .embedders import ClipEmbedder, DinoEmbedder
from .metrics import mean_paired_cosine, mean_pairwise_cosine

# name -> what it measures; the table, the CSV and the plot follow this order.
METRICS = {
    "dino": "subject fidelity: DINO, generated vs the subject's photos (mean over all pairs)",
    "clip_i": "subject fidelity: CLIP image embeddings, generated vs the subject's photos",
    "clip_t": "prompt fidelity: CLIP, each image vs its prompt with the class noun for the identifier",
    "class_dino": "prior drift: class-prompt images vs the subject's photos, DINO (rises as the class turns "
                  "into the subject)",
    "class_clip_i": "prior drift: class-prompt images vs the subject's photos, CLIP",
    "class_dino_base": "prior drift: class-prompt images vs the base model's with the same seeds, DINO (1 = "
                       "unchanged)",
    "class_clip_i_base": "prior drift: class-prompt images vs the base model's with the same seeds, CLIP",
}


@dataclasses.dataclass
class Embedded:
    """DINO and CLIP image embeddings of a list of images, one row per image, in order."""
    dino: torch.Tensor
    clip: torch.Tensor


class SubjectScorer:
    def __init__(self, dino: DinoEmbedder, clip: ClipEmbedder, photos: list[Image.Image]):
        self.dino, self.clip = dino, clip
        self.photos = self.embed(photos)
        self._texts: dict[str, torch.Tensor] = {}

    def embed(self, images: list[Image.Image]) -> Embedded:
        return Embedded(self.dino.images(images), self.clip.images(images))

    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        missing = [t for t in dict.fromkeys(texts) if t not in self._texts]
        if missing:
            self._texts.update(zip(missing, self.clip.texts(missing)))
        return torch.stack([self._texts[t] for t in texts])

    def subject_scores(self, drawn: Embedded, texts: list[str]) -> dict[str, float]:
        """DINO and CLIP-I of the subject-prompt images, and CLIP-T with `texts` (one per image, in order)."""
        return {"dino": mean_pairwise_cosine(drawn.dino, self.photos.dino),
                "clip_i": mean_pairwise_cosine(drawn.clip, self.photos.clip),
                "clip_t": mean_paired_cosine(drawn.clip, self.text_embeddings(texts))}

    def drift_scores(self, drawn: Embedded, base: Embedded) -> dict[str, float]:
        """Class-prompt images against the photos (pairwise) and against the base model's (seed for seed)."""
        return {"class_dino": mean_pairwise_cosine(drawn.dino, self.photos.dino),
                "class_clip_i": mean_pairwise_cosine(drawn.clip, self.photos.clip),
                "class_dino_base": mean_paired_cosine(drawn.dino, base.dino),
                "class_clip_i_base": mean_paired_cosine(drawn.clip, base.clip)}
