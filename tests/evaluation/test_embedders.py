"""The metrics through the real models' code path (transformers' CLIP and ViT, tiny random weights) on images
whose answer is known."""
import pytest
import torch
from PIL import Image, ImageOps
from transformers import CLIPModel, CLIPTokenizer

from finetune.demo import subject_photo
from finetune.errors import ConfigError, FinetuneError
from finetune.evaluation.embedders import load_clip, load_dino
from finetune.evaluation.scoring import SubjectScorer


@pytest.fixture(scope="module")
def scorer(tiny_clip, tiny_dino):
    cat = subject_photo()  # a real photo: scikit-image's chelsea
    return SubjectScorer(load_dino(str(tiny_dino), "cpu"), load_clip(str(tiny_clip), "cpu"),
                         [cat.crop((80, 0, 380, 300))])


def test_identical_images_score_one_and_the_subject_beats_another_image(scorer):
    cat = subject_photo().crop((80, 0, 380, 300))
    other = ImageOps.mirror(Image.effect_mandelbrot((300, 300), (-2, -1.5, 1, 1.5), 60).convert("RGB"))
    same = scorer.subject_scores(scorer.embed([cat]), ["a cat"])
    different = scorer.subject_scores(scorer.embed([other]), ["a cat"])
    assert same["dino"] == pytest.approx(1.0, abs=1e-6) and same["clip_i"] == pytest.approx(1.0, abs=1e-6)
    assert different["dino"] < same["dino"] and different["clip_i"] < same["clip_i"]
    drift = scorer.drift_scores(scorer.embed([cat, other]), scorer.embed([cat, other]))
    assert drift["class_dino_base"] == pytest.approx(1.0, abs=1e-6)
    assert drift["class_clip_i_base"] == pytest.approx(1.0, abs=1e-6)
    assert drift["class_dino"] == pytest.approx((1.0 + different["dino"]) / 2, abs=1e-6)  # pairwise mean


def test_clip_t_matches_transformers_own_clip_similarity(scorer, tiny_clip):
    """Oracle: CLIPModel's forward (logits_per_image = scale x cosine) on the processor's pixels."""
    images = [subject_photo().crop((0, 0, 300, 300)), subject_photo().crop((150, 0, 450, 300))]
    texts = ["a cat on a sofa", "a cat in the jungle"]
    model, tokenizer = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPTokenizer.from_pretrained(tiny_clip)
    pixels = scorer.clip.processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(input_ids=tokenizer(texts, padding=True, return_tensors="pt")["input_ids"], pixel_values=pixels)
    cosines = out.logits_per_image / model.logit_scale.exp()
    expected = cosines.diagonal().mean().item()
    assert scorer.subject_scores(scorer.embed(images), texts)["clip_t"] == pytest.approx(expected, abs=1e-5)


def test_hub_models_offline_and_missing_folders_are_one_line_errors(tmp_path):
    with pytest.raises(FinetuneError) as info:
        load_dino("facebook/dino-vits16", "cpu")
    assert str(info.value) == (
        "eval.dino_model: facebook/dino-vits16 is neither a folder here nor in the local Hugging Face cache, and the "
        "Hub is offline here (HF_HUB_OFFLINE is set); fetch it once where you are online (hf download "
        "facebook/dino-vits16 --local-dir models/dino-vits16) and set eval.dino_model=models/dino-vits16")
    with pytest.raises(ConfigError, match=r"^eval.clip_model: folder /nowhere/clip does not exist"):
        load_clip("/nowhere/clip", "cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FinetuneError, match=r"^eval.clip_model: .*empty is not a loadable transformers model folder"):
        load_clip(str(tmp_path / "empty"), "cpu")
