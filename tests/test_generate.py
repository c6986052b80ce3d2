"""`finetune generate`: base model + LoRAs -> PNGs and a grid."""
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
    assert Image.open(tmp_path / "lora" / "grid.png").size == (128, 128)  # 2 prompts x 2 images of 64 px
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
