"""data.masks through the CLI on the tiny model: the loss is the hand-computed masked MSE, a masked-out region
gets no gradient, class images stay unmasked, masks follow the photo's crop, flip and bucket, and data.masks=alpha
reads the photos' alpha channel."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import load_file

from finetune.data.dataset import Example, load_pixels
from finetune.data.masks import MaskSource, load_mask
from finetune.run_files import NO_EMA_WEIGHT_NAME
from finetune.training import loss as loss_module
from tests.helpers import add_wide_photo, sdxl_overrides, tiny_overrides

SD15 = "recipes/configs/sd15_dreambooth_lora.yaml"
SDXL = "recipes/configs/sdxl_dreambooth_lora.yaml"


def subject_photos(folder, photos, size=(64, 64)) -> list[str]:
    """The cat photos at exactly `size` (so no resize moves the mask's edge), as PNG."""
    folder.mkdir()
    names = []
    for path in sorted(photos.glob("cat_*.jpg"))[:3]:
        Image.open(path).convert("RGB").resize(size).save(folder / f"{path.stem}.png")
        names.append(path.stem)
    return names


def half_masks(folder, names, size=(64, 64)) -> None:
    """Left half black (background), right half white (subject): on the latent grid (1/8), columns 0-3 and 4-7."""
    folder.mkdir()
    array = np.zeros((size[1], size[0]), dtype=np.uint8)
    array[:, size[0] // 2:] = 255
    for name in names:
        Image.fromarray(array, mode="L").save(folder / f"{name}.png")


@pytest.fixture
def spy(monkeypatch):
    """Every call of the loss: its prediction (whose gradient the loop's backward fills), target, pixel weights and
    returned loss."""
    calls, real = [], loss_module.prior_preservation_loss

    def recording(prediction, target, num_instance, prior_weight, weights=None, pixel_weights=None):
        prediction.retain_grad()
        loss, parts = real(prediction, target, num_instance, prior_weight, weights, pixel_weights)
        calls.append({"prediction": prediction, "target": target.detach().clone(), "pixel_weights": pixel_weights,
                      "num_instance": num_instance, "loss": loss.detach().clone()})
        return loss, parts

    monkeypatch.setattr(loss_module, "prior_preservation_loss", recording)
    return calls


@pytest.mark.parametrize("background", [0.0, 0.3])
def test_masked_loss_is_the_hand_computed_weighted_mse_and_the_background_gets_no_gradient(
        background, tiny_sd1, photos, tmp_path, run_cli, spy):
    names = subject_photos(tmp_path / "subject", photos)
    half_masks(tmp_path / "masks", names)
    overrides = tiny_overrides(tiny_sd1, tmp_path / "subject", tmp_path, **{
        "prior.num_class_images": 1, "prior.loss_weight": 0.5, "train.max_steps": 2, "train.batch_size": 1,
        "data.masks": tmp_path / "masks", "data.mask_weight": background})
    code, _, err = run_cli("train", SD15, *overrides)
    assert code == 0, err
    assert len(spy) == 2
    for call in spy:
        p, t = call["prediction"].detach().double(), call["target"].double()
        assert p.shape == (2, 4, 8, 8) and call["num_instance"] == 1  # the photo, then the class image
        w = torch.ones(1, 1, 8, 8, dtype=torch.float64)
        w[..., :4] = background  # the mask's black half, on the latent grid
        instance = (w * (p[:1] - t[:1]) ** 2).mean()
        prior = ((p[1:] - t[1:]) ** 2).mean()  # class images are not masked
        torch.testing.assert_close(call["loss"].double(), instance + 0.5 * prior, rtol=1e-6, atol=0)
        grad = call["prediction"].grad
        assert grad is not None and (grad[0, :, :, 4:] != 0).all() and (grad[1] != 0).all()
        if background == 0.0:
            assert torch.equal(grad[0, :, :, :4], torch.zeros_like(grad[0, :, :, :4]))  # masked out: no gradient
        else:
            torch.testing.assert_close(grad[0, :, :, :4], background * 2 * (p[0, :, :, :4] - t[0, :, :, :4]).float()
                                       / p[0].numel(), rtol=1e-5, atol=1e-12)


def test_masks_follow_random_crops_flips_and_buckets_uncached(tiny_sd1, photos, tmp_path, run_cli, spy, monkeypatch):
    """Uncached random crops with flips and buckets: each sample's weights are its mask cut and flipped as its
    photo was. The photos are their masks (grey = the mask's value), so weights and latent-grid means of the
    photo's own pixels must agree."""
    folder, masks = tmp_path / "subject", tmp_path / "masks"
    folder.mkdir(), masks.mkdir()
    rng = np.random.default_rng(0)
    for i, size in enumerate([(192, 64), (96, 96), (160, 160)]):  # a wide bucket (192x64) and square ones
        blocks = (rng.random((size[1] // 16, size[0] // 16)) > 0.5).astype(np.uint8) * 255
        mask = Image.fromarray(np.kron(blocks, np.ones((16, 16), dtype=np.uint8)), mode="L")
        mask.convert("RGB").save(folder / f"p{i}.png")
        mask.resize((size[0] // 2, size[1] // 2), Image.Resampling.NEAREST).save(masks / f"p{i}.png")  # half size
    seen = []
    real = loss_module.DreamBoothObjective.__call__

    def with_plan(self, plan):
        seen.append(plan)
        return real(self, plan)

    monkeypatch.setattr(loss_module.DreamBoothObjective, "__call__", with_plan)
    overrides = tiny_overrides(tiny_sd1, folder, tmp_path, **{
        "prior.num_class_images": 0, "train.max_steps": 6, "train.resolution": 128, "data.buckets": "true",
        "data.center_crop": "false", "data.random_flip": "true", "data.masks": masks, "data.mask_weight": 0.0})
    code, _, err = run_cli("train", SD15, *overrides)
    assert code == 0, err
    sizes, flips = set(), set()
    for plan, call in zip(seen, spy):
        example = Example(folder / f"p{plan.instance[0]}.png", "p")
        pixels, _ = load_pixels(example, plan.size, plan.flips[0], plan.crops[0])
        grey = (pixels[0] + 1) / 2  # the photo as the model saw it, where its mask is its own picture
        w, h = plan.size
        expected = torch.nn.functional.avg_pool2d(grey[None, None], 8)[0, 0]
        weights = call["pixel_weights"][0, 0]
        assert weights.shape == (h // 8, w // 8)
        error = (weights - expected).abs()  # the half-size mask, scaled up, against the photo: edges blur a pixel
        assert error.max() < 0.1 and error.mean() < 0.03
        sizes.add(plan.size), flips.add(plan.flips[0])
    assert (192, 64) in sizes and flips == {True, False}


def test_a_mask_is_cut_exactly_like_its_photo(tmp_path):
    """Photo and mask of one picture: for every bucket size, crop corner and flip, the same pixels come out."""
    picture = Image.fromarray((np.random.default_rng(1).random((90, 150)) * 255).astype(np.uint8), mode="L")
    picture.convert("RGB").save(tmp_path / "photo.png")
    picture.save(tmp_path / "mask.png")
    example, source = Example(tmp_path / "photo.png", "p"), MaskSource(tmp_path / "mask.png", False)
    for size in [(64, 64), (128, 64), (64, 128)]:
        for corner in [(0.0, 0.0), (0.5, 0.5), (1.0, 0.3)]:
            for flip in (False, True):
                pixels, _ = load_pixels(example, size, flip, corner)
                mask = load_mask(source, (150, 90), size, flip, corner)
                torch.testing.assert_close(mask[0], (pixels[0] + 1) / 2, rtol=0, atol=1e-6)


def test_alpha_channel_is_the_mask(tiny_sd1, photos, tmp_path, run_cli, spy):
    folder = tmp_path / "subject"
    names = subject_photos(folder, photos)
    for name in names:
        rgba = Image.open(folder / f"{name}.png").convert("RGBA")
        alpha = np.zeros((64, 64), dtype=np.uint8)
        alpha[:32] = 255  # the top half opaque: the subject
        rgba.putalpha(Image.fromarray(alpha, mode="L"))
        rgba.save(folder / f"{name}.png")
    overrides = tiny_overrides(tiny_sd1, folder, tmp_path, **{
        "prior.num_class_images": 0, "train.max_steps": 1, "data.masks": "alpha", "data.mask_weight": 0.1})
    code, _, err = run_cli("train", SD15, *overrides)
    assert code == 0, err
    weights = spy[0]["pixel_weights"][0, 0]
    want = torch.full((8, 8), 0.1)
    want[:4] = 1.0
    torch.testing.assert_close(weights, want, rtol=0, atol=1e-6)


def test_sdxl_trains_with_masks_in_buckets_and_an_ema_of_both_text_encoders(tiny_sdxl, photos, tmp_path, run_cli,
                                                                           spy):
    """The SDXL recipe takes both features through the shared loop: masked loss on its bucketed photos, and the
    EMA over U-Net and both text encoders' LoRA, the trained weights beside it, both loadable by diffusers."""
    add_wide_photo(photos)
    masks = tmp_path / "masks"
    masks.mkdir()
    for photo in sorted(photos.glob("*.jpg")):
        width, height = Image.open(photo).size
        array = np.zeros((height, width), dtype=np.uint8)
        array[:, : width // 2] = 255  # the left half is the subject
        Image.fromarray(array, mode="L").save(masks / f"{photo.stem}.png")
    code, _, err = run_cli("train", SDXL, *sdxl_overrides(tiny_sdxl, photos, tmp_path, **{
        "lora.text_encoder": "true", "lora.rank": 2, "lora.alpha": 4, "train.learning_rate": 5e-2,
        "train.ema_decay": 0.5, "data.masks": masks, "data.mask_weight": 0.25, "train.max_steps": 4}))  # an epoch
    assert code == 0, err
    for call in spy:  # every batch is masked, in its bucket's latent shape; the right half weighs 0.25
        weights = call["pixel_weights"]
        assert weights.shape[-2:] == call["prediction"].shape[-2:]
        assert torch.allclose(weights[..., -1], torch.tensor(0.25)) and torch.allclose(weights[..., 0], torch.ones(1))
    assert {tuple(c["prediction"].shape[-2:]) for c in spy} >= {(8, 24)}  # the wide photo's bucket, 192x64
    run = tmp_path / "run"
    ema, raw = load_file(run / "pytorch_lora_weights.safetensors"), load_file(run / NO_EMA_WEIGHT_NAME)
    assert ema.keys() == raw.keys() and {k.split(".")[0] for k in ema} == {"unet", "text_encoder", "text_encoder_2"}
    for part in ("unet.", "text_encoder.", "text_encoder_2."):
        assert any(not torch.equal(ema[k], raw[k]) for k in ema if k.startswith(part) and ".up." in k), part
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipe.load_lora_weights(run, weight_name=NO_EMA_WEIGHT_NAME)
    pipe.load_lora_weights(run, adapter_name="ema")  # the EMA file, by its default name
