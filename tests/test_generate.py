"""`finetune generate`: base model + LoRAs -> PNGs (each with its parameters) and a labelled grid."""
import hashlib
import json

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from finetune.inference import parse_lora_arg
from tests.helpers import tiny_overrides


def test_parse_lora_arg(tmp_path):
    assert parse_lora_arg("run/dog") == ("run/dog", 1.0)
    assert parse_lora_arg("run/dog:0.7") == ("run/dog", 0.7)
    odd = tmp_path / "a:b"
    odd.mkdir()
    assert parse_lora_arg(str(odd)) == (str(odd), 1.0)


def test_generate_writes_images_and_grid_and_lora_changes_them(tiny_sd1, photos, tmp_path, run_cli):
    code, _, err = run_cli("train", "recipes/configs/sd15_dreambooth_lora.yaml",
                           *tiny_overrides(tiny_sd1, photos, tmp_path, **{"prior.num_class_images": 0,
                                                                          "train.learning_rate": 1e-2}))
    assert code == 0, err
    common = ["generate", "--model", tiny_sd1, "--prompt", "a photo of sks dog", "--prompt", "a dog",
              "--num-images", 2, "--steps", 3, "--resolution", 64, "--scheduler", "euler"]
    code, out, err = run_cli(*common, "--out", tmp_path / "base")
    assert code == 0, err
    code, out, err = run_cli(*common, "--lora", f"{tmp_path / 'run'}:0.8", "--out", tmp_path / "lora")
    assert code == 0, err
    assert "wrote 4 images" in out
    names = sorted(p.name for p in (tmp_path / "lora").iterdir())
    assert names == ["0000.png", "0001.png", "0002.png", "0003.png", "grid.png"]
    grid = Image.open(tmp_path / "lora" / "grid.png")
    cells = json.loads(grid.text["finetune"])["grid"]
    assert [(c["file"], c["prompt"], c["seed"]) for c in cells] == [
        ("0000.png", "a photo of sks dog", 0), ("0001.png", "a photo of sks dog", 1), ("0002.png", "a dog", 0),
        ("0003.png", "a dog", 1)]
    for cell in cells:  # each cell holds its image's pixels unscaled; the legend is around them
        assert grid.crop(cell["box"]).tobytes() == Image.open(tmp_path / "lora" / cell["file"]).tobytes()
    assert grid.width == 128 and grid.height > 128
    title = grid.crop((0, 0, 128, cells[0]["box"][1] - 20)).convert("L")
    assert min(title.getdata()) < 100, "no legend above the first row"
    row_labels = [grid.crop((0, c["box"][1] - 14, 128, c["box"][1])).tobytes() for c in (cells[0], cells[2])]
    assert row_labels[0] != row_labels[1], "the two prompts' rows carry the same label"

    # A1111's parameters text, with the LoRA in the prompt and the hash of the file A1111 would load (the run's kohya
    # file, run.safetensors) over its tensor bytes, the header skipped.
    lora_file = (tmp_path / "run" / "run.safetensors").read_bytes()
    digest = hashlib.sha256(lora_file[8 + int.from_bytes(lora_file[:8], "little"):]).hexdigest()[:12]
    from finetune import __version__
    assert Image.open(tmp_path / "lora" / "0003.png").text["parameters"] == (
        "a dog <lora:run:0.8>\n"
        f"Steps: 3, Sampler: Euler, CFG scale: 7.5, Seed: 1, Size: 64x64, Model: {tiny_sd1.name}, "
        f'Lora hashes: "run: {digest}", Version: finetune {__version__}')
    # --from-png draws that image again from its own parameters, bit for bit (its batch is redrawn).
    code, out, err = run_cli("generate", "--from-png", tmp_path / "lora" / "0003.png", "--out", tmp_path / "again")
    assert code == 0, err
    assert "wrote 1 image and grid.png" in out
    again = Image.open(tmp_path / "again" / "0000.png")
    assert again.tobytes() == Image.open(tmp_path / "lora" / "0003.png").tobytes()
    assert again.text["parameters"] == Image.open(tmp_path / "lora" / "0003.png").text["parameters"]
    code, _, err = run_cli("generate", "--from-png", tmp_path / "lora" / "grid.png")
    assert code == 2 and "is a grid of 4 images; give one image" in err
    base = torch.tensor(list(Image.open(tmp_path / "base" / "0000.png").getdata()), dtype=torch.float32)
    tuned = torch.tensor(list(Image.open(tmp_path / "lora" / "0000.png").getdata()), dtype=torch.float32)
    assert (base - tuned).abs().mean() > 0.5
    # The same seed without LoRA reproduces the base image exactly.
    code, _, _ = run_cli(*common, "--out", tmp_path / "base2")
    assert Image.open(tmp_path / "base2" / "0000.png").tobytes() == Image.open(tmp_path / "base" / "0000.png").tobytes()


def test_two_loras_combine_with_their_scales(tiny_sd1, photos, tmp_path, run_cli):
    code, _, err = run_cli("train", "recipes/configs/sd15_dreambooth_lora.yaml",
                           *tiny_overrides(tiny_sd1, photos, tmp_path, **{"prior.num_class_images": 0}))
    assert code == 0, err
    # A second LoRA with the same keys, twice as strong, stands in for another subject.
    first = tmp_path / "run" / "pytorch_lora_weights.safetensors"
    second = tmp_path / "double.safetensors"
    from finetune.export.diffusers_format import read_header
    save_file({k: v * 2 if "lora_B" in k else v for k, v in load_file(first).items()}, second,
              metadata=read_header(first))
    common = ["generate", "--model", tiny_sd1, "--prompt", "a dog", "--num-images", 1, "--steps", 2,
              "--resolution", 64, "--scheduler", "ddim"]
    run_cli(*common, "--lora", f"{first}:0.5", "--lora", f"{second}:0.25", "--out", tmp_path / "pair")
    run_cli(*common, "--lora", f"{first}:1.0", "--out", tmp_path / "single")
    pair = Image.open(tmp_path / "pair" / "0000.png").tobytes()
    single = Image.open(tmp_path / "single" / "0000.png").tobytes()
    diff = sum(abs(a - b) for a, b in zip(pair, single)) / len(pair)
    assert diff < 1.0  # 0.5 x W + 0.25 x 2W = 1.0 x W, up to 8-bit rounding


def test_missing_lora_is_one_line(tiny_sd1, tmp_path, run_cli):
    code, _, err = run_cli("generate", "--model", tiny_sd1, "--prompt", "x", "--lora", tmp_path / "nope")
    assert code == 2 and "--lora" in err and "no such file or folder" in err
