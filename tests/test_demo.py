"""README's demo command, shortened: tiny model, real photos, prior preservation, TE LoRA, export, grid."""
import json

from PIL import Image
from safetensors.torch import load_file

from finetune.export.diffusers_format import finetune_metadata


def test_demo_runs_end_to_end(tmp_path, run_cli):
    code, _, err = run_cli("demo", "--out", tmp_path, "--steps", 6)
    assert code == 0, err
    export = tmp_path / "run" / "pytorch_lora_weights.safetensors"
    assert any(k.startswith("text_encoder.") for k in load_file(export))
    assert finetune_metadata(export)["alpha"] == "16.0" and finetune_metadata(export)["rank"] == "8"
    assert len(list((tmp_path / "photos").glob("*.jpg"))) == 5
    assert len(list((tmp_path / "class_images").glob("*.png"))) == 8
    grid = Image.open(tmp_path / "base_vs_lora.png")
    cells = json.loads(grid.text["finetune"])["grid"]
    assert [(c["lora"], c["seed"]) for c in cells] == [(lora, k) for lora in (False, True) for k in range(4)]
    assert grid.width == 4 * 128 and all(c["box"][2] - c["box"][0] == 128 for c in cells)
    base, lora = grid.crop(cells[0]["box"]).tobytes(), grid.crop(cells[4]["box"]).tobytes()
    assert base != lora
    labels = [grid.crop((0, c["box"][1] - 14, 512, c["box"][1])).tobytes() for c in (cells[0], cells[4])]
    assert labels[0] != labels[1]  # "base: ..." and "LoRA x1: ..." above the rows
    assert grid.text["parameters"].startswith("a photo of sks cat\nSteps: 20, Sampler: DPM++ 2M, CFG scale: 7.5, "
                                              "Seed: 0, Size: 64x64")
