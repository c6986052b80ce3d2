"""The metrics as pure functions on embeddings (rows of a 2-D tensor, one per image or text).

The DreamBooth paper (Ruiz et al., CVPR 2023) defines subject fidelity as the mean pairwise cosine
similarity between embeddings of generated and real images (DINO, CLIP-I) and prompt fidelity as the mean cosine
similarity of each image's CLIP embedding with its prompt's (CLIP-T).
"""
from __future__ import annotations

import torch


def unit_rows(embeddings: torch.Tensor) -> torch.Tensor:
    """Each row scaled to length 1, in float64 so means of a few hundred cosines are exact to print precision."""
    rows = embeddings.detach().to(torch.float64)
    return rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def mean_pairwise_cosine(generated: torch.Tensor, real: torch.Tensor) -> float:
    """Mean of cos(g_i, r_j) over every generated i and every real j (DINO, CLIP-I)."""
    return (unit_rows(generated) @ unit_rows(real).T).mean().item()


def mean_paired_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean of cos(a_i, b_i): row i of one with row i of the other (CLIP-T; drift against the same seeds)."""
    if a.shape != b.shape:
        raise ValueError(f"paired embeddings need the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return (unit_rows(a) * unit_rows(b)).sum(dim=-1).mean().item()
