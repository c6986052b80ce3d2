"""LoRA weights of a pipeline, read from either file format, held in peft's key format per component.

One in-memory shape (component -> {module.lora_A.weight: tensor}, plus alpha) sits between the two file
formats, so converting, continuing training and fusing all read files the same way.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import FinetuneError
from ..lora import load_lora_state, lora_config, lora_state
from .diffusers_format import WEIGHT_NAME as DIFFUSERS_WEIGHT_NAME
from .diffusers_format import read_header

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


@dataclasses.dataclass
class LoraWeights:
    layers: dict[str, dict[str, torch.Tensor]]  # component -> peft state dict ({module}.lora_A/B.weight)
    alpha: dict[str, float]                      # component -> LoRA alpha (the update is scaled by alpha / rank)
    header: dict[str, str]                       # the file's safetensors metadata
    source_format: str                           # "diffusers" or "kohya"

    def rank(self, component: str) -> int:
        ranks = {v.shape[0] for k, v in self.layers[component].items() if k.endswith("lora_A.weight")}
        if len(ranks) != 1:
            raise FinetuneError(f"{component}: LoRA layers have different ranks {sorted(ranks)}; finetune handles "
                                "one rank per model part")
        return ranks.pop()

    def modules(self, component: str) -> list[str]:
        return sorted(k[:-len(".lora_A.weight")] for k in self.layers[component] if k.endswith(".lora_A.weight"))

    @property
    def is_sdxl(self) -> bool:
        family = self.header.get("finetune.family") or self.header.get("ss_base_model_version", "")
        return "text_encoder_2" in self.layers or "sdxl" in family


def lora_file(path: str | Path) -> Path:
    """The .safetensors file a path names: the file itself, or a run/export folder's diffusers file."""
    path = Path(path)
    if path.is_dir():
        path = path / DIFFUSERS_WEIGHT_NAME
    if not path.is_file():
        raise FinetuneError(f"{path}: no such LoRA file; give a .safetensors file or a folder holding "
                            f"{DIFFUSERS_WEIGHT_NAME}")
    return path


def read_lora(path: str | Path) -> LoraWeights:
    """Read a diffusers-format or kohya-format LoRA file (or a folder holding the diffusers file)."""
    path = lora_file(path)
    try:
        tensors, header = load_file(path), read_header(path)
    except (SafetensorError, OSError) as exc:
        raise FinetuneError(f"{path}: not a readable .safetensors file ({exc})") from None
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in tensors):
        from .kohya import kohya_to_peft
        layers, alpha = kohya_to_peft(tensors, path)
        return LoraWeights(layers, alpha, header, "kohya")
    if any(k.split(".", 1)[0] in COMPONENTS for k in tensors):
        return _from_diffusers(tensors, header, path)
    raise FinetuneError(f"{path}: neither a diffusers LoRA (unet./text_encoder. keys) nor a kohya LoRA "
                        "(lora_unet_/lora_te_ keys)")


def _from_diffusers(tensors: dict, header: dict, path: Path) -> LoraWeights:
    adapter = json.loads(header.get("lora_adapter_metadata", "{}"))
    layers, alpha = {}, {}
    for component in COMPONENTS:
        part = {k[len(component) + 1:]: v for k, v in tensors.items() if k.startswith(component + ".")}
        if not part:
            continue
        if not any(".lora_A." in k for k in part):  # diffusers' older lora.down / lora_linear_layer spellings
            part = convert_unet_state_dict_to_peft(part) if component == "unet" else convert_state_dict_to_peft(part)
        layers[component] = canonical(component, part)
    weights = LoraWeights(layers, alpha, header, "diffusers")
    for component in layers:
        # Without stored metadata diffusers loads alpha = rank; so do we.
        weights.alpha[component] = float(adapter.get(f"{component}.lora_alpha", weights.rank(component)))
    unknown = [k for k in tensors if k.split(".", 1)[0] not in COMPONENTS]
    if unknown:
        raise FinetuneError(f"{path}: keys outside unet/text_encoder/text_encoder_2, e.g. {unknown[0]}")
    return weights


def weights_from_models(models: dict, header: dict | None = None) -> LoraWeights:
    """The LoRA weights of peft-injected models, e.g. {'unet': unet, 'text_encoder': text_encoder}."""
    return LoraWeights({name: canonical(name, lora_state(model)) for name, model in models.items()},
                       {name: float(lora_config(model).lora_alpha) for name, model in models.items()},
                       dict(header or {}), "diffusers")


def load_into_models(weights: LoraWeights, models: dict, path: str | Path) -> None:
    """Start from a file's LoRA: the models' injected LoRA (from lora.*) must match the file's exactly."""
    if set(weights.layers) != set(models):
        has, wants = sorted(weights.layers), sorted(models)
        raise FinetuneError(f"lora.init_from: {path} has LoRA on {', '.join(has)} but this run trains "
                            f"{', '.join(wants)}; set lora.text_encoder to match the file")
    for name, model in models.items():
        config = lora_config(model)
        if weights.rank(name) != config.r:
            raise FinetuneError(f"lora.init_from: {path} has rank {weights.rank(name)} on {name}; set "
                                f"lora.rank={weights.rank(name)}")
        if abs(weights.alpha[name] - config.lora_alpha) > 1e-6:
            raise FinetuneError(f"lora.init_from: {path} has alpha {weights.alpha[name]:g} on {name}; set "
                                f"lora.alpha={weights.alpha[name]:g}")
        state = lora_state(model)
        ours = sorted(k[:-len(".lora_A.weight")] for k in canonical(name, state) if k.endswith(".lora_A.weight"))
        if ours != weights.modules(name):
            extra = sorted(set(weights.modules(name)) - set(ours)) or sorted(set(ours) - set(weights.modules(name)))
            raise FinetuneError(f"lora.init_from: {path} puts LoRA on other {name} layers than lora.unet_targets "
                                f"does (differs at {extra[0]}); choose the preset the file was trained with")
        bare = not any(k.startswith("text_model.") for k in state)
        load_lora_state(model, {k.removeprefix("text_model.") if bare else k: v
                                for k, v in weights.layers[name].items()})


def canonical(component: str, layers: dict) -> dict:
    """Text-encoder module paths always start with text_model. (transformers 5's CLIPTextModel drops that
    wrapper, CLIPTextModelWithProjection and the UIs' CLIP keep it), so files compare and convert alike."""
    if component == "unet":
        return layers
    return {k if k.startswith("text_model.") else "text_model." + k: v for k, v in layers.items()}
