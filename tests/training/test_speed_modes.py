"""train.mode presets, the autocast switch, the U-Net call that CUDA graphs replay, and NF4's errors.

The graphs themselves and NF4 need a GPU (BENCHMARKS.md has their figures); here: which switches a mode sets and
that explicit keys win, that the tensor-only U-Net call computes what the U-Net does (SD and SDXL conditioning),
when graphs are refused and why, and that a fast-mode run trains and says what it used.
"""
from __future__ import annotations

import json
import re

import pytest
import torch
from diffusers import UNet2DConditionModel

from finetune.cli import load_recipe_config
from finetune.config import MODES, TrainConfig
from finetune.errors import ConfigError
from finetune.training.accelerator import make_accelerator
from finetune.training.unet_call import UNetForward, UNetOnTensors, graphs_usable
from tests.helpers import tiny_overrides

SD15 = "recipes/configs/sd15_dreambooth_lora.yaml"
SDXL = "recipes/configs/sdxl_dreambooth_lora.yaml"


def test_fast_mode_sets_its_switches_and_explicit_keys_win():
    cfg = load_recipe_config(SD15, ["train.mode=fast"])[1]
    assert (cfg.train.mixed_precision, cfg.train.autocast, cfg.train.cuda_graphs, cfg.train.optimizer) == \
        ("bf16", False, True, "adamw")
    assert cfg.model.quantize_unet == "none" and cfg.train.gradient_checkpointing is False
    mine = load_recipe_config(SD15, ["train.mode=fast", "train.optimizer=adamw8bit", "train.cuda_graphs=false"])[1]
    assert mine.train.optimizer == "adamw8bit" and mine.train.cuda_graphs is False and mine.train.autocast is False
    # SD's recipe adds the channels-last U-Net to fast mode (measured faster on SD 1.5, slower on SDXL); only there
    assert cfg.train.channels_last and not load_recipe_config(SD15, ["train.mode=custom"])[1].train.channels_last
    assert not load_recipe_config(SD15, ["train.mode=low_memory"])[1].train.channels_last
    assert not load_recipe_config(SD15, ["train.mode=fast", "train.channels_last=false"])[1].train.channels_last
    xl = load_recipe_config(SDXL, ["train.mode=fast"])[1]
    assert not xl.train.channels_last and xl.train.cuda_graphs and xl.train.mixed_precision == "bf16"


def test_low_memory_mode_checkpoints_and_quantizes_and_custom_changes_nothing():
    low = load_recipe_config(SD15, ["train.mode=low_memory"])[1]
    assert low.model.quantize_unet == "nf4_all" and low.train.gradient_checkpointing
    assert low.train.optimizer == "adamw8bit"
    # SDXL's recipe takes the same preset (its nf4_all run: 4023 MiB against nf4's 4363); a key set by hand wins
    low_xl = load_recipe_config(SDXL, ["train.mode=low_memory"])[1]
    preset = MODES["low_memory"]["train"]
    assert low_xl.model.quantize_unet == "nf4_all" and len(preset) == 7
    assert {key: getattr(low_xl.train, key) for key in preset} == {key: getattr(low.train, key) for key in preset}
    assert load_recipe_config(SD15, ["train.mode=low_memory", "model.quantize_unet=nf4"])[1].model.quantize_unet \
        == "nf4"
    assert load_recipe_config(SD15, [])[1].train.mode == "fast"  # the shipped SD configs choose fast
    custom = load_recipe_config(SD15, ["train.mode=custom"])[1]
    assert (custom.train.autocast, custom.train.cuda_graphs, custom.train.mixed_precision, custom.model.quantize_unet) \
        == (True, False, "fp16", "none")


@pytest.mark.parametrize("overrides, message", [
    (["train.mode=turbo"], "train.mode: 'turbo' is not one of custom, fast, low_memory"),
    (["train.mode=custom", "train.cuda_graphs=true"], "train.cuda_graphs: needs train.autocast=false"),
    (["model.quantize_unet=int8"], "model.quantize_unet"),
])
def test_bad_speed_settings_fail_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_recipe_config(SD15, overrides)


def test_autocast_switch_reaches_accelerate(tmp_path):
    off = make_accelerator(TrainConfig(mixed_precision="no", autocast=False), tmp_path, "t")
    assert off.autocast_handler.enabled is False


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_tensor_only_call_equals_the_unet(tiny_sd1, tiny_sdxl, family):
    unet = UNet2DConditionModel.from_pretrained(tiny_sd1 if family == "sd1" else tiny_sdxl, subfolder="unet")
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 700])
    emb = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    added = ()
    if family == "sdxl":
        width = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        pooled = torch.randn(2, width, generator=g)
        added = (pooled, torch.tensor([[64., 64, 0, 0, 64, 64]] * 2))
    with torch.no_grad():
        direct = unet(x, t, emb, added_cond_kwargs={"text_embeds": added[0], "time_ids": added[1]} if added else None)
        wrapped = UNetOnTensors(unet)(x, t, emb, *added)
        through = UNetForward(unet, torch.float32, use_graphs=False)(x, t, emb, *added)
    assert torch.equal(direct.sample, wrapped) and torch.equal(wrapped, through)


def test_forward_casts_inputs_to_the_unet_precision(tiny_sd1):
    unet = UNet2DConditionModel.from_pretrained(tiny_sd1, subfolder="unet").to(torch.bfloat16)
    x, emb = torch.randn(1, 4, 8, 8), torch.randn(1, 77, unet.config.cross_attention_dim)
    with torch.no_grad():  # fp32 inputs into a bf16 U-Net without autocast would fail in the first convolution
        out = UNetForward(unet, torch.bfloat16, use_graphs=False)(x, torch.tensor([5]), emb)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


@pytest.mark.parametrize("device, processes, dropout, accumulation, shapes, reason", [
    ("cpu", 1, 0.0, 1, 1, "no CUDA GPU"),
    ("cuda", 2, 0.0, 1, 1, "single-process"),
    ("cuda", 1, 0.1, 1, 1, "LoRA dropout"),
    ("cuda", 1, 0.0, 2, 1, "gradient accumulation"),
    ("cuda", 1, 0.0, 1, 3, "batches come in 3 shapes (data.buckets)"),
])
def test_graphs_are_refused_with_the_reason(caplog, device, processes, dropout, accumulation, shapes, reason):
    assert not graphs_usable(True, torch.device(device), processes, dropout, accumulation, shapes)
    assert reason in caplog.text
    assert graphs_usable(True, torch.device("cuda"), 1, 0.0, 1)
    assert not graphs_usable(False, torch.device("cuda"), 1, 0.0, 1)


def test_fast_mode_run_trains_and_reports_what_it_used(tiny_sd1, photos, tmp_path, run_cli, caplog):
    code, _, err = run_cli("train", SD15, "train.mode=fast", *tiny_overrides(tiny_sd1, photos, tmp_path))
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["mode"] == "fast" and summary["cuda_graphs"] is False  # no GPU here: said so, trained eagerly
    assert summary["channels_last"] is True
    assert "train.cuda_graphs is off for this run: there is no CUDA GPU" in caplog.text
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without a GPU")
def test_nf4_without_a_gpu_is_one_line_and_writes_nothing(tiny_sd1, photos, tmp_path, run_cli):
    code, _, err = run_cli("train", SD15, "model.quantize_unet=nf4", *tiny_overrides(tiny_sd1, photos, tmp_path))
    assert code != 0
    assert "model.quantize_unet=nf4 needs a CUDA GPU" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "pytorch_lora_weights.safetensors").exists()


def test_graphs_record_once_replay_that_shape_and_fall_back_eagerly(tiny_sd1, monkeypatch, caplog):
    """fast mode's graph path on a (pretend) CUDA device: make_graphed_callables stands in with a recorder whose
    replays run the module; a second shape runs eagerly; a failed recording leaves the eager path, said once."""
    unet = UNet2DConditionModel.from_pretrained(tiny_sd1, subfolder="unet")
    unet.requires_grad_(False)
    events: list = []

    def record(module, samples, num_warmup_iters):
        events.append(("record", tuple(samples[0].shape)))
        return lambda *inputs: events.append("replay") or module(*inputs)
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", record)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    emb = torch.randn(1, 77, unet.config.cross_attention_dim)
    forward = UNetForward(unet, torch.float32, use_graphs=True)
    small, large = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        first, again = forward(small, torch.tensor([5]), emb), forward(small, torch.tensor([5]), emb)
        other = forward(large, torch.tensor([5]), emb)
        assert torch.equal(first, unet(small, 5, emb).sample) and torch.equal(first, again)
        assert torch.equal(other, unet(large, 5, emb).sample)
    assert events == [("record", (1, 4, 8, 8)), "replay", "replay"]  # the other shape: no recording, no replay
    assert forward.recording_seconds > 0  # timed, for the split's "graph recording"

    def failing(module, samples, num_warmup_iters):
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", failing)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    eager = UNetForward(unet, torch.float32, use_graphs=True)
    with torch.no_grad():
        assert torch.equal(eager(small, torch.tensor([5]), emb), first) and eager.use_graphs is False
    assert caplog.text.count("recording the U-Net as a CUDA graph failed (operation not permitted when stream is "
                             "capturing); training eagerly") == 1


def test_graph_recording_is_a_split_entry_of_its_own(tiny_sd1, photos, tmp_path, run_cli, monkeypatch, caplog):
    """The recipe's path with graphs on (a stand-in recorder that takes 0.3 s): the recording's time leaves the
    training phase for an entry of its own in phase_seconds, and the training line says it."""
    import time

    import finetune.training.unet_call as unet_call

    def record(module, samples, num_warmup_iters):
        time.sleep(0.3)
        return module
    monkeypatch.setattr(unet_call, "graphs_usable", lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", record)
    code, _, err = run_cli("train", SD15, *tiny_overrides(tiny_sd1, photos, tmp_path, **{
        "train.max_steps": 2, "prior.num_class_images": 0}))
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    split = summary["phase_seconds"]
    assert summary["cuda_graphs"] is True and 0.3 <= split["graph recording"] < 5
    assert list(split)[list(split).index("training") + 1] == "graph recording"
    # The training line gives the whole phase: its steps and the recording, which the split now holds apart.
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("training: ")]
    said = re.search(r"; ([0-9.]+) s of it recording the U-Net as CUDA graphs \(([0-9.]+) s\)", line)
    recorded, whole = (float(value) for value in said.groups())
    printed = 0.06 if whole < 10 else 0.6  # the line rounds to 0.1 s under 10 s, to 1 s above
    assert abs(recorded - split["graph recording"]) <= 0.06
    assert abs(whole - (split["training"] + split["graph recording"])) <= printed
