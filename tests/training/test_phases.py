"""Issue 15's phase order on a tiny model: what is on the training device when, and the split in the summary.

On a CPU the training device and the CPU are one, so the test records every move of a pipeline module: `.to()`
with the run's torch.device puts it on the training device, `.to("cpu")` takes it off (the code's two spellings).
"""
from __future__ import annotations

import json

import torch
from diffusers import UNet2DConditionModel

from recipes import dreambooth_lora
from tests.helpers import tiny_overrides

SD15 = "recipes/configs/sd15_dreambooth_lora.yaml"


def spy_on_moves(monkeypatch, events: list, nf4_unet_from=None):
    """Record (module, 'on' | 'off') for each move of the pipeline's modules, and each phase's start."""
    real_load = dreambooth_lora.load_pipeline

    def load(*args, **kwargs):
        pipe = real_load(*args, **kwargs)
        for name, module in pipe.components.items():
            if isinstance(module, torch.nn.Module):
                watch(module, name)
        return pipe

    def watch(module, name):
        real_to = module.to

        def to(*args, **kwargs):
            target = args[0] if args else kwargs.get("device")
            if isinstance(target, torch.device):
                events.append((name, "on"))
            elif target == "cpu":
                events.append((name, "off"))
            return real_to(*args, **kwargs)
        module.to = to

    monkeypatch.setattr(dreambooth_lora, "load_pipeline", load)
    if nf4_unet_from is not None:  # the deferred-U-Net path, with a plain U-Net standing in for the 4-bit one
        import finetune.models as models

        def fake_nf4(model, compute_dtype):
            unet = UNet2DConditionModel.from_pretrained(nf4_unet_from, subfolder="unet")
            events.append(("unet", "loaded"))
            watch(unet, "unet")
            return unet
        monkeypatch.setattr(models, "check_nf4_possible", lambda model, source: None)
        monkeypatch.setattr(models, "load_nf4_unet", fake_nf4)
    real_phase = dreambooth_lora.start_run

    def start(cfg, recipe):
        run = real_start(cfg, recipe)
        clock_call = run.phases.__class__.__call__

        def phase(self, name):
            events.append(("phase", name))
            return clock_call(self, name)
        monkeypatch.setattr(run.phases.__class__, "__call__", phase)
        return run
    real_start = real_phase
    monkeypatch.setattr(dreambooth_lora, "start_run", start)


def first(events, event):
    return events.index(event)


def test_encoders_then_vae_then_unet_never_overlap_and_the_summary_has_the_split(tiny_sd1, photos, tmp_path, run_cli,
                                                                                   monkeypatch):
    events: list = []
    spy_on_moves(monkeypatch, events)
    code, _, err = run_cli("train", SD15, *tiny_overrides(tiny_sd1, photos, tmp_path, **{"train.max_steps": 2}))
    assert code == 0, err
    # Class images: the whole pipeline on, then off again before encoding starts.
    drawing = first(events, ("phase", "class images"))
    assert first(events, ("text_encoder", "off")) > drawing and first(events, ("unet", "off")) > drawing
    encoding = first(events, ("phase", "encoding"))
    after = events[encoding:]
    # Prompts first: the text encoder on and off again before the VAE comes on ...
    assert after.index(("text_encoder", "on")) < after.index(("text_encoder", "off")) < after.index(("vae", "on"))
    # ... the VAE off before the U-Net comes on, in the LoRA phase.
    assert after.index(("vae", "off")) < after.index(("phase", "LoRA and optimizer")) < after.index(("unet", "on"))
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert list(summary["phase_seconds"]) == ["start-up and imports", "loading weights", "class images", "encoding",
                                              "LoRA and optimizer", "training", "export"]
    assert all(seconds >= 0 for seconds in summary["phase_seconds"].values())


def test_a_deferred_4bit_unet_arrives_after_encoding_or_before_drawing(tiny_sd1, photos, tmp_path, run_cli,
                                                                        monkeypatch):
    events: list = []
    spy_on_moves(monkeypatch, events, nf4_unet_from=tiny_sd1)
    overrides = tiny_overrides(tiny_sd1, photos, tmp_path, **{"train.max_steps": 1, "model.quantize_unet": "nf4"})
    code, _, err = run_cli("train", SD15, *overrides)  # 4 class images to draw: the U-Net is loaded for drawing
    assert code == 0, err
    assert first(events, ("unet", "loaded")) < first(events, ("phase", "encoding"))
    assert ("unet", "loaded") not in events[:first(events, ("phase", "class images"))]

    events.clear()  # the class images exist now: no drawing, so the U-Net is loaded only after encoding
    code, _, err = run_cli("train", SD15, *overrides, f"output_dir={tmp_path / 'second'}")
    assert code == 0, err
    assert first(events, ("phase", "LoRA and optimizer")) < first(events, ("unet", "loaded"))
    assert events.count(("unet", "loaded")) == 1
