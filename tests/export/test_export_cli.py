"""Through the CLI and the recipe: kohya file + model card at the end of a run, conversion both ways,
continuing training from either format, fusing into a folder or a single file, and the offline Hub error."""
from __future__ import annotations

import pytest
import torch
import yaml
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from finetune.config import ModelConfig
from finetune.export.diffusers_format import read_header
from finetune.export.lora_weights import read_lora
from finetune.models import load_pipeline
from tests.helpers import SD15, tiny_overrides
from tests.helpers import TRAINED_SD1 as RUN


@pytest.fixture(scope="module")
def trained(trained_sd1):
    return trained_sd1  # shared with the other tests that read one trained SD 1.x run


def test_run_writes_kohya_file_and_model_card(trained, tiny_sd1):
    kohya = trained / "run.safetensors"
    header = read_header(kohya)
    assert header["ss_network_dim"] == "2" and header["ss_network_alpha"] == "6"
    assert header["ss_sd_model_name"] == str(tiny_sd1) and header["ss_max_train_steps"] == "2"
    assert header["modelspec.trigger_phrase"] == "a photo of sks dog" and header["ss_num_train_images"] == "5"
    tensors = load_file(kohya)
    assert all(v.item() == 6.0 for k, v in tensors.items() if k.endswith(".alpha"))
    assert tensors["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"].dtype == torch.float16
    card = (trained / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["base_model"] == str(tiny_sd1) and meta["instance_prompt"] == "a photo of sks dog"
    # The tiny base model has no card and no license metadata: the card states no license and says so.
    assert "lora" in meta["tags"] and "license" not in meta
    assert "License: not found in the base model's card or metadata" in body
    assert "| rank | 2 |" in body and "load_lora_weights" in body and "<lora:run:1>" in body


def test_convert_both_ways_keeps_weights(trained, tmp_path, run_cli):
    code, out, err = run_cli("export", trained, "--format", "kohya", "--precision", "fp32",
                             "--out", tmp_path / "k.safetensors")
    assert code == 0, err
    code, out, err = run_cli("export", tmp_path / "k.safetensors", "--format", "diffusers", "--out", tmp_path / "d")
    assert code == 0, err
    original, back = read_lora(trained), read_lora(tmp_path / "d")
    assert back.alpha == original.alpha == {"unet": 6.0, "text_encoder": 6.0}
    assert all(torch.equal(original.layers[c][k], back.layers[c][k]) for c in original.layers
               for k in original.layers[c])
    assert read_header(tmp_path / "d" / "pytorch_lora_weights.safetensors")["finetune.trigger"] == "a photo of sks dog"
    code, _, err = run_cli("export", trained, "--format", "kohya", "--out", tmp_path / "folder")
    assert code == 2 and "ending in .safetensors" in err


@pytest.mark.parametrize("source", ["diffusers", "kohya"])
def test_training_continues_from_either_format(source, trained, tiny_sd1, photos, tmp_path, run_cli):
    init = trained if source == "diffusers" else trained / "run.safetensors"
    overrides = tiny_overrides(tiny_sd1, photos, tmp_path, **{**RUN, "train.max_steps": 1,
                                                               "train.learning_rate": 1e-12, "lora.init_from": init})
    code, _, err = run_cli("train", SD15, *overrides)
    assert code == 0, err
    start, end = read_lora(trained), read_lora(tmp_path / "run")
    tolerance = 1e-3 if source == "kohya" else 1e-6  # the kohya file is fp16
    assert all((start.layers[c][k] - end.layers[c][k]).abs().max() < tolerance for c in start.layers
               for k in start.layers[c])


def test_init_from_mismatch_is_one_line(trained, tiny_sd1, photos, tmp_path, run_cli):
    overrides = tiny_overrides(tiny_sd1, photos, tmp_path, **{**RUN, "lora.rank": 4, "lora.init_from": trained})
    code, _, err = run_cli("train", SD15, *overrides)
    assert code == 2 and "lora.rank=2" in err
    overrides = tiny_overrides(tiny_sd1, photos, tmp_path, **{**RUN, "lora.unet_targets": "all_attention",
                                                               "lora.init_from": trained})
    code, _, err = run_cli("train", SD15, *overrides)
    assert code == 2 and "lora.unet_targets" in err


def test_fused_model_reproduces_the_lora_pipeline(trained, tiny_sd1, tmp_path, run_cli):
    for out in (tmp_path / "fused", tmp_path / "fused.safetensors"):
        code, _, err = run_cli("export", trained / "run.safetensors", "--fuse", "--base", tiny_sd1,
                               "--scale", 0.7, "--out", out)
        assert code == 0, err
    lora = StableDiffusionPipeline.from_pretrained(tiny_sd1)
    lora.load_lora_weights(trained / "run.safetensors", adapter_name="x")
    lora.set_adapters(["x"], [0.7])
    plain = StableDiffusionPipeline.from_pretrained(tiny_sd1)

    def images(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe("a photo of sks dog", num_inference_steps=2, height=64, width=64, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    want = images(lora)
    assert abs(want - images(plain)).max() > 1e-3
    folder = load_pipeline(ModelConfig(pretrained=str(tmp_path / "fused")))
    single = load_pipeline(ModelConfig(pretrained=str(tmp_path / "fused.safetensors"),
                                       single_file_config=str(tiny_sd1)))
    assert abs(want - images(folder)).max() < 1e-4
    assert abs(want - images(single)).max() < 1e-4
    assert "model.diffusion_model.input_blocks.1.1.proj_in.weight" in load_file(tmp_path / "fused.safetensors")


def test_push_to_hub_offline_is_one_line_and_keeps_files(tiny_sd1, photos, tmp_path, run_cli, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    overrides = tiny_overrides(tiny_sd1, photos, tmp_path, **{**RUN, "train.max_steps": 1,
                                                               "export.push_to_hub": "someone/dog-lora"})
    code, _, err = run_cli("train", SD15, *overrides)
    assert code == 2 and "export.push_to_hub" in err and "someone/dog-lora" in err
    assert err.strip().splitlines()[-1].startswith("finetune: error: export.push_to_hub")  # one line, no traceback
    names = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"pytorch_lora_weights.safetensors", "run.safetensors", "README.md"} <= names
