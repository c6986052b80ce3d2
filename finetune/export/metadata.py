"""What a LoRA file says about itself: the finetune.* info, and the ss_* / modelspec.* keys the UIs display.

A1111's and ComfyUI's LoRA browsers read sd-scripts' `ss_*` training keys (dim, alpha, base model, resolution,
steps, learning rates, tag frequency); Stability's model spec (`modelspec.*`) names the architecture, title,
date and trigger phrase. All header values are strings; structured ones are JSON.
"""
from __future__ import annotations

import datetime
import json
from collections import Counter

from ..family import Family
from .adapters import NAMES

# family name -> (ss_base_model_version, modelspec.architecture prefix, modelspec.implementation)
FAMILIES = {
    "sd1": ("sd_v1", "stable-diffusion-v1", "diffusers"),
    "sd2": ("sd_v2", "stable-diffusion-v2-512", "diffusers"),
    "sd2-v": ("sd_v2", "stable-diffusion-v2-768-v", "diffusers"),
    "sdxl": ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base", "https://github.com/Stability-AI/generative-models"),
}


def tag_frequency(prompts: list[str], dataset_name: str = "instance") -> dict[str, dict[str, int]]:
    """sd-scripts' ss_tag_frequency: {dataset: {comma-separated tag: count}} over the training captions."""
    tags = Counter(tag.strip() for prompt in prompts for tag in prompt.split(",") if tag.strip())
    return {dataset_name: dict(tags.most_common())}


def _value(info: dict, key: str, default=None):
    """info values are Python values from the recipe, or JSON strings read back from a file's header."""
    value = info.get(key, default)
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


# lora.type -> (ss_network_module, ss_network_args) as sd-scripts records LoRA and LyCORIS' kohya module records the
# others (lycoris/kohya.py: algo=..., dora_wd for DoRA); the UIs tell the type from the keys, the header informs.
NETWORKS = {"lora": ("networks.lora", {}), "dora": ("lycoris.kohya", {"algo": "lora", "dora_wd": "True"}),
            "loha": ("lycoris.kohya", {"algo": "loha"}), "lokr": ("lycoris.kohya", {"algo": "lokr"})}


def kohya_metadata(info: dict, rank: int, alpha: float, has_text_encoder: bool, kind: str = "lora") -> dict[str, str]:
    """The header keys; info["family"] is the base model's family name, as finetune.family resolved it."""
    family = Family.from_name(str(_value(info, "family")))
    version, architecture, implementation = FAMILIES[family.name]
    resolution = _value(info, "resolution", family.default_resolution)
    v = family.prediction_type == "v_prediction" or _value(info, "prediction_type") == "v_prediction"
    lr = _value(info, "learning_rate")
    trigger = str(_value(info, "trigger", ""))
    title = str(_value(info, "title", "") or "finetune LoRA")
    steps = _value(info, "steps")
    meta = {
        "ss_network_module": NETWORKS[kind][0],
        "ss_network_dim": str(rank),
        "ss_network_alpha": _number(alpha),
        "ss_network_args": json.dumps(NETWORKS[kind][1]),
        "ss_base_model_version": version,
        "ss_v2": str(family.base == "sd2"),
        "ss_v_parameterization": str(v),
        "ss_sd_model_name": str(_value(info, "base_model", "")),
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_max_train_steps": str(steps), "ss_steps": str(steps),
        "ss_epoch": str(_value(info, "epochs", 1)),
        "ss_learning_rate": str(lr), "ss_unet_lr": str(lr),
        "ss_text_encoder_lr": str(lr if has_text_encoder else 0.0),
        "ss_network_train_unet_only": str(not has_text_encoder),
        "ss_batch_size_per_device": str(_value(info, "batch_size", 1)),
        "ss_num_train_images": str(_value(info, "num_train_images", 0)),
        "ss_num_reg_images": str(_value(info, "num_class_images", 0)),
        "ss_seed": str(_value(info, "seed", 0)),
        "ss_output_name": title,
        "ss_training_comment": f"DreamBooth-LoRA with finetune; trigger: {trigger}",
        "ss_tag_frequency": json.dumps(_value(info, "tag_frequency", {})),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{architecture}/lora",
        "modelspec.implementation": implementation,
        "modelspec.title": title,
        "modelspec.date": str(_value(info, "date", "") or datetime.date.today().isoformat()),
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": "v" if v else "epsilon",
        "modelspec.trigger_phrase": trigger,
        "modelspec.description": f"{NAMES[kind]} (rank {rank}, alpha {_number(alpha)}) on "
                                 f"{_value(info, 'base_model', '')}",
    }
    return meta


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)
