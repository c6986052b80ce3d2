"""`finetune export --fuse` for SD 2.x (v-prediction) and SDXL: a folder and an original-layout single file, each
reloaded and drawing what the unfused LoRA pipeline draws (SD 1.x: test_export_cli.py)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from finetune.config import ModelConfig
from finetune.family import resolve_family
from finetune.models import load_pipeline
from tests.helpers import random_lora

# Keys of the original layout the UIs read the text encoders from.
TEXT_KEYS = {
    "tiny_sd2": ["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight",
                 "cond_stage_model.model.positional_embedding"],
    "tiny_sdxl": ["conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
                  "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
                  "conditioner.embedders.1.model.text_projection", "model.diffusion_model.label_emb.0.0.weight"],
}


def images(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a photo of sks dog", num_inference_steps=2, guidance_scale=7.5, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


@pytest.mark.parametrize("model", ["tiny_sd2", "tiny_sdxl"])
def test_fused_folder_and_single_file_draw_like_the_lora(model, request, tmp_path, run_cli):
    base = request.getfixturevalue(model)
    # SDXL: the kohya file of a trained run; SD 2.x: a diffusers file with random up-weights
    lora = (request.getfixturevalue("trained_sdxl") / "run.safetensors" if model == "tiny_sdxl"
            else random_lora(base, tmp_path / "lora"))
    for out in (tmp_path / "fused", tmp_path / "fused.safetensors"):
        code, _, err = run_cli("export", lora, "--fuse", "--base", base, "--scale", 0.7, "--out", out)
        assert code == 0, err
    family = resolve_family(str(base))
    unfused = family.pipeline_class().from_pretrained(base)
    unfused.load_lora_weights(lora, adapter_name="x")
    unfused.set_adapters(["x"], [0.7])
    want = images(unfused)
    assert abs(want - images(family.pipeline_class().from_pretrained(base))).max() > 1e-3
    folder = load_pipeline(ModelConfig(pretrained=str(tmp_path / "fused")), family.pipeline_class())
    single = load_pipeline(ModelConfig(pretrained=str(tmp_path / "fused.safetensors"), single_file_config=str(base)),
                           family.pipeline_class())
    assert abs(want - images(folder)).max() < 1e-4
    assert abs(want - images(single)).max() < 1e-4
    tensors = load_file(tmp_path / "fused.safetensors")
    assert all(key in tensors for key in TEXT_KEYS[model])
    # The single file tells its family by itself (tensor shapes, and the prediction type in its header).
    assert resolve_family(str(tmp_path / "fused.safetensors")) == family
