"""model.quantize_unet=nf4_all on a tiny model: the U-Net's convolutions kept in NF4 and read back per call; and
train.channels_last, which changes the layout of the convolutions nf4_all leaves plain.

bitsandbytes' quantize_4bit/dequantize_4bit run on the CPU too, so the storage is real here; only the linear
layers' 4-bit loading (diffusers' bitsandbytes quantizer, CUDA) is stood in for by a plain U-Net.
"""
from __future__ import annotations

import copy
import json

import torch
from bitsandbytes.functional import dequantize_4bit, quantize_4bit
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

import finetune.models as models
import finetune.training.dreambooth as dreambooth
from finetune.plan import read_architecture
from finetune.training.dreambooth import to_channels_last
from tests.helpers import SD15, tiny_overrides


def convolutions(unet):
    return {name: m for name, m in unet.named_modules() if isinstance(m, torch.nn.Conv2d)}


def test_every_convolution_but_the_edges_is_stored_in_4_bits_and_draws_with_its_dequantized_weight(tiny_sd1):
    unet = UNet2DConditionModel.from_pretrained(tiny_sd1, subfolder="unet", torch_dtype=torch.bfloat16)
    original = copy.deepcopy(unet)
    stored = models.store_convolutions_in_nf4(unet)

    convs = convolutions(unet)
    assert stored == len(convs) - 2 and set(convs) - {"conv_in", "conv_out"} == {
        name for name, conv in convs.items() if hasattr(conv, "parametrizations")}
    for name in ("conv_in", "conv_out"):
        assert torch.equal(convs[name].weight, convolutions(original)[name].weight)
    packed_weights = 0
    for name, conv in convs.items():
        if name in ("conv_in", "conv_out"):
            continue
        packed = conv.parametrizations.weight.original0
        assert packed.dtype == torch.uint8 and not packed.requires_grad
        packed_weights += 2 * packed.numel()  # two 4-bit weights per byte
        # The layer reads what bitsandbytes' own round trip of the original weight gives.
        weight = convolutions(original)[name].weight.detach()
        assert torch.equal(conv.weight, dequantize_4bit(*quantize_4bit(weight, blocksize=64, quant_type="nf4")))
    assert packed_weights == read_architecture(str(tiny_sd1), "cross_attention").unet_conv_params

    # The U-Net's output is a plain U-Net's with those dequantized weights put in.
    for name, conv in convolutions(original).items():
        if name not in ("conv_in", "conv_out"):
            conv.weight.data = convs[name].weight.detach().clone()
    sample = torch.randn(1, 4, 8, 8, dtype=torch.bfloat16)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(unet(sample, 10, text).sample, original(sample, 10, text).sample)


def test_training_with_nf4_all_keeps_the_convolutions_in_4_bits_and_trains_the_lora(tiny_sd1, photos, tmp_path,
                                                                                    run_cli, monkeypatch):
    trained: list = []
    real_store = models.store_convolutions_in_nf4

    def store(unet):  # the real storage, on the U-Net the run trains
        trained.append(unet)
        return real_store(unet)

    monkeypatch.setattr(models, "check_nf4_possible", lambda model, source: None)
    monkeypatch.setattr(models, "load_nf4_unet", lambda model, dtype: UNet2DConditionModel.from_pretrained(
        model.pretrained, subfolder="unet"))
    monkeypatch.setattr(models, "store_convolutions_in_nf4", store)
    code, _, err = run_cli("train", SD15, *tiny_overrides(tiny_sd1, photos, tmp_path, **{
        "model.quantize_unet": "nf4_all", "train.max_steps": 2, "prior.num_class_images": 0}))
    assert code == 0, err
    [unet] = trained
    conv = unet.down_blocks[0].resnets[0].conv1
    assert conv.parametrizations.weight.original0.dtype == torch.uint8  # still 4-bit after training
    weights = load_file(tmp_path / "run" / "pytorch_lora_weights.safetensors")
    ups = [tensor for key, tensor in weights.items() if "lora_B" in key or "lora.up" in key]
    assert ups and all(torch.isfinite(t).all() for t in ups) and any(t.abs().sum() > 0 for t in ups)
    assert not any("parametrizations" in key for key in weights)


def test_channels_last_changes_the_plain_convolutions_only_and_the_output_stays(tiny_sd1):
    unet = UNet2DConditionModel.from_pretrained(tiny_sd1, subfolder="unet")
    sample, text = torch.randn(1, 4, 8, 8), torch.randn(1, 77, unet.config.cross_attention_dim)
    models.store_convolutions_in_nf4(unet)
    packed = {name: conv.parametrizations.weight.original0.clone() for name, conv in convolutions(unet).items()
              if hasattr(conv, "parametrizations")}
    with torch.no_grad():
        before = unet(sample, 10, text).sample
        to_channels_last(unet)
        after = unet(sample, 10, text).sample
    convs = convolutions(unet)
    for name in ("conv_in", "conv_out"):  # 3x3 kernels: the two layouts differ, so this proves the change
        weight = convs[name].weight
        assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    for name, original in packed.items():  # the 4-bit storage is read afresh each call: left exactly as it was
        assert torch.equal(convs[name].parametrizations.weight.original0, original)
    torch.testing.assert_close(after, before)  # same arithmetic in another memory order


def test_training_with_channels_last_trains_that_layout_and_writes_the_same_lora(tiny_sd1, photos, tmp_path,
                                                                                run_cli, monkeypatch):
    trained: list = []

    def recording(unet):
        trained.append(unet)
        to_channels_last(unet)
    monkeypatch.setattr(dreambooth, "to_channels_last", recording)
    files = {}
    for layout in ("true", "false"):
        out = tmp_path / layout
        code, _, err = run_cli("train", SD15, *tiny_overrides(tiny_sd1, photos, out, **{
            "train.channels_last": layout, "train.max_steps": 2, "prior.num_class_images": 0}))
        assert code == 0, err
        files[layout] = load_file(out / "run" / "pytorch_lora_weights.safetensors")
        assert json.loads((out / "run" / "train_summary.json").read_text())["channels_last"] is (layout == "true")
    [unet] = trained  # asked for once, by the run that set it
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert files["true"].keys() == files["false"].keys()
    assert any(t.abs().sum() > 0 for key, t in files["true"].items() if "lora_B" in key or "lora.up" in key)
    # The same arithmetic summed in another order: Adam moves each weight by about the learning rate (1e-3) a
    # step, whatever the gradient's size, so the two may differ by a small part of one step (seen: 3e-6).
    for key, tensor in files["true"].items():
        torch.testing.assert_close(tensor, files["false"][key], rtol=1e-3, atol=1e-5)
