"""The SDXL recipe on a tiny SDXL model: two buckets, captions, both text encoders, export and reload."""
from __future__ import annotations

import json
import logging
import math
import os
import signal

import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import load_file

from finetune.data.dataset import Example, LatentSource, SampleOrder, plan_batch
from finetune.export.diffusers_format import WEIGHT_NAME, finetune_metadata, read_header
from finetune.models import training_scheduler
from finetune.sdxl import SDXLPromptEmbeddings
from finetune.training.loss import DreamBoothObjective
from recipes import sdxl_dreambooth_lora
from tests.helpers import SDXL, add_wide_photo, objective, sdxl_overrides


@torch.no_grad()
def outputs(pipe_or_models):
    unet, te1, te2 = pipe_or_models
    g = torch.Generator().manual_seed(0)
    x, emb = torch.randn(2, 4, 8, 24, generator=g), torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    added = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.tensor([[96., 256, 4, 0, 64, 192]] * 2)}
    ids = torch.tensor([[512, 353, 112, 104, 111, 116, 367, 513] + [513] * 8])
    return (unet(x, torch.tensor([10, 600]), emb, added_cond_kwargs=added).sample, te1(ids)[0],
            te2(ids, output_hidden_states=True).hidden_states[-2], te2(ids)[0])


def test_cli_trains_two_buckets_with_captions_and_the_export_reloads_equal(tiny_sdxl, photos, tmp_path, run_cli,
                                                                          monkeypatch):
    add_wide_photo(photos)
    results = []
    real_main = sdxl_dreambooth_lora.main
    monkeypatch.setattr(sdxl_dreambooth_lora, "main", lambda cfg: results.append(real_main(cfg)))
    code, _, err = run_cli("train", SDXL, *sdxl_overrides(tiny_sdxl, photos, tmp_path, **{
        "lora.text_encoder": "true", "lora.rank": 2, "lora.alpha": 4, "data.caption_dropout": 0.2,
        "validation.prompts": "[a photo of sks cat]", "validation.every": 3, "validation.num_images": 1,
        "validation.steps": 2}))
    assert code == 0, err
    result = results[0]
    samples = tmp_path / "run" / "samples"
    for name, kinds in (("step-000003.png", [True]), ("before_after.png", [False, True])):  # labelled grids
        cells = json.loads(Image.open(samples / name).text["finetune"])["grid"]
        assert [c["lora"] for c in cells] == kinds and all(c["box"][2:] == [128, c["box"][1] + 128] for c in cells)
    card = (tmp_path / "run" / "README.md").read_text()  # the model card shows the base-vs-LoRA grid
    assert "![samples](samples/before_after.png)" in card and "StableDiffusionXLPipeline" in card
    meta = finetune_metadata(result.export)
    assert json.loads(meta["buckets"]) == ["128x128", "192x64"] and meta["recipe"] == "sdxl_dreambooth_lora"
    adapters = json.loads(read_header(result.export)["lora_adapter_metadata"])
    assert adapters["unet.lora_alpha"] == 4 and adapters["text_encoder_2.r"] == 2
    keys = load_file(result.export)
    assert any(k.startswith("text_encoder_2.") for k in keys) and any(k.startswith("text_encoder.") for k in keys)
    kohya = load_file(tmp_path / "run" / "run.safetensors")  # the shipped config also writes the UIs' file
    assert {k.split("_", 2)[1] for k in kohya} == {"unet", "te1", "te2"}

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    base = outputs((pipe.unet, pipe.text_encoder, pipe.text_encoder_2))
    pipe.load_lora_weights(result.export.parent)
    got = outputs((pipe.unet, pipe.text_encoder, pipe.text_encoder_2))
    want = outputs((result.unet, *result.text_encoders))
    for g, w, b in zip(got, want, base):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5)
        assert (g - b).abs().max() > 1e-5, "the LoRA changed nothing"


def test_prompt_embeddings_match_the_pipeline_and_time_ids_come_from_the_crop(tiny_sdxl, photos):
    add_wide_photo(photos)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    encoders, tokenizers = [pipe.text_encoder, pipe.text_encoder_2], [pipe.tokenizer, pipe.tokenizer_2]
    prompts = SDXLPromptEmbeddings(tokenizers, encoders, ["a photo of sks cat", ""], True, "cpu")
    embeds, pooled = prompts(["a photo of sks cat", ""])
    want, _, want_pooled, _ = pipe.encode_prompt(["a photo of sks cat", ""], device="cpu",
                                                 do_classifier_free_guidance=False)
    torch.testing.assert_close(embeds, want)
    torch.testing.assert_close(pooled, want_pooled)

    calls = []

    def spy(noisy, t, emb, pooled, ids):  # the recipe's U-Net call: (noisy, t, embeddings, pooled, time ids)
        calls.append({"text_embeds": pooled, "time_ids": ids})
        return pipe.unet(noisy, t, emb, added_cond_kwargs=calls[-1]).sample

    examples = [Example(photos / "wide.jpg", "sks cat, lying in the grass"), Example(photos / "cat_1.jpg", "p")]
    buckets = [(192, 64), (128, 128)]
    latents = LatentSource(pipe.vae, examples, 128, True, True, "cpu",
                           keys={(i, flip, b) for i, b in enumerate(buckets) for flip in (False, True)})
    plan = plan_batch(SampleOrder(0, 1, 2, random_flip=True, buckets=[(192, 64), (128, 128)]), 0)
    plan.instance, plan.size, plan.flips = [0], (192, 64), [True]
    text = ["sks cat, lying in the grass"]
    objective(spy, training_scheduler(pipe), latents, SDXLPromptEmbeddings(tokenizers, encoders, text, True, "cpu"),
              examples, sdxl=True)(plan)
    # 256x96 -> 192x72, cropped 4 px from the top; flipped, the left edge stays 0 (no spare columns)
    assert calls[0]["time_ids"].tolist() == [[96, 256, 4, 0, 64, 192]]
    assert calls[0]["text_embeds"].shape == (1, 32)


def test_sdxl_shares_the_guard_the_signal_handling_the_protected_output_and_exact_resume(
        tiny_sdxl, photos, tmp_path, run_cli, monkeypatch, caplog):
    """Step 2's loss is NaN (skipped), SIGINT arrives during step 3 (saved, exit 130); the folder is protected;
    the resumed run ends bitwise equal to one never stopped, with buckets, flips and caption dropout."""
    add_wide_photo(photos)
    caplog.set_level(logging.INFO, logger="finetune")
    real, calls = DreamBoothObjective.__call__, []

    def nan_at_two(interrupt_at=None):
        def step(*args, **kwargs):
            calls.append(1)
            if len(calls) == interrupt_at:
                os.kill(os.getpid(), signal.SIGINT)
            loss, parts = real(*args, **kwargs)
            return (loss * math.nan if len(calls) == 2 else loss), parts
        return step

    common = sdxl_overrides(tiny_sdxl, photos, tmp_path, **{
        "train.max_steps": 4, "data.random_flip": "true", "data.caption_dropout": 0.3, "export.kohya": "false"})
    monkeypatch.setattr(DreamBoothObjective, "__call__", nan_at_two())
    code, _, err = run_cli("train", SDXL, *common, f"output_dir={tmp_path / 'straight'}")
    assert code == 0, err
    assert "step 2 had a NaN/Inf loss or gradient; skipped it (1 in a row)" in caplog.text

    calls.clear()
    monkeypatch.setattr(DreamBoothObjective, "__call__", nan_at_two(interrupt_at=3))
    run = tmp_path / "run"
    code, _, err = run_cli("train", SDXL, *common)
    assert code == 130 and err.splitlines()[-1].startswith(
        f"finetune: error: interrupted by SIGINT after step 3; saved {run}/checkpoints/step-000003")

    monkeypatch.undo()
    code, _, err = run_cli("train", SDXL, *common)
    assert code == 2 and f"output_dir {run} holds checkpoints of an earlier run" in err
    caplog.clear()
    code, _, err = run_cli("train", SDXL, *common, "train.resume=latest")
    assert code == 0, err
    assert "at step 3 (6 samples seen)" in caplog.text
    assert "done: 4 steps (1 this run), 0 skipped (NaN/Inf)" in caplog.text
    assert json.loads((run / "train_summary.json").read_text())["steps"] == 4
    want, got = load_file(tmp_path / "straight" / WEIGHT_NAME), load_file(run / WEIGHT_NAME)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
