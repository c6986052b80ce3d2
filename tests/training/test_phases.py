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
            unet.is_quantized = True  # as diffusers marks a 4-bit model: it may be moved, never cast
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
    # ... and let go after drawing (4-bit weights are not moved to the CPU), loaded again only after encoding.
    lora_phase = first(events, ("phase", "LoRA and optimizer"))
    assert events.count(("unet", "loaded")) == 2 and ("unet", "loaded") in events[lora_phase:]
    assert ("unet", "on") not in events[first(events, ("phase", "encoding")):lora_phase]

    events.clear()  # the class images exist now: no drawing, so the U-Net is loaded only after encoding
    code, _, err = run_cli("train", SD15, *overrides, f"output_dir={tmp_path / 'second'}")
    assert code == 0, err
    assert first(events, ("phase", "LoRA and optimizer")) < first(events, ("unet", "loaded"))
    assert events.count(("unet", "loaded")) == 1


def test_each_phase_hands_its_cached_gpu_memory_back_before_the_next(monkeypatch):
    """PhaseClock on a (pretend) CUDA device: the peak is read, then the cache emptied, at the end of each phase."""
    from finetune.training.summary import PhaseClock
    calls: list = []
    reserved = iter([1000 * 2**20, 3000 * 2**20])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: calls.append("peak") or next(reserved))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty"))
    clock = PhaseClock(torch.device("cuda"))
    with clock("encoding"):
        calls.append("work")
    with clock("training"):
        calls.append("work")
    assert calls == ["reset", "work", "peak", "empty"] * 2
    assert clock.summary()["phase_peak_reserved_mib"] == {"encoding": 1000, "training": 3000}


def test_low_memory_draws_class_images_one_at_a_time_with_models_offloaded(tiny_sd1, monkeypatch):
    """prior.generation_offload on a GPU: diffusers' model CPU offload instead of the whole pipeline on the card;
    the VAE decodes in tiles with train.vae_tiling, and always one image at a time."""
    from diffusers import StableDiffusionPipeline

    from finetune.cli import load_recipe_config
    from finetune.training.distributed import place_for_drawing
    _, cfg = load_recipe_config(SD15, ["train.mode=low_memory"])
    assert cfg.prior.generation_batch_size == 1 and cfg.prior.generation_offload
    _, default = load_recipe_config(SD15, [])
    assert default.prior.generation_batch_size == 8 and not default.prior.generation_offload

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1, safety_checker=None)
    placed: list = []
    monkeypatch.setattr(pipe, "enable_model_cpu_offload", lambda device=None: placed.append(("offload", device)))
    monkeypatch.setattr(pipe, "to", lambda *args, **kwargs: placed.append(("to", args)))
    gpu = type("Accelerator", (), {"device": torch.device("cuda"), "mixed_precision": "bf16"})()
    loaded = place_for_drawing(pipe, gpu, offload=True, vae_tiling=True)
    assert placed == [("offload", torch.device("cuda"))] and pipe.vae.use_tiling
    # Only the VAE's fp32 weights are kept for afterwards: the others are used in bf16 later too.
    assert set(loaded) == {"vae"} and loaded["vae"]["decoder.conv_in.weight"].dtype == torch.float32
    assert pipe.unet.dtype == pipe.text_encoder.dtype == torch.bfloat16  # drawn in half precision
    placed.clear()
    place_for_drawing(pipe, gpu, offload=False, vae_tiling=False)
    assert placed == [("to", (torch.device("cuda"),))]


def test_class_images_decode_one_image_at_a_time(tiny_sd1, tmp_path):
    from diffusers import StableDiffusionPipeline

    from finetune.config import PriorConfig
    from finetune.data.class_images import generate_class_images
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1, safety_checker=None)
    batches = []
    pipe.vae.decoder.register_forward_hook(lambda module, args, out: batches.append(args[0].shape[0]))
    prior = PriorConfig(num_class_images=3, generation_batch_size=3, generation_steps=1)
    assert generate_class_images(pipe, tmp_path, "a dog", prior, 64, 0, torch.device("cpu")) == 3
    assert batches == [1, 1, 1] and len(list(tmp_path.glob("class-*.png"))) == 3


def test_tiled_vae_encodes_in_overlapping_tiles(tiny_sd1):
    """tile_vae(vae, 32) on a 64 px image: tiles start every 24 px (a quarter overlap), so 3 x 3 encoder calls."""
    from diffusers import AutoencoderKL

    from finetune.models import tile_vae
    vae = AutoencoderKL.from_pretrained(tiny_sd1, subfolder="vae")
    calls = []
    vae.encoder.register_forward_hook(lambda module, args, out: calls.append(tuple(args[0].shape[-2:])))
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        whole = vae.encode(image).latent_dist.mean
        tile_vae(vae, 32)
        tiled = vae.encode(image).latent_dist.mean
    assert calls[0] == (64, 64) and len(calls) == 1 + 9 and calls[1] == (32, 32)
    assert tiled.shape == whole.shape and not torch.equal(tiled, whole)


def test_low_memory_mode_turns_on_tiling_and_expandable_segments():
    """What the run then does with them: test_tiled_vae_encodes_in_overlapping_tiles and test_allocator.py."""
    from finetune.cli import load_recipe_config
    _, cfg = load_recipe_config(SD15, ["train.mode=low_memory"])
    assert cfg.train.vae_tiling and cfg.train.expandable_segments
    _, fast = load_recipe_config(SD15, ["train.mode=fast"])
    assert not fast.train.vae_tiling and not fast.train.expandable_segments


def test_drawing_in_half_precision_leaves_the_loaded_weights_to_the_phases_after_it(tiny_sd1, photos, tmp_path,
                                                                                   run_cli, monkeypatch):
    """A GPU draws class images in bf16 (generation_dtype); the fp32 VAE that encodes the photos afterwards, and the
    U-Net of a train.mixed_precision=no run, must hold the weights as loaded, not their bf16 roundings."""
    from diffusers import AutoencoderKL

    import finetune.training.distributed as distributed
    monkeypatch.setattr(distributed, "generation_dtype", lambda device, mixed_precision: torch.bfloat16)
    seen = {}
    real_encode, real_add_lora = dreambooth_lora.encode_latents, dreambooth_lora.add_lora

    def encode(vae, *args):  # the weights the encoder computes with, read at its first call
        vae.encoder.register_forward_pre_hook(lambda module, inputs: seen.setdefault(
            "vae", {key: value.clone() for key, value in vae.state_dict().items()}) and None)
        return real_encode(vae, *args)

    def add_lora(pipe, *args):
        seen["unet"] = {key: value.clone() for key, value in pipe.unet.state_dict().items()}
        return real_add_lora(pipe, *args)
    monkeypatch.setattr(dreambooth_lora, "encode_latents", encode)
    monkeypatch.setattr(dreambooth_lora, "add_lora", add_lora)
    code, _, err = run_cli("train", SD15, *tiny_overrides(tiny_sd1, photos, tmp_path, **{"train.max_steps": 1}))
    assert code == 0, err
    assert len(list((tmp_path / "class_images").glob("class-*.png"))) == 4  # drawn in this run, in bf16
    loaded = {"vae": AutoencoderKL.from_pretrained(tiny_sd1, subfolder="vae").state_dict(),
              "unet": UNet2DConditionModel.from_pretrained(tiny_sd1, subfolder="unet").state_dict()}
    for model, weights in loaded.items():
        assert seen[model].keys() == weights.keys()
        for key, value in weights.items():
            assert seen[model][key].dtype == torch.float32 and torch.equal(seen[model][key], value), (model, key)
