"""LoRA files from other trainers: each layout, made here from a trained LoRA by renaming its keys, imports to
exactly the weights of our own file (converting through the CLI, and lora.init_from through the SDXL recipe); a
file with a key nobody understands, or a module whose parts make up no type finetune reads (LoRA, DoRA, LoHa,
LoKr: tests/export/test_adapter_types.py), is refused in one line and nothing is written."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from finetune.export.diffusers_format import WEIGHT_NAME, read_header
from finetune.export.lora_weights import read_lora
from tests.helpers import SDXL, TRAINED_SDXL, random_lora, sdxl_overrides

# The tiny SDXL U-Net's attention blocks in the original layout (one resnet per level, so 2 blocks per level):
# written out by hand, as sd-scripts names them.
ORIGINAL_BLOCKS = {"down_blocks.1.attentions.0": "input_blocks.3.1", "mid_block.attentions.0": "middle_block.1",
                   "up_blocks.0.attentions.0": "output_blocks.0.1", "up_blocks.0.attentions.1": "output_blocks.1.1"}
PROCESSOR_NAMES = {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora", "to_out.0": "to_out_lora",
                   "q_proj": "to_q_lora", "k_proj": "to_k_lora", "v_proj": "to_v_lora", "out_proj": "to_out_lora"}


def sd_scripts(weights, te_prefixes: dict, blocks: dict | None = None) -> dict:
    """sd-scripts' names: lora_unet_ / lora_te*_ + the module path with "_", down/up/alpha (alpha in fp16, as
    sd-scripts saves it); `blocks` renames U-Net blocks to the original layout."""
    out = {}
    for component, layers in weights.layers.items():
        for module in weights.modules(component):
            path = module
            for new, old in (blocks or {}).items():
                path = path.replace(new + ".", old + ".")
            name = ("lora_unet_" if component == "unet" else te_prefixes[component]) + path.replace(".", "_")
            out[f"{name}.lora_down.weight"] = layers[f"{module}.lora_A.weight"]
            out[f"{name}.lora_up.weight"] = layers[f"{module}.lora_B.weight"]
            out[f"{name}.alpha"] = torch.tensor(weights.alpha[component], dtype=torch.float16)
    return out


def diffusers_peft(weights) -> dict:
    """The diffusers example scripts' file: component prefix + peft's lora_A/lora_B names, no adapter metadata."""
    return {f"{component}.{key}": value
            for component, layers in weights.layers.items() for key, value in layers.items()}


def diffusers_processors(weights) -> dict:
    """diffusers' older attention-processor spelling (unet.<block>.attn2.processor.to_k_lora.down.weight)."""
    out = {}
    for component, layers in weights.layers.items():
        for module in weights.modules(component):
            leaf = "to_out.0" if module.endswith(".to_out.0") else module.rsplit(".", 1)[1]
            parent = module[:-len(leaf) - 1]
            where = f"{parent}.processor" if component == "unet" else parent
            for kind, peft in (("down", "lora_A"), ("up", "lora_B")):
                out[f"{component}.{where}.{PROCESSOR_NAMES[leaf]}.{kind}.weight"] = layers[f"{module}.{peft}.weight"]
    return out


SD1_LAYOUTS = {
    "sd-scripts": lambda w: sd_scripts(w, {"text_encoder": "lora_te_"}),
    "sd-scripts-te1": lambda w: sd_scripts(w, {"text_encoder": "lora_te1_"}),
    "diffusers-peft": diffusers_peft,
    "diffusers-processors": diffusers_processors,
}
SD_SCRIPTS_HEADER = {"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1", "ss_network_dim": "2"}


def converted(run_cli, src, base, out):
    code, _, err = run_cli("export", src, "--format", "diffusers", "--base", base, "--out", out)
    assert code == 0, err
    return read_lora(out)


def same_layers(a, b) -> bool:
    return a.layers.keys() == b.layers.keys() and all(
        a.layers[c].keys() == b.layers[c].keys()
        and all(torch.equal(a.layers[c][k], b.layers[c][k]) for k in a.layers[c]) for c in a.layers)


@pytest.mark.parametrize("layout", list(SD1_LAYOUTS))
def test_sd1_layouts_convert_to_exactly_our_weights(layout, trained_sd1, tiny_sd1, tmp_path, run_cli):
    ours = read_lora(trained_sd1)
    save_file(SD1_LAYOUTS[layout](ours), tmp_path / "foreign.safetensors",
              metadata=SD_SCRIPTS_HEADER if layout.startswith("sd-scripts") else {})
    back = converted(run_cli, tmp_path / "foreign.safetensors", tiny_sd1, tmp_path / "out")
    assert same_layers(back, ours)
    # sd-scripts files carry alpha; diffusers files without adapter metadata mean alpha = rank, as diffusers reads them
    want = ours.alpha if layout.startswith("sd-scripts") else {c: 2.0 for c in ours.alpha}
    assert back.alpha == want
    assert json.loads(read_header(tmp_path / "out" / WEIGHT_NAME)["lora_adapter_metadata"])["unet.lora_alpha"] == \
        want["unet"]


def test_sd_scripts_sdxl_original_layout_converts_and_continues_training_exactly(trained_sdxl, tiny_sdxl, photos,
                                                                               tmp_path, run_cli):
    ours = read_lora(trained_sdxl)
    assert all(any(m.startswith(block + ".") for block in ORIGINAL_BLOCKS) for m in ours.modules("unet"))
    foreign = tmp_path / "sdxl_sd_scripts.safetensors"
    tensors = sd_scripts(ours, {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}, ORIGINAL_BLOCKS)
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn2_to_k.lora_down.weight" in tensors
    save_file(tensors, foreign, metadata={**SD_SCRIPTS_HEADER, "ss_base_model_version": "sdxl_base_v1-0"})

    # Without the base model's U-Net config the blocks cannot be placed: said, not guessed.
    code, _, err = run_cli("export", foreign, "--format", "diffusers", "--out", tmp_path / "guess")
    assert code == 2 and "original layout" in err and "--base MODEL" in err and not (tmp_path / "guess").exists()
    back = converted(run_cli, foreign, tiny_sdxl, tmp_path / "out")
    assert same_layers(back, ours) and back.alpha == ours.alpha == {"unet": 4.0, "text_encoder": 4.0,
                                                                     "text_encoder_2": 4.0}

    # lora.init_from through the recipe: one step at a learning rate far below fp32's resolution of these weights
    # leaves them as imported, so the export shows exactly what was read.
    overrides = sdxl_overrides(tiny_sdxl, photos, tmp_path, **{**TRAINED_SDXL, "train.max_steps": 1,
                                                               "train.learning_rate": 1e-30, "lora.init_from": foreign})
    code, _, err = run_cli("train", SDXL, *overrides)
    assert code == 0, err
    assert same_layers(read_lora(tmp_path / "run"), ours)


@pytest.mark.parametrize("extra, named", [
    ({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_mid.weight": torch.zeros(2, 2)},
     "1 key(s) are not LoRA layers finetune understands, e.g. lora_unet_down_blocks_0_attentions_0_transformer_blocks"
     "_0_attn2_to_k.lora_mid.weight"),
    ({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn3_to_k.lora_down.weight": torch.zeros(2, 32)},
     "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn3_to_k.lora_down.weight"),
    ({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.hada_w1_a": torch.zeros(32, 2)},
     "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k: parts hada_w1_a, lora_down.weight, "
     "lora_up.weight are no LoRA, DoRA, LoHa or LoKr module finetune reads"),
    ({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k.hada_w1_a": torch.zeros(32, 2)},
     "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k: parts hada_w1_a are no LoRA"),
])
def test_a_file_with_a_key_not_understood_is_refused_whole(extra, named, trained_sd1, tiny_sd1, tmp_path, run_cli):
    save_file({**sd_scripts(read_lora(trained_sd1), {"text_encoder": "lora_te_"}), **extra}, tmp_path / "x.safetensors")
    for args in (["export", tmp_path / "x.safetensors", "--format", "diffusers", "--out", tmp_path / "out"],
                 ["generate", "--model", tiny_sd1, "--lora", tmp_path / "x.safetensors", "--prompt", "x",
                  "--out", tmp_path / "images"]):
        code, _, err = run_cli(*args)
        assert code == 2 and named in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "images").exists()


def test_kohya_metadata_follows_the_resolved_family(tiny_sd2, trained_sdxl, tmp_path, run_cli):
    """An SD 2.x (v) model whose U-Net config lacks use_linear_projection is still SD 2.x in the kohya header."""
    configs = tmp_path / "sd21-configs"
    for name in ("model_index.json", "unet/config.json", "text_encoder/config.json", "scheduler/scheduler_config.json"):
        (configs / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tiny_sd2 / name, configs / name)
    unet = json.loads((configs / "unet" / "config.json").read_text())
    unet.pop("use_linear_projection")
    (configs / "unet" / "config.json").write_text(json.dumps(unet))
    lora = random_lora(tiny_sd2, tmp_path / "sd2")
    for src, base, want in [(lora, configs, {"ss_v2": "True", "ss_base_model_version": "sd_v2",
                                             "ss_v_parameterization": "True", "ss_resolution": "(768, 768)",
                                             "modelspec.architecture": "stable-diffusion-v2-768-v/lora",
                                             "modelspec.resolution": "768x768", "modelspec.prediction_type": "v"}),
                            (trained_sdxl, None, {"ss_v2": "False", "ss_base_model_version": "sdxl_base_v1-0",
                                                  "ss_resolution": "(128, 128)", "modelspec.resolution": "128x128",
                                                  "modelspec.architecture": "stable-diffusion-xl-v1-base/lora"})]:
        out = tmp_path / f"{src.name}.kohya.safetensors"
        code, _, err = run_cli("export", src, "--format", "kohya", *(["--base", base] if base else []), "--out", out)
        assert code == 0, err
        header = read_header(out)
        assert {key: header[key] for key in want} == want
