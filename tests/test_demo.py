"""README's demo command, shortened: tiny model, real photos, prior preservation, TE LoRA, export, grid."""
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
    assert grid.size == (4 * 128, 2 * 128)
    top, bottom = grid.crop((0, 0, 512, 128)).tobytes(), grid.crop((0, 128, 512, 256)).tobytes()
    assert top != bottom
