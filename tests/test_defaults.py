"""train.max_steps and train.learning_rate from the photo count and lora.type when unset (finetune/defaults.py)."""
from __future__ import annotations

import json
import shutil

import pytest

from finetune.config import TrainConfig
from finetune.defaults import with_defaults
from finetune.export.diffusers_format import WEIGHT_NAME, finetune_metadata
from tests.helpers import SD15, tiny_overrides


@pytest.mark.parametrize("photos, batch, accumulation, processes, steps", [
    (5, 1, 1, 1, 500),    # diffusers' DreamBooth-LoRA README: 5 dog photos, batch 1, --max_train_steps=500
    (12, 1, 1, 1, 1200),  # 100 views of each photo
    (7, 2, 2, 1, 175),    # 700 views / 4 samples per step
    (3, 1, 1, 2, 150),    # 2 GPUs x batch 1: 300 / 2
    (1, 3, 1, 1, 34),     # 100 / 3, rounded up: never fewer than 100 views
])
def test_steps_rule_gives_the_hand_computed_counts(photos, batch, accumulation, processes, steps):
    train, said = with_defaults(TrainConfig(batch_size=batch, gradient_accumulation=accumulation), "lora", photos,
                                processes)
    assert train.max_steps == steps
    assert f"train.max_steps={steps} (100 views of each of {photos} photo" in said


@pytest.mark.parametrize("kind, rate", [("lora", 1e-4), ("dora", 1e-4), ("loha", 2e-4), ("lokr", 2e-4)])
def test_learning_rate_rule_follows_the_adapter_type(kind, rate):
    train, said = with_defaults(TrainConfig(max_steps=10), kind, 5)
    assert train.learning_rate == rate and train.max_steps == 10
    assert f"train.learning_rate={rate:g} (lora.type={kind}" in said and "max_steps" not in said


def test_explicit_values_are_kept_and_nothing_is_said():
    train = TrainConfig(max_steps=7, learning_rate=3e-5)
    assert with_defaults(train, "loha", 20) == (train, "")


def test_a_run_without_them_derives_both_says_why_and_records_them(tiny_sd1, photos, tmp_path, run_cli, caplog):
    for extra in sorted(photos.iterdir())[1:]:  # one photo: 100 views in one step of 50 x 2
        extra.unlink()
    overrides = [o for o in tiny_overrides(tiny_sd1, photos, tmp_path, **{
        "prior.num_class_images": 0, "lora.type": "loha", "train.batch_size": 50, "train.gradient_accumulation": 2,
        "validation.prompts": "[]"}) if not o.startswith(("train.max_steps=", "train.learning_rate="))]
    caplog.set_level("INFO", logger="finetune")
    code, _, err = run_cli("train", SD15, *overrides)
    assert code == 0, err
    lines = [r.getMessage() for r in caplog.records if "unset, so chose" in r.getMessage()]
    assert lines == ["unset, so chose train.max_steps=1 (100 views of each of 1 photo at 100 samples per step, as "
                     "diffusers' DreamBooth-LoRA README: 5 photos, 500 steps); train.learning_rate=0.0002 "
                     "(lora.type=loha: LyCORIS' loha_config.toml); set them to override"]
    header = finetune_metadata(tmp_path / "run" / WEIGHT_NAME)
    assert json.loads(header["steps"]) == 1 and json.loads(header["learning_rate"]) == 2e-4
    # plan reads the same config without either value
    shutil.rmtree(tmp_path / "run")
    code, out, err = run_cli("plan", SD15, *overrides, "--gpu-memory", "8GiB")
    assert code == 0, err
    assert "as configured" in out
