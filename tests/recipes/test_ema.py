"""train.ema_decay through the CLI: the exported EMA is the recurrence computed by hand over the run's recorded
weights; the trained weights are saved beside it; validation draws the EMA; kill -9 and resume give the same EMA."""
from __future__ import annotations

import signal

import torch
from safetensors.torch import load_file

from finetune.export.diffusers_format import finetune_metadata
from finetune.export.lora_weights import read_lora
from finetune.lora import lora_state
from finetune.run_files import NO_EMA_WEIGHT_NAME
from finetune.training.validation import Validator
from tests.helpers import tiny_overrides
from tests.recipes.test_crash_safety import (
    assert_same_weights,
    latest_step,
    nan_from,
    start_training,
    wait_for_checkpoint,
)

SD15 = "recipes/configs/sd15_dreambooth_lora.yaml"
EXPORT = "pytorch_lora_weights.safetensors"
EMA_PKL = "custom_checkpoint_1.pkl"  # Accelerate's file of the second registered object (the first: LR schedule)


def ema_by_hand(raw_per_update: list[dict[str, torch.Tensor]], decay: float) -> dict[str, torch.Tensor]:
    """The documented recurrence in float64: shadow_1 = w_1; shadow_k = d_k shadow + (1 - d_k) w_k with
    d_k = min(decay, k / (9 + k))."""
    shadow = {k: v.double() for k, v in raw_per_update[0].items()}
    for k, weights in enumerate(raw_per_update[1:], start=2):
        d = min(decay, k / (9 + k))
        shadow = {key: d * shadow[key] + (1 - d) * weights[key].double() for key in shadow}
    return shadow


def unet_layers(path) -> dict[str, torch.Tensor]:
    return read_lora(path).layers["unet"]  # peft key names, as the checkpoints' lora_0 holds them


def test_exported_ema_is_the_recurrence_over_the_steps_taken(tiny_sd1, photos, tmp_path, run_cli, monkeypatch):
    # Step 2's loss is NaN: that step is skipped, so the EMA is updated after steps 1, 3, 4 and 5 only (k = 1..4).
    # decay 0.2 is reached at k = 3 (3/12 > 0.2): both the warm-up and the cap are exercised.
    monkeypatch.setattr("finetune.training.loss.DreamBoothObjective.__call__", nan_from(lambda call: call == 2))
    overrides = tiny_overrides(tiny_sd1, photos, tmp_path, **{
        "prior.num_class_images": 0, "train.max_steps": 5, "train.checkpoint_every": 1, "train.keep_checkpoints": 5,
        "train.learning_rate": 5e-2, "train.ema_decay": 0.2, "train.ema_device": "cpu"})
    code, _, err = run_cli("train", SD15, *overrides)
    assert code == 0, err
    run = tmp_path / "run"
    ckpt = run / "checkpoints"
    raw = {n: load_file(ckpt / f"step-00000{n}" / "lora_0.safetensors") for n in (1, 3, 4, 5)}
    assert not (ckpt / "step-000002").exists()  # no checkpoint after a bad step
    expected = ema_by_hand([raw[n] for n in (1, 3, 4, 5)], 0.2)

    exported = unet_layers(run / EXPORT)
    assert exported.keys() == expected.keys()
    for key, value in exported.items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value.double(), expected[key], rtol=1e-5, atol=1e-7)  # fp32 against float64
    assert any((exported[k] - raw[5][k]).abs().max() > 1e-4 for k in exported if "lora_B" in k)  # not the raw ones
    # The trained weights beside it are the last step's, bit for bit; each header says which file is which.
    assert_same_weights_peft(unet_layers(run / NO_EMA_WEIGHT_NAME), raw[5])
    assert finetune_metadata(run / EXPORT)["weights"] == "EMA"
    assert finetune_metadata(run / NO_EMA_WEIGHT_NAME)["weights"] == "trained (no EMA)"
    assert finetune_metadata(run / EXPORT)["ema_decay"] == "0.2"
    # Each checkpoint's export is the EMA at its step; its state file says how many updates were made.
    for n, updates in ((3, 2), (4, 3)):
        want = ema_by_hand([raw[m] for m in (1, 3, 4, 5)][:updates], 0.2)
        for key, value in unet_layers(ckpt / f"step-00000{n}" / EXPORT).items():
            torch.testing.assert_close(value.double(), want[key], rtol=1e-5, atol=1e-7)  # fp32 against float64
        assert torch.load(ckpt / f"step-00000{n}" / EMA_PKL, weights_only=False)["optimization_step"] == updates


def assert_same_weights_peft(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_validation_draws_the_ema_and_training_is_unchanged(tiny_sd1, photos, tmp_path, run_cli, monkeypatch):
    common = tiny_overrides(tiny_sd1, photos, tmp_path, **{
        "prior.num_class_images": 0, "train.max_steps": 3, "train.learning_rate": 5e-2, "train.checkpoint_every": 1,
        "train.keep_checkpoints": 3})
    code, _, err = run_cli("train", SD15, *common, f"output_dir={tmp_path / 'plain'}")
    assert code == 0, err

    drawn_with, real_draw = [], Validator.draw

    def spy(self, prompts=None):
        # a copy: on the CPU lora_state's tensors are the live parameters
        drawn_with.append({k: v.clone() for k, v in lora_state(self.lora_models[0]).items()})
        return real_draw(self, prompts)

    monkeypatch.setattr(Validator, "draw", spy)
    run = tmp_path / "ema"
    code, _, err = run_cli("train", SD15, *common, f"output_dir={run}", "train.ema_decay=0.5",
                           "validation.prompts=[a photo of sks dog]", "validation.every=1", "validation.num_images=1",
                           "validation.steps=1")
    assert code == 0, err
    # Swapping the EMA in for every grid and out again left training exactly as without EMA or validation.
    assert_same_weights(tmp_path / "plain" / EXPORT, run / NO_EMA_WEIGHT_NAME)
    # Grids at steps 1-3, then the end's before/after (base with LoRA off, then the LoRA): each with the EMA.
    assert len(drawn_with) == 5
    emas = [unet_layers(run / "checkpoints" / f"step-00000{n}" / EXPORT) for n in (1, 2, 3)] + \
        [unet_layers(run / EXPORT)] * 2
    for state, ema in zip(drawn_with, emas):
        assert_same_weights_peft(state, ema)
    assert (run / "samples" / "step-000003.png").is_file()


def test_kill_and_resume_give_the_same_ema_bitwise(tiny_sd1, photos, tmp_path, run_cli):
    steps = 8
    common = tiny_overrides(tiny_sd1, photos, tmp_path, **{
        "train.max_steps": steps, "train.checkpoint_every": 1, "prior.num_class_images": 0,
        "train.learning_rate": 5e-2, "train.ema_decay": 0.9})
    code, _, err = run_cli("train", SD15, *common, f"output_dir={tmp_path / 'straight'}")
    assert code == 0, err

    run, log = tmp_path / "killed", tmp_path / "train.log"
    proc = start_training([*common, f"output_dir={run}"], log)
    wait_for_checkpoint(proc, run, 2, log)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert latest_step(run) < steps
    # The resumed run keeps its EMA in CPU memory: where it lives changes no number.
    code, _, err = run_cli("train", SD15, *common, f"output_dir={run}", "train.resume=latest",
                           "train.ema_device=cpu")
    assert code == 0, err
    straight = tmp_path / "straight"
    assert_same_weights(straight / EXPORT, run / EXPORT)
    assert_same_weights(straight / NO_EMA_WEIGHT_NAME, run / NO_EMA_WEIGHT_NAME)
    final = f"checkpoints/step-{steps:06d}/{EMA_PKL}"
    a, b = (torch.load(folder / final, weights_only=False) for folder in (straight, run))
    assert a["optimization_step"] == b["optimization_step"] == steps
    assert all(torch.equal(x, y) for x, y in zip(a["shadow_params"], b["shadow_params"]))
