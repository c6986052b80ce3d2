"""The model-family resolver: every tiny family, configs shaped like the released models (folder and Hub id),
what it refuses, LoRA files, and the recipes refusing each other's models."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from finetune.errors import FinetuneError
from finetune.family import Family, family_of_lora, family_of_pipeline, resolve_family
from tests.helpers import SD15, SDXL, sdxl_overrides, tiny_overrides

# The fields the resolver reads, with the values of the released models' configs (the rest of each file is left
# out). SD 2.1's U-Net config is given without use_linear_projection, as some converted copies are.
UNET = {"sd15": {"in_channels": 4, "cross_attention_dim": 768, "attention_head_dim": 8},
        "sd21": {"in_channels": 4, "cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20]},
        "sdxl": {"in_channels": 4, "cross_attention_dim": 2048, "addition_embed_type": "text_time",
                 "projection_class_embeddings_input_dim": 2816},
        "refiner": {"in_channels": 4, "cross_attention_dim": 1280, "addition_embed_type": "text_time"},
        "inpainting": {"in_channels": 9, "cross_attention_dim": 768}}
CLIP_L = {"hidden_size": 768, "hidden_act": "quick_gelu", "num_hidden_layers": 12}
OPENCLIP_H = {"hidden_size": 1024, "hidden_act": "gelu", "num_hidden_layers": 23}
OPENCLIP_G = {"hidden_size": 1280, "hidden_act": "gelu", "num_hidden_layers": 32, "projection_dim": 1280}
REAL = {
    "sd15": ("StableDiffusionPipeline", {"text_encoder": CLIP_L}, {}),
    "sd21": ("StableDiffusionPipeline", {"text_encoder": OPENCLIP_H}, {"prediction_type": "v_prediction"}),
    "sd21-base": ("StableDiffusionPipeline", {"text_encoder": OPENCLIP_H}, {"prediction_type": "epsilon"}),
    "sdxl": ("StableDiffusionXLPipeline", {"text_encoder": CLIP_L, "text_encoder_2": OPENCLIP_G}, {}),
    "refiner": ("StableDiffusionXLImg2ImgPipeline", {"text_encoder_2": OPENCLIP_G}, {}),
    "inpainting": ("StableDiffusionInpaintPipeline", {"text_encoder": CLIP_L}, {}),
}


def real_configs(kind: str) -> dict[str, dict]:
    """model_index.json and the component configs of a released model of `kind`, by relative path."""
    pipeline, encoders, scheduler = REAL[kind]
    unet = UNET[kind.removesuffix("-base")]
    index = {"_class_name": pipeline, "unet": ["diffusers", "UNet2DConditionModel"],
             "scheduler": ["diffusers", "EulerDiscreteScheduler"], "vae": ["diffusers", "AutoencoderKL"]}
    for slot in ("text_encoder", "text_encoder_2"):
        index[slot] = ["transformers", "CLIPTextModel"] if slot in encoders else [None, None]
    files = {"model_index.json": index, "unet/config.json": unet, "scheduler/scheduler_config.json": scheduler}
    files.update({f"{slot}/config.json": config for slot, config in encoders.items()})
    return files


def write_files(root: Path, files: dict[str, dict]) -> Path:
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps(content))
    return root


def hub_cache(cache: Path, repo: str, files: dict[str, dict]) -> None:
    """`repo` as the Hub client caches it: refs/main names a snapshot holding the files."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    write_files(folder / "snapshots" / commit, files)


def test_every_tiny_family(tiny_sd1, tiny_sd2, tiny_sdxl):
    from finetune.config import ModelConfig
    from finetune.models import load_pipeline
    want = {tiny_sd1: Family("sd1"), tiny_sd2: Family("sd2", "v_prediction"), tiny_sdxl: Family("sdxl")}
    for folder, family in want.items():
        assert resolve_family(str(folder)) == family
        pipe = load_pipeline(ModelConfig(pretrained=str(folder)), family.pipeline_class())
        assert family_of_pipeline(pipe) == family
    assert [f.name for f in want.values()] == ["sd1", "sd2-v", "sdxl"]
    assert Family("sdxl").pipeline_class("img2img").__name__ == "StableDiffusionXLImg2ImgPipeline"


@pytest.mark.parametrize("kind, name, label", [
    ("sd15", "sd1", "an SD 1.x model"), ("sd21", "sd2-v", "an SD 2.x model (v-prediction)"),
    ("sd21-base", "sd2", "an SD 2.x model"), ("sdxl", "sdxl", "an SDXL base model"),
    ("inpainting", "sd1", "an SD 1.x inpainting model")])
def test_configs_shaped_like_the_released_models(tmp_path, kind, name, label):
    family = resolve_family(str(write_files(tmp_path, real_configs(kind))))
    assert (family.name, family.label) == (name, label)
    assert family.default_resolution == {"sd1": 512, "sd2": 512, "sd2-v": 768, "sdxl": 1024}[name]


def test_a_hub_id_is_read_from_its_configs_not_its_name(tmp_path, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    hub_cache(tmp_path, "someone/xl-turbo-v2", real_configs("sd15"))  # a name that suggests another family
    hub_cache(tmp_path, "someone/plain", real_configs("sdxl"))
    assert resolve_family("someone/xl-turbo-v2") == Family("sd1")
    assert resolve_family("someone/plain") == Family("sdxl")
    with pytest.raises(FinetuneError) as err:  # offline, and not in the cache
        resolve_family("someone/elsewhere", key="--base")
    assert str(err.value).startswith("--base: could not read the configs of someone/elsewhere from the Hub")


@pytest.mark.parametrize("kind, message", [
    ("refiner", "is an SDXL refiner"),
    ("sd3", "is StableDiffusion3Pipeline (SD3, Flux and other transformer models are not supported)"),
    ("kandinsky", "is no model finetune knows (text encoders 768 wide, U-Net cross-attention 768, addition "
                  "embedding image)"),
])
def test_unsupported_models_are_named_in_one_line(tmp_path, kind, message):
    if kind == "sd3":
        files = {"model_index.json": {"_class_name": "StableDiffusion3Pipeline",
                                      "transformer": ["diffusers", "SD3Transformer2DModel"]}}
    elif kind == "kandinsky":
        files = real_configs("sd15")
        files["unet/config.json"] = {**UNET["sd15"], "addition_embed_type": "image"}
    else:
        files = real_configs(kind)
    with pytest.raises(FinetuneError) as err:
        resolve_family(str(write_files(tmp_path, files)))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith(f"model.pretrained: {tmp_path}")


def test_lora_files_tell_their_family_by_widths_before_sd_scripts_headers():
    def layers(cross, text=None, second=False):
        out = {"unet": {"mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": torch.zeros(2, cross)}}
        if text:
            out["text_encoder"] = {"text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, text)}
        if second:
            out["text_encoder_2"] = {}
        return out
    assert family_of_lora(layers(768, 768), {}) == Family("sd1")
    # sd-scripts' header for an SD 2.x model whose U-Net config lacks use_linear_projection: the widths win.
    sd2_header = {"ss_base_model_version": "sd_v1", "ss_v2": "False", "ss_v_parameterization": "True"}
    assert family_of_lora(layers(1024, 1024), sd2_header) == Family("sd2", "v_prediction")
    assert family_of_lora(layers(2048), {}) == Family("sdxl")
    assert family_of_lora(layers(32, 32, second=True), {}) == Family("sdxl")
    assert family_of_lora(layers(32), {"finetune.family": "sd2-v"}) == Family("sd2", "v_prediction")
    assert family_of_lora(layers(32), {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}) == Family("sdxl")
    assert family_of_lora(layers(32), {}) is None  # a tiny model's LoRA that says nothing


@pytest.mark.parametrize("config, model, recipe_file", [(SD15, "tiny_sdxl", SDXL), (SDXL, "tiny_sd1", SD15)])
def test_each_recipe_refuses_the_other_familys_models(config, model, recipe_file, request, photos, tmp_path, run_cli):
    base = request.getfixturevalue(model)
    overrides = (tiny_overrides if config == SD15 else sdxl_overrides)(base, photos, tmp_path)
    code, _, err = run_cli("train", config, *overrides)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"finetune: error: model.pretrained: {base} is an ") and f"use {recipe_file}" in err
    assert not (tmp_path / "run").exists()  # refused before anything was written
