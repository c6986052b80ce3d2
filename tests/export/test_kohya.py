"""The kohya file: key names, true alpha, header metadata, and diffusers reading it exactly like our
diffusers-format file (SD 1.x and SDXL, alpha != rank)."""
from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import load_file, save_file

from finetune.config import LoraConfig
from finetune.export.convert import export_kohya
from finetune.export.diffusers_format import read_header, save_diffusers_lora
from finetune.export.lora_weights import read_lora, weights_from_models
from finetune.family import Family
from finetune.lora import add_text_encoder_lora, add_unet_lora

LORA = LoraConfig(rank=4, alpha=8.0, text_encoder=True, unet_targets="all_attention")
IDS = torch.tensor([[512, 353, 112, 104, 111, 116] + [513] * 10])


def lora_pipeline(cls, folder):
    """A pipeline with LoRA on the U-Net and every text encoder, up-weights random so outputs move."""
    pipe = cls.from_pretrained(folder)
    add_unet_lora(pipe.unet, LORA)
    encoders = {"text_encoder": pipe.text_encoder}
    if cls is StableDiffusionXLPipeline:
        encoders["text_encoder_2"] = pipe.text_encoder_2
    g = torch.Generator().manual_seed(0)
    for model in [pipe.unet, *encoders.values()]:
        if model is not pipe.unet:
            add_text_encoder_lora(model, LORA)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data = torch.randn(param.shape, generator=g) * 0.1
    return pipe, encoders


@torch.no_grad()
def outputs(pipe, sdxl):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    emb = torch.randn(1, 16, pipe.unet.config.cross_attention_dim, generator=g)
    extra = {}
    if sdxl:
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(1, 32, generator=g),
                                       "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}}
    texts = [pipe.text_encoder(IDS)[0]] + ([pipe.text_encoder_2(IDS)[0]] if sdxl else [])
    return [pipe.unet(x, torch.tensor([500]), emb, **extra).sample] + texts


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_kohya_file_loads_in_diffusers_like_the_diffusers_file(family, request, tmp_path):
    sdxl = family == "sdxl"
    cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    base = request.getfixturevalue("tiny_sdxl" if sdxl else "tiny_sd1")
    pipe, encoders = lora_pipeline(cls, base)
    save_diffusers_lora(tmp_path / "diffusers", cls, pipe.unet, encoders, {"family": family})
    info = {"family": family, "base_model": str(base), "trigger": "a photo of sks dog", "steps": 10,
            "resolution": 64, "learning_rate": 1e-4, "tag_frequency": {"instance": {"a photo of sks dog": 5}}}
    weights = weights_from_models({"unet": pipe.unet, **encoders}, Family.from_name(family))
    kohya = export_kohya(weights, tmp_path / "dog.safetensors", info, precision="fp32")

    # Names, alpha and metadata of the file.
    tensors = load_file(kohya)
    te = "lora_te1" if sdxl else "lora_te"
    block = "down_blocks_1" if sdxl else "down_blocks_0"
    name = f"lora_unet_{block}_attentions_0_transformer_blocks_0_attn2_to_out_0"
    assert tensors[f"{name}.lora_down.weight"].shape[0] == 4 and tensors[f"{name}.alpha"].item() == 8.0
    assert f"{te}_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in tensors
    assert any(k.startswith("lora_te2_text_model_encoder") for k in tensors) == sdxl
    assert {k.split(".", 1)[1] for k in tensors} == {"lora_down.weight", "lora_up.weight", "alpha"}
    assert all(v.item() == 8.0 for k, v in tensors.items() if k.endswith(".alpha"))
    header = read_header(kohya)
    assert header["ss_network_dim"] == "4" and header["ss_network_alpha"] == "8"
    assert header["ss_network_module"] == "networks.lora"
    assert header["ss_base_model_version"] == ("sdxl_base_v1-0" if sdxl else "sd_v1")
    assert header["ss_resolution"] == "(64, 64)" and header["ss_steps"] == "10"
    assert json.loads(header["ss_tag_frequency"]) == {"instance": {"a photo of sks dog": 5}}
    architecture = "stable-diffusion-xl-v1-base" if sdxl else "stable-diffusion-v1"
    assert header["modelspec.architecture"] == architecture + "/lora"
    assert header["modelspec.trigger_phrase"] == "a photo of sks dog" and header["modelspec.sai_model_spec"] == "1.0.0"

    # diffusers reads both files to the same model; the LoRA changes every part.
    plain = outputs(cls.from_pretrained(base), sdxl)
    from_diffusers, from_kohya = cls.from_pretrained(base), cls.from_pretrained(base)
    from_diffusers.load_lora_weights(tmp_path / "diffusers")
    from_kohya.load_lora_weights(kohya)
    for want, got, before in zip(outputs(from_diffusers, sdxl), outputs(from_kohya, sdxl), plain):
        assert (want - got).abs().max() < 1e-4
        assert (want - before).abs().max() > 1e-2

    # Our reader gets the same weights back from both formats.
    a, b = read_lora(kohya), read_lora(tmp_path / "diffusers")
    assert a.alpha == b.alpha == {c: 8.0 for c in ["unet", *encoders]}
    assert all(torch.equal(a.layers[c][k], b.layers[c][k]) for c in a.layers for k in a.layers[c])


def test_kohya_names_with_underscored_pieces_read_back_to_their_modules(tmp_path):
    """Flattened kohya names lose which "_" were "."; the reader (diffusers' converter) puts them back."""
    paths = {"unet": ["down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_out.0",
                      "mid_block.attentions.0.proj_in", "up_blocks.2.attentions.0.transformer_blocks.0.ff.net.0.proj",
                      "up_blocks.2.resnets.0.conv_shortcut"],
             "text_encoder": ["text_model.encoder.layers.11.self_attn.out_proj", "text_model.encoder.layers.0.mlp.fc1"]}
    prefix = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
    tensors = {}
    for component, modules in paths.items():
        for i, module in enumerate(modules):
            name = prefix[component] + module.replace(".", "_")
            tensors |= {f"{name}.lora_down.weight": torch.full((2, 8), float(i)),
                        f"{name}.lora_up.weight": torch.full((8, 2), float(i)), f"{name}.alpha": torch.tensor(3.0)}
    save_file(tensors, tmp_path / "names.safetensors")
    weights = read_lora(tmp_path / "names.safetensors")
    assert {c: weights.modules(c) for c in weights.layers} == {c: sorted(m) for c, m in paths.items()}
    assert weights.layers["unet"]["mid_block.attentions.0.proj_in.lora_A.weight"].eq(1.0).all()
    assert weights.alpha == {"unet": 3.0, "text_encoder": 3.0}


def test_fp16_is_the_default_precision(tiny_sd1, tmp_path):
    pipe, encoders = lora_pipeline(StableDiffusionPipeline, tiny_sd1)
    path = export_kohya(weights_from_models({"unet": pipe.unet}), tmp_path / "x.safetensors",
                        {"alpha": 8.0, "family": "sd1"})
    tensors = load_file(path)
    assert {v.dtype for k, v in tensors.items() if "lora_" in k.split(".", 1)[1]} == {torch.float16}
    assert {v.dtype for k, v in tensors.items() if k.endswith(".alpha")} == {torch.float32}
