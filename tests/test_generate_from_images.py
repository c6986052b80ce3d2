"""Image-to-image and inpainting with the LoRA, on SD 1.x and SDXL: from Python (finetune.inference) and through
`finetune generate --init-image [--mask]`, with an inpainting checkpoint too, and the one-line errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from finetune.inference import Sampling, image_to_image, inpaint, load_generator
from finetune.lora import lora_disabled

PROMPT = "a photo of sks dog"
STEPS = Sampling(steps=4, seed=3)  # strength 0.5 of 4 steps: 2 denoising steps


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """A 64 px crop of a real photo, and a mask whose white square (16..48) is the region to paint."""
    from finetune.demo import prepare_photos
    folder = tmp_path_factory.mktemp("pictures")
    prepare_photos(folder / "photos")
    photo = Image.open(sorted((folder / "photos").glob("*.jpg"))[0]).convert("RGB").resize((64, 64))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    photo.save(folder / "photo.png")
    mask.save(folder / "mask.png")
    return folder / "photo.png", folder / "mask.png"


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def generator(request):
    """(base model, LoRA run, the loaded pipeline with the LoRA) for a trained run of each family."""
    base = request.getfixturevalue(f"tiny_{request.param}")
    run = request.getfixturevalue(f"trained_{request.param}")
    return base, run, load_generator(str(base), [(str(run), 1.0)], "ddim")


def array(image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


def lora_off(pipe):
    return lora_disabled([m for m in (pipe.unet, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m])


@torch.no_grad()
def vae_round_trip(vae, photo: Image.Image) -> np.ndarray:
    """The oracle, on the VAE alone: pixels to [-1, 1], encode (the mean latents), decode, back to 8 bits."""
    x = torch.tensor(array(photo), dtype=torch.float32).permute(2, 0, 1)[None] / 127.5 - 1
    y = vae.decode(vae.encode(x).latent_dist.mean).sample
    return ((y[0] / 2 + 0.5).clamp(0, 1) * 255).round().permute(1, 2, 0).numpy()


def test_img2img_keeps_the_input_at_strength_0_and_moves_with_strength_and_the_lora(generator, pictures):
    _, _, pipe = generator
    photo = Image.open(pictures[0])
    kept = image_to_image(pipe, [PROMPT], photo, 0.0, STEPS)[0]
    assert np.abs(array(kept) - vae_round_trip(pipe.vae, photo)).max() <= 1  # the input, up to the VAE round trip
    moved = image_to_image(pipe, [PROMPT], photo, 0.5, STEPS)[0]
    with lora_off(pipe):
        plain = image_to_image(pipe, [PROMPT], photo, 0.5, STEPS)[0]
    away = image_to_image(pipe, [PROMPT], photo, 0.5, Sampling(steps=4, seed=3, negative_prompt="blurry"))[0]
    assert moved.size == plain.size == photo.size
    assert np.abs(array(moved) - array(kept)).mean() > 2 and np.abs(array(plain) - array(kept)).mean() > 2
    assert np.abs(array(moved) - array(plain)).mean() > 1  # the LoRA changes the result
    assert np.abs(array(away) - array(moved)).mean() > 1  # and so does the negative prompt


def test_inpainting_keeps_the_unmasked_pixels_and_paints_the_masked_ones(generator, pictures):
    _, _, pipe = generator
    photo, mask = Image.open(pictures[0]), Image.open(pictures[1])
    inside = array(mask) > 0
    painted = inpaint(pipe, [PROMPT], photo, mask, sampling=STEPS)[0]
    with lora_off(pipe):
        plain = inpaint(pipe, [PROMPT], photo, mask, sampling=STEPS)[0]
    for image in (painted, plain):
        change = np.abs(array(image) - array(photo))
        assert change[~inside].max() == 0  # the input itself outside the mask (within any VAE error, trivially)
        assert change[inside].mean() > 5
    assert np.abs(array(painted) - array(plain))[inside].mean() > 1  # the LoRA changes what is painted


@pytest.mark.parametrize("model, mode", [("sd1", "img2img"), ("sdxl", "inpaint")])
def test_cli_writes_the_outputs_and_a_grid_with_the_input_beside_them(model, mode, request, pictures, tmp_path,
                                                                     run_cli):
    base, run = request.getfixturevalue(f"tiny_{model}"), request.getfixturevalue(f"trained_{model}")
    photo, mask = pictures
    second = tmp_path / "second.safetensors"  # another LoRA on the same layers, for two --lora at once
    save_file({k: -v if ".up." in k else v for k, v in load_file(run / "pytorch_lora_weights.safetensors").items()},
              second)
    extra = ["--strength", 0.5] if mode == "img2img" else ["--mask", mask]
    code, out, err = run_cli("generate", "--model", base, "--lora", f"{run}:0.8", "--lora", f"{second}:0.3",
                             "--prompt", PROMPT, "--prompt", "a dog", "--negative-prompt", "blurry", "--num-images", 2,
                             "--steps", 4, "--scheduler", "euler", "--init-image", photo, *extra,
                             "--out", tmp_path / "o")
    assert code == 0, err
    assert "wrote 4 images" in out
    grid = Image.open(tmp_path / "o" / "grid.png")
    record = json.loads(grid.text["finetune"])
    # per prompt: the input, then its two images (under the legend: issue 18's labelled grid)
    assert grid.width == 3 * 64 and [box[0] for box in record["input_boxes"]] == [0, 0]
    for box in record["input_boxes"]:
        assert array(grid.crop(box)).tolist() == array(Image.open(photo)).tolist()
    assert [cell["box"][0] for cell in record["grid"]] == [64, 128, 64, 128]
    images = [array(Image.open(tmp_path / "o" / f"{i:04d}.png")) for i in range(4)]
    assert np.abs(images[0] - images[1]).mean() > 1  # seed + k: two different images per prompt
    if mode == "inpaint":
        inside = array(Image.open(mask)) > 0
        assert all(np.abs(image - array(Image.open(photo)))[~inside].max() == 0 for image in images)

    # Issue 18: each PNG names its input picture (and mask), and --from-png draws it again bit for bit on the CPU.
    last = Image.open(tmp_path / "o" / "0003.png")
    assert ("Denoising strength: 0.5" if mode == "img2img" else "Denoising strength: 1, Inpaint") in last.text[
        "parameters"]
    code, out, err = run_cli("generate", "--from-png", tmp_path / "o" / "0003.png", "--out", tmp_path / "again")
    assert code == 0, err
    assert Image.open(tmp_path / "again" / "0000.png").tobytes() == last.tobytes()
    # The input picture moved or changed since: one line naming it, nothing drawn.
    moved = tmp_path / "photo-elsewhere.png"
    record = json.loads(last.text["finetune"])
    Path(record["init_image"]).rename(moved)
    try:
        code, _, err = run_cli("generate", "--from-png", tmp_path / "o" / "0003.png", "--out", tmp_path / "x")
        assert code == 2 and err.splitlines() == [
            f"finetune: error: --from-png {tmp_path / 'o' / '0003.png'}: it was drawn from --init-image "
            f"{record['init_image']}, which is missing; give --init-image with the same picture"]
        Image.open(moved).rotate(90).save(record["init_image"])
        code, _, err = run_cli("generate", "--from-png", tmp_path / "o" / "0003.png", "--out", tmp_path / "x")
        assert code == 2 and "--init-image" in err and "changed since the image was drawn" in err
    finally:
        moved.replace(record["init_image"])
    assert not (tmp_path / "x").exists()


def test_an_inpainting_checkpoint_takes_the_base_models_lora_and_says_what_does_not_apply(
        tiny_sd1, trained_sd1, pictures, tmp_path, run_cli, caplog):
    from finetune.tiny import build_tiny_sd
    checkpoint = build_tiny_sd(tmp_path / "tiny-sd1-inpainting", "sd1", seed=1, inpainting=True)
    # The trained kohya file plus a LoRA on the U-Net's input convolution, which takes 4 channels in the base model
    # and 9 in the inpainting one: that layer cannot apply there.
    tensors = load_file(trained_sd1 / "run.safetensors")
    tensors |= {"lora_unet_conv_in.lora_down.weight": torch.randn(2, 4, 3, 3, dtype=torch.float16) * 0.1,
                "lora_unet_conv_in.lora_up.weight": torch.randn(32, 2, 1, 1, dtype=torch.float16) * 0.1,
                "lora_unet_conv_in.alpha": torch.tensor(6.0)}
    save_file(tensors, tmp_path / "with_conv_in.safetensors")
    photo, mask = pictures
    code, _, err = run_cli("generate", "--model", tiny_sd1, "--inpaint-model", checkpoint, "--lora",
                           tmp_path / "with_conv_in.safetensors", "--prompt", PROMPT, "--num-images", 1, "--steps", 2,
                           "--init-image", photo, "--mask", mask, "--out", tmp_path / "o")
    assert code == 0, err
    assert "1 of its layers do not apply to" in caplog.text and "unet.conv_in" in caplog.text
    inside = array(Image.open(mask)) > 0
    change = np.abs(array(Image.open(tmp_path / "o" / "0000.png")) - array(Image.open(photo)))
    assert change[~inside].max() == 0 and change[inside].mean() > 5


@pytest.mark.parametrize("args, message", [
    (["--init-image", "{tmp}/nope.png"], "--init-image {tmp}/nope.png: no such file"),
    (["--init-image", "{tmp}/notes.png"], "--init-image {tmp}/notes.png: not a readable image"),
    (["--init-image", "{tmp}/odd.png"], "--init-image: the image is 60x64 pixels; Stable Diffusion's VAE needs sides "
                                        "that are multiples of 8: crop or resize it, e.g. to 56x64"),
    (["--init-image", "{photo}", "--mask", "{tmp}/small.png"],
     "--mask: the mask is 32x32 pixels but the image 64x64; give a mask of the image's size"),
    (["--init-image", "{photo}", "--strength", "1.5"], "--strength 1.5: give a value from 0 (keep the input) to 1"),
    (["--init-image", "{photo}", "--strength", "-0.1"], "--strength -0.1: give a value from 0"),
    (["--mask", "{mask}"], "--mask needs --init-image, the picture to start from"),
    (["--strength", "0.5"], "--strength needs --init-image"),
    (["--init-image", "{photo}", "--resolution", "64"], "--resolution: the images take --init-image's size"),
    (["--resolution", "100"], "--resolution 100: must be a positive multiple of 8, e.g. 512"),
    (["--init-image", "{photo}", "--mask", "{mask}", "--inpaint-model", "{model}"],
     "--inpaint-model: {model} is an SD 1.x model, not an inpainting model"),
])
def test_bad_input_is_one_line_before_any_model_loads(args, message, tiny_sd1, pictures, tmp_path, run_cli,
                                                      monkeypatch):
    import finetune.inference
    monkeypatch.setattr(finetune.inference, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    (tmp_path / "notes.png").write_text("not an image")
    Image.new("RGB", (60, 64)).save(tmp_path / "odd.png")
    Image.new("L", (32, 32)).save(tmp_path / "small.png")
    values = {"tmp": tmp_path, "photo": pictures[0], "mask": pictures[1], "model": tiny_sd1}
    code, _, err = run_cli("generate", "--model", tiny_sd1, "--prompt", PROMPT, *[a.format(**values) for a in args],
                           "--out", tmp_path / "o")
    assert code == 2 and err.startswith("finetune: error: " + message.format(**values)) and err.count("\n") == 1
    assert not (tmp_path / "o").exists()
