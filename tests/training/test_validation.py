"""Validation images while training: labelled grids at the configured steps, in TensorBoard, without touching
training."""
import json

from PIL import Image
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.helpers import tiny_overrides

SD15 = "recipes/configs/sd15_dreambooth_lora.yaml"


def test_validation_grids_at_the_configured_steps_and_training_unchanged(tiny_sd1, photos, tmp_path, run_cli):
    common = tiny_overrides(tiny_sd1, photos, tmp_path, **{"prior.num_class_images": 0, "lora.text_encoder": "true",
                                                           "lora.unet_targets": "all_attention"})
    prompts = ["a photo of sks cat", "a cat in snow"]
    validation = ["validation.prompts=[a photo of sks cat, a cat in snow]", "validation.every=2",
                  "validation.num_images=2", "validation.steps=2", "validation.scheduler=euler_a"]
    code, _, err = run_cli("train", SD15, *common, *validation, f"output_dir={tmp_path / 'with'}")
    assert code == 0, err
    samples = tmp_path / "with" / "samples"
    assert sorted(p.name for p in samples.iterdir()) == ["before_after.png", "step-000002.png", "step-000004.png"]
    grid, after = Image.open(samples / "step-000004.png"), Image.open(samples / "before_after.png")
    grid_cells, after_cells = (json.loads(image.text["finetune"])["grid"] for image in (grid, after))
    assert [(c["prompt"], c["seed"]) for c in grid_cells] == [(p, s) for p in prompts for s in (0, 1)]
    assert [(c["prompt"], c["lora"]) for c in after_cells] == [(p, lora) for p in prompts for lora in (False, True)
                                                               for _ in (0, 1)]
    assert all(c["box"][2] - c["box"][0] == 64 == c["box"][3] - c["box"][1] for c in grid_cells + after_cells)
    assert grid.text["parameters"].splitlines()[-1].startswith("Steps: 2, Sampler: Euler a, CFG scale: 7.5, Seed: 0, "
                                                              "Size: 64x64")
    assert "Training step: 4" in grid.text["parameters"]
    events = EventAccumulator(str(tmp_path / "with" / "logs" / "dreambooth_lora"), size_guidance={"images": 0})
    events.Reload()
    steps = {tag: [e.step for e in events.Images(tag)] for tag in events.Tags()["images"]}
    assert steps == {"validation": [2, 4], "before_after": [4]}

    # The same seeds give the same images: the LoRA rows at the end equal the last validation grid, cell by cell;
    # the base rows differ from them, and so do the labels above base and LoRA rows.
    lora_cells = [c for c in after_cells if c["lora"]]
    assert [grid.crop(a["box"]).tobytes() for a in grid_cells] == [after.crop(c["box"]).tobytes() for c in lora_cells]
    base_cell, lora_cell = after_cells[0], after_cells[2]
    assert after.crop(base_cell["box"]).tobytes() != after.crop(lora_cell["box"]).tobytes()
    labels = [after.crop((0, c["box"][1] - 14, 128, c["box"][1])).tobytes() for c in (base_cell, lora_cell)]
    assert labels[0] != labels[1]

    # Drawing images did not change training: the weights equal a run without validation, bit for bit.
    code, _, err = run_cli("train", SD15, *common, f"output_dir={tmp_path / 'without'}")
    assert code == 0, err
    a = load_file(tmp_path / "with" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "without" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_an_unknown_validation_sampler_is_a_one_line_error_naming_its_key(tiny_sd1, photos, tmp_path, run_cli):
    overrides = tiny_overrides(tiny_sd1, photos, tmp_path, **{"prior.num_class_images": 0})
    code, _, err = run_cli("train", SD15, *overrides, "validation.prompts=[a cat]", "validation.scheduler=eulr")
    assert code == 2
    # Checked when the config is read, before any model loads.
    assert err.splitlines()[-1] == ("finetune: error: validation.scheduler: 'eulr' is not one of dpm++, ddim, euler, "
                                    "euler_a, pndm, default")
