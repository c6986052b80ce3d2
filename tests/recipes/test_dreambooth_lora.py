"""The DreamBooth-LoRA recipe end to end on a tiny SD model: train, export, reload, learn, resume."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from finetune.cli import load_recipe_config
from finetune.export.diffusers_format import finetune_metadata, read_header
from recipes import dreambooth_lora
from tests.helpers import tiny_overrides

SD15 = "recipes/configs/sd15_dreambooth_lora.yaml"


def unet_inputs(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 600])
    emb = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    return x, t, emb


@torch.no_grad()
def outputs(unet, text_encoder):
    x, t, emb = unet_inputs(unet)
    ids = torch.tensor([[512, 353, 112, 104, 111, 116, 367, 513] + [513] * 8])
    return unet(x, t, emb).sample, text_encoder(ids)[0]


def test_cli_trains_with_prior_and_text_encoder_lora_and_the_export_reloads(tiny_sd1, photos, tmp_path, run_cli):
    overrides = tiny_overrides(tiny_sd1, photos, tmp_path, **{"lora.text_encoder": "true", "lora.rank": 4,
                                                              "lora.alpha": 8, "train.max_steps": 6})
    code, _, err = run_cli("train", SD15, *overrides)
    assert code == 0, err
    run = tmp_path / "run"
    export = run / "pytorch_lora_weights.safetensors"
    assert export.is_file()
    assert len(list((tmp_path / "class_images").glob("*.png"))) == 4

    # The export's header says what it was made from.
    meta = finetune_metadata(export)
    assert meta["base_model"] == str(tiny_sd1) and meta["rank"] == "4" and meta["alpha"] == "8.0"
    assert meta["steps"] == "6" and meta["trigger"] == "a photo of sks dog" and meta["text_encoder"] == "true"
    assert meta["unet_targets"] == "cross_attention"
    adapters = json.loads(read_header(export)["lora_adapter_metadata"])
    assert adapters["unet.lora_alpha"] == 8 and adapters["text_encoder.r"] == 4
    keys = load_file(export)
    assert any(k.startswith("unet.") and "attn2.to_k" in k for k in keys)
    assert not any("attn1" in k for k in keys)  # cross-attention preset only
    assert any(k.startswith("text_encoder.") and "q_proj" in k for k in keys)

    # The trained weights (the checkpoint's LoRA state) through our own injection ...
    from finetune.config import LoraConfig
    from finetune.lora import add_text_encoder_lora, add_unet_lora, load_lora_state
    trained = StableDiffusionPipeline.from_pretrained(tiny_sd1)
    lora = LoraConfig(rank=4, alpha=8.0, text_encoder=True)
    add_unet_lora(trained.unet, lora)
    add_text_encoder_lora(trained.text_encoder, lora)
    checkpoint = run / "checkpoints" / "step-000006"
    load_lora_state(trained.unet, load_file(checkpoint / "lora_0.safetensors"))
    load_lora_state(trained.text_encoder, load_file(checkpoint / "lora_1.safetensors"))
    # ... against diffusers' loader reading the exported file: no unmatched keys, same outputs.
    reloaded = StableDiffusionPipeline.from_pretrained(tiny_sd1)
    base_unet, base_te = outputs(reloaded.unet, reloaded.text_encoder)
    logger = logging.getLogger("diffusers")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        reloaded.load_lora_weights(run)
    finally:
        logger.removeHandler(handler)
    assert not [r for r in records if "unexpected" in r.getMessage().lower() or "missing" in r.getMessage().lower()]
    want_unet, want_te = outputs(trained.unet, trained.text_encoder)
    got_unet, got_te = outputs(reloaded.unet, reloaded.text_encoder)
    torch.testing.assert_close(got_unet, want_unet, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_te, want_te, rtol=0, atol=1e-5)
    assert (got_unet - base_unet).abs().max() > 1e-4, "the LoRA changed nothing in the U-Net"
    assert (got_te - base_te).abs().max() > 1e-4, "the LoRA changed nothing in the text encoder"

    # A second run reuses the class images instead of generating new ones.
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "class_images").glob("*.png")}
    code, _, err = run_cli("train", SD15, *overrides, f"output_dir={tmp_path / 'run2'}", "train.max_steps=1")
    assert code == 0, err
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "class_images").glob("*.png")} == stamps


def test_recipe_result_equals_the_reloaded_export_with_alpha_not_rank(tiny_sd2, photos, tmp_path):
    """v-prediction SD2-style model, all-attention preset, alpha=3 x rank: the scale must survive the file."""
    _, cfg = load_recipe_config(SD15, tiny_overrides(tiny_sd2, photos, tmp_path, **{
        "lora.rank": 2, "lora.alpha": 6, "lora.unet_targets": "all_attention", "lora.text_encoder": "true",
        "prior.num_class_images": 0, "train.max_steps": 3}))
    result = dreambooth_lora.main(cfg)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd2)
    pipe.load_lora_weights(result.export.parent)
    for got, want in zip(outputs(pipe.unet, pipe.text_encoder), outputs(result.unet, result.text_encoder)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert finetune_metadata(result.export)["prediction_type"] == "v_prediction"
    assert any("attn1" in k for k in load_file(result.export))


def test_training_lowers_the_instance_denoising_loss(tiny_sd1, photos, tmp_path):
    from finetune.data.dataset import instance_examples
    from finetune.evaluate import instance_denoising_loss
    from finetune.models import training_scheduler

    _, cfg = load_recipe_config(SD15, tiny_overrides(tiny_sd1, photos, tmp_path, **{
        "prior.num_class_images": 0, "lora.unet_targets": "all_attention", "lora.rank": 8, "lora.alpha": 8,
        "train.max_steps": 40, "train.learning_rate": 1e-2, "train.batch_size": 5}))  # 0.62x the loss here
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1)
    examples, scheduler = instance_examples(cfg.data), training_scheduler(pipe)
    parts = (pipe.tokenizer, pipe.vae, scheduler, examples, 64)
    before = instance_denoising_loss(pipe.unet, pipe.text_encoder, *parts)
    result = dreambooth_lora.main(cfg)
    after = instance_denoising_loss(result.unet, result.text_encoder, *parts)
    assert after < 0.7 * before, (before, after)
    # Fixed draws: the same model scores the same.
    assert instance_denoising_loss(pipe.unet, pipe.text_encoder, *parts) == before


def test_resume_continues_at_the_saved_step_with_the_saved_optimizer(tiny_sd1, photos, tmp_path, run_cli, caplog):
    common = tiny_overrides(tiny_sd1, photos, tmp_path, **{"train.checkpoint_every": 3, "lora.text_encoder": "true",
                                                           "train.gradient_accumulation": 2})
    straight = tmp_path / "straight"
    code, _, err = run_cli("train", SD15, *common, "train.max_steps=6", f"output_dir={straight}")
    assert code == 0, err
    resumed = tmp_path / "resumed"
    code, _, err = run_cli("train", SD15, *common, "train.max_steps=3", f"output_dir={resumed}")
    assert code == 0, err
    # Without resume=, a folder holding checkpoints is refused rather than overwritten.
    code, _, err = run_cli("train", SD15, *common, "train.max_steps=6", f"output_dir={resumed}")
    assert code == 2 and "train.resume=latest" in err
    caplog.set_level(logging.INFO, logger="finetune")
    code, _, err = run_cli("train", SD15, *common, "train.max_steps=6", f"output_dir={resumed}",
                           "train.resume=latest")
    assert code == 0, err
    assert "resumed from" in caplog.text and "at step 3" in caplog.text
    a = load_file(straight / "pytorch_lora_weights.safetensors")
    b = load_file(resumed / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    for key in a:  # identical only if step count, data order, optimizer moments and LR schedule all carried over
        assert torch.equal(a[key], b[key]), key
    # The saved optimizer state is what the resumed run started from: Adam's moments were loaded, not reset.
    saved = torch.load(resumed / "checkpoints" / "step-000003" / "optimizer.bin", weights_only=True)
    assert saved["state"] and all(s["step"] == 3 for s in saved["state"].values())


@pytest.mark.parametrize("change, message", [
    ({"data.instance_dir": "{tmp}/missing"}, "data.instance_dir: folder {tmp}/missing does not exist"),
    ({"data.instance_dir": "{tmp}/empty"}, "data.instance_dir: {tmp}/empty has no photos"),
    ({"model.pretrained": "{tmp}/no-such-model"}, "model.pretrained: {tmp}/no-such-model does not exist"),
    ({"model.pretrained": "{tmp}/empty"}, "model.pretrained: {tmp}/empty is a folder without model_index.json"),
    ({"model.pretrained": "{tmp}/model.ckpt"}, "model.pretrained: {tmp}/model.ckpt is a pickle file"),
])
def test_bad_paths_fail_with_one_line_naming_them(tiny_sd1, photos, tmp_path, run_cli, change, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x02")
    overrides = tiny_overrides(tiny_sd1, photos, tmp_path)
    overrides += [f"{k}={v.format(tmp=tmp_path)}" for k, v in change.items()]
    code, _, err = run_cli("train", SD15, *overrides)
    assert code == 2
    assert err.startswith("finetune: error: " + message.format(tmp=tmp_path)), err
    assert err.count("\n") == 1


def test_uncached_random_crops_checkpointing_accumulation_keep_last_and_logs(tiny_sd1, photos, tmp_path, run_cli,
                                                                              caplog):
    caplog.set_level(logging.WARNING, logger="finetune")
    overrides = tiny_overrides(tiny_sd1, photos, tmp_path, **{
        "data.center_crop": "false", "data.random_flip": "true", "train.cache_text_embeddings": "false",
        "train.gradient_checkpointing": "true", "lora.text_encoder": "true", "train.gradient_accumulation": 2,
        "train.checkpoint_every": 1, "train.keep_checkpoints": 2, "train.mixed_precision": "fp16",
        "train.optimizer": "adamw8bit", "train.lr_scheduler": "cosine", "train.lr_warmup_steps": 1})
    code, _, err = run_cli("train", SD15, *overrides)
    assert code == 0, err
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000003", "step-000004"]
    assert (run / "checkpoints" / "step-000003" / "pytorch_lora_weights.safetensors").is_file()
    assert list((run / "logs").rglob("events.out.tfevents.*")), "no TensorBoard events written"
    if not torch.cuda.is_available():
        assert "falls back to fp32" in caplog.text and "bitsandbytes 8-bit AdamW needs a CUDA GPU" in caplog.text


def test_run_summary_reports_speed_and_optimizer_state(tiny_sd1, photos, tmp_path, run_cli):
    code, _, err = run_cli("train", SD15, *tiny_overrides(tiny_sd1, photos, tmp_path, **{
        "prior.num_class_images": 0, "train.max_steps": 6}))
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["steps"] == 6 and summary["timed_steps"] == 3 and summary["steady_it_per_s"] > 0
    assert summary["optimizer"] == "AdamW" and summary["trained_params"] > 0
    assert 7.9 < summary["optimizer_state_bytes_per_param"] < 8.1  # fp32 exp_avg + exp_avg_sq
