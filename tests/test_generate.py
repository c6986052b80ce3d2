"""`finetune generate`: base model + LoRAs -> PNGs (each with its parameters) and a labelled grid, on every model
family."""
import hashlib
import json

import pytest
import torch
from diffusers import DDIMScheduler
from PIL import Image
from safetensors.torch import load_file, save_file

from finetune.export.diffusers_format import read_header
from finetune.family import resolve_family
from finetune.inference import parse_lora_arg
from tests.helpers import random_lora


def test_parse_lora_arg(tmp_path):
    assert parse_lora_arg("run/dog") == ("run/dog", 1.0)
    assert parse_lora_arg("run/dog:0.7") == ("run/dog", 0.7)
    odd = tmp_path / "a:b"
    odd.mkdir()
    assert parse_lora_arg(str(odd)) == (str(odd), 1.0)


def test_generate_writes_images_and_grid_and_lora_changes_them(tiny_sd1, trained_sd1, tmp_path, run_cli):
    common = ["generate", "--model", tiny_sd1, "--prompt", "a photo of sks dog", "--prompt", "a dog",
              "--num-images", 2, "--steps", 3, "--resolution", 64, "--scheduler", "euler"]
    code, out, err = run_cli(*common, "--out", tmp_path / "base")
    assert code == 0, err
    code, out, err = run_cli(*common, "--lora", f"{trained_sd1}:0.8", "--out", tmp_path / "lora")
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
    lora_file = (trained_sd1 / "run.safetensors").read_bytes()
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


def pixels(path) -> torch.Tensor:
    return torch.tensor(list(Image.open(path).tobytes()), dtype=torch.float32)


@pytest.mark.parametrize("model", ["tiny_sd1", "tiny_sd2", "tiny_sdxl"])
def test_one_and_two_loras_on_every_family(model, request, tmp_path, run_cli):
    """SD 1.x, SD 2.x (v-prediction) and SDXL (both text encoders): two LoRAs combine with their scales, and one
    LoRA draws what diffusers' own pipeline for the family draws with that file."""
    base = request.getfixturevalue(model)
    if model == "tiny_sd1":
        first = request.getfixturevalue("trained_sd1") / "pytorch_lora_weights.safetensors"
    else:
        first = random_lora(base, tmp_path / "first")
    # A second LoRA with the same keys, twice as strong, stands in for another subject.
    second = tmp_path / "double.safetensors"
    ups = {k for k in load_file(first) if "lora_B" in k or ".up." in k}  # the up-projections, in either spelling
    assert len(ups) == len(load_file(first)) // 2
    save_file({k: v * 2 if k in ups else v for k, v in load_file(first).items()}, second, metadata=read_header(first))
    common = ["generate", "--model", base, "--prompt", "a dog", "--num-images", 1, "--steps", 2, "--scheduler", "ddim"]
    for name, loras in [("base", []), ("pair", ["--lora", f"{first}:0.5", "--lora", f"{second}:0.25"]),
                        ("single", ["--lora", f"{first}:1.0"])]:
        code, _, err = run_cli(*common, *loras, "--out", tmp_path / name)
        assert code == 0, err
    pair, single, plain = (pixels(tmp_path / name / "0000.png") for name in ("pair", "single", "base"))
    assert (pair - single).abs().mean() < 1.0  # 0.5 x W + 0.25 x 2W = 1.0 x W, up to 8-bit rounding
    assert (single - plain).abs().mean() > 1.0
    assert Image.open(tmp_path / "single" / "0000.png").size == (64, 64)  # the model's own size (tiny: 64 px)

    # The oracle: diffusers' pipeline for the family, its sampler built from the model's scheduler config (so
    # SD 2.x stays v-prediction), the file loaded by diffusers itself.
    pipe = resolve_family(str(base)).pipeline_class().from_pretrained(base)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(first, adapter_name="x")
    pipe.set_progress_bar_config(disable=True)
    want = pipe(["a dog"], num_inference_steps=2, guidance_scale=7.5,
                generator=[torch.Generator("cpu").manual_seed(0)]).images[0]
    assert (single - torch.tensor(list(want.tobytes()), dtype=torch.float32)).abs().max() <= 1


def test_missing_lora_is_one_line(tiny_sd1, tmp_path, run_cli):
    code, _, err = run_cli("generate", "--model", tiny_sd1, "--prompt", "x", "--lora", tmp_path / "nope")
    assert code == 2 and "--lora" in err and "no such file or folder" in err
