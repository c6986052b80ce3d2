"""Which checkpoint to keep, and whether the curves show overfitting.

The rule: the highest DINO (likeness) among the checkpoints whose CLIP-T (does the image follow the prompt) is at
most eval.max_clip_t_drop below the base model's. Training on a few photos first raises DINO with CLIP-T flat;
overfitting shows as DINO still rising while CLIP-T falls: the LoRA redraws the photos whatever the prompt says.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Verdict:
    best: str             # the chosen checkpoint's name, e.g. step-000400
    rule: str             # the rule as applied, with its numbers
    warnings: list[str]


def choose_checkpoint(base: dict, checkpoints: list[dict], max_clip_t_drop: float) -> Verdict:
    """`base` and each of `checkpoints` are rows with 'checkpoint', 'step', 'dino' and 'clip_t'."""
    floor = base["clip_t"] - max_clip_t_drop
    limit = f"CLIP-T >= {floor:.4f} (base {base['clip_t']:.4f} - {max_clip_t_drop:g})"
    kept = [row for row in checkpoints if row["clip_t"] >= floor]
    if kept:
        best = max(kept, key=lambda row: (row["dino"], -row["step"]))  # ties: the earlier step
        return Verdict(best["checkpoint"], f"highest DINO among checkpoints with {limit}",
                       overfitting(best, checkpoints, floor))
    best = max(checkpoints, key=lambda row: (row["clip_t"], -row["step"]))
    return Verdict(best["checkpoint"], f"highest CLIP-T: no checkpoint kept {limit}",
                   [f"every checkpoint's CLIP-T is more than {max_clip_t_drop:g} below the base model's "
                    f"{base['clip_t']:.4f}: the LoRA overrides the prompts from the first checkpoint on; train fewer "
                    "steps or at a lower learning rate, or checkpoint more often"])


def overfitting(best: dict, checkpoints: list[dict], floor: float) -> list[str]:
    """A warning when a checkpoint after the best one has a higher DINO but a CLIP-T below the floor."""
    later = sorted((row for row in checkpoints if row["step"] > best["step"] and row["dino"] > best["dino"]
                    and row["clip_t"] < floor), key=lambda row: row["step"])
    if not later:
        return []
    first = later[0]
    return [f"overfitting from {first['checkpoint']}: DINO rose to {first['dino']:.4f} (best {best['checkpoint']}: "
            f"{best['dino']:.4f}) while CLIP-T fell to {first['clip_t']:.4f}, below {floor:.4f}; later checkpoints "
            "trade prompt fidelity for likeness"]
