"""Tiny CLIP and DINO folders, and one tiny trained run with three checkpoints that several tests evaluate."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import tiny_overrides

SD15 = "recipes/configs/sd15_dreambooth_lora.yaml"
VALIDATION_PROMPTS = ["a photo of sks cat in the snow", "a photo of a cat"]  # a subject prompt, a class prompt
RUN = {"prior.num_class_images": 0, "train.max_steps": 3, "train.checkpoint_every": 1, "train.learning_rate": 1e-2,
       "data.trigger": "sks cat"}


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    from finetune.evaluation.tiny import build_tiny_clip
    return build_tiny_clip(tmp_path_factory.mktemp("models") / "tiny-clip")


@pytest.fixture(scope="session")
def tiny_dino(tmp_path_factory) -> Path:
    from finetune.evaluation.tiny import build_tiny_dino
    return build_tiny_dino(tmp_path_factory.mktemp("models") / "tiny-dino")


@pytest.fixture(scope="session")
def eval_run(tiny_sd1, photos_master, tiny_clip, tiny_dino, tmp_path_factory) -> Path:
    """3 steps, a checkpoint (with its export) at each, a validation grid with validation.metrics at step 2."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    from finetune.cli import main
    out = tmp_path_factory.mktemp("eval-run")
    overrides = tiny_overrides(tiny_sd1, photos_master, out, **RUN, **{
        "validation.prompts": "[" + ", ".join(VALIDATION_PROMPTS) + "]",
        "validation.every": 2, "validation.num_images": 1, "validation.steps": 1, "validation.scheduler": "euler",
        "validation.before_after": "false", "validation.metrics": "true",
        "eval.dino_model": tiny_dino, "eval.clip_model": tiny_clip})
    assert main(["train", SD15, *overrides]) == 0
    AcceleratorState._reset_state(True)  # as conftest's fresh_accelerate_state does after each test
    GradientState._reset_state()
    PartialState._reset_state()
    return out / "run"


def eval_overrides(photos: Path, clip: Path, dino: Path, **extra) -> list[str]:
    """A small evaluation of the tiny run: two prompts, one seed, one sampler step, two drift images."""
    values = {"data.instance_dir": photos, "eval.dino_model": dino, "eval.clip_model": clip,
              "eval.prompts": '["a {subject} in the jungle", "a red {subject}"]', "eval.num_images": 1,
              "eval.steps": 1, "eval.num_class_images": 2, "eval.scheduler": "euler"}
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]
