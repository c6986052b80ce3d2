"""Where LoRA goes (and its variants DoRA, LoHa, LoKr: `lora.type`), injected through peft's own API.

transformers' and diffusers' adapter integrations (`add_adapter`, `enable_adapters`, `disable_adapters`) gate on
the installed peft version and have refused working peft releases (transformers 5.24 wants peft >= 0.22, which
does not exist). peft's `inject_adapter_in_model`, its state-dict helpers and its tuner layers' switches carry
no such gate, so they are the only LoRA API this package calls.
"""
from __future__ import annotations

import contextlib
import weakref

import torch
from peft import LoHaConfig, LoKrConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft import LoraConfig as PeftLoraConfig
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTunerLayer

from .config import LoraConfig

ADAPTER = "default"

# peft matches a string target as a regular expression against the full module name.
UNET_TARGETS = {
    "cross_attention": r".*attn2\.(to_q|to_k|to_v|to_out\.0)$",
    "all_attention": r".*attn[12]\.(to_q|to_k|to_v|to_out\.0)$",
}
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]

# The peft config each injected model was given, kept here rather than read back from an attribute that an
# integration may rename: rank, alpha and targets for metadata and imports.
_CONFIGS: weakref.WeakKeyDictionary[torch.nn.Module, PeftConfig] = weakref.WeakKeyDictionary()


def peft_config(lora: LoraConfig, targets) -> PeftConfig:
    """peft's config for lora.type. Each starts exactly at the base model: LoRA's and DoRA's up-projection at zero
    (init_lora_weights="gaussian"; DoRA's magnitude at the base weight's row norms), LoHa's hada_w2_b and LoKr's
    lokr_w1 at zero (peft's default init). LoHa and LoKr have no dropout on the branch; lora.dropout is their
    rank_dropout (a random subset of the rank's components dropped per step)."""
    if lora.type in ("lora", "dora"):
        return PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                              init_lora_weights="gaussian", target_modules=targets, use_dora=lora.type == "dora")
    kinds: dict[str, type[LoHaConfig] | type[LoKrConfig]] = {"loha": LoHaConfig, "lokr": LoKrConfig}
    return kinds[lora.type](r=lora.rank, alpha=lora.alpha, rank_dropout=lora.dropout, target_modules=targets)


def adapter_type(config: PeftConfig) -> str:
    """lora, dora, loha or lokr: the lora.type a peft config was made from."""
    if isinstance(config, LoHaConfig):
        return "loha"
    if isinstance(config, LoKrConfig):
        return "lokr"
    return "dora" if getattr(config, "use_dora", False) else "lora"


def rank_and_alpha(config: PeftConfig) -> tuple[int, float]:
    """(rank, alpha) of any of the four configs (LoRA's names its alpha lora_alpha, LoHa's and LoKr's alpha)."""
    alpha = config.lora_alpha if isinstance(config, PeftLoraConfig) else config.alpha
    return int(config.r), float(alpha)


def inject_lora(model: torch.nn.Module, config: PeftConfig) -> None:
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    _CONFIGS[model] = config


def add_unet_lora(unet, lora: LoraConfig) -> None:
    inject_lora(unet, peft_config(lora, UNET_TARGETS[lora.unet_targets]))


def add_text_encoder_lora(text_encoder, lora: LoraConfig) -> None:
    inject_lora(text_encoder, peft_config(lora, TEXT_ENCODER_TARGETS))


def lora_config(model: torch.nn.Module) -> PeftConfig:
    """The peft config `model` was injected with (by add_unet_lora / add_text_encoder_lora)."""
    try:
        return _CONFIGS[model]
    except KeyError:
        raise ValueError(f"{type(model).__name__} has no LoRA injected by finetune.lora") from None


def lora_parameters(*models) -> list[torch.nn.Parameter]:
    return [p for model in models if model is not None for p in model.parameters() if p.requires_grad]



def tuner_layers(model: torch.nn.Module) -> list[BaseTunerLayer]:
    return [module for module in model.modules() if isinstance(module, BaseTunerLayer)]


@contextlib.contextmanager
def lora_disabled(models):
    """The base model: every LoRA layer of `models` switched off, and on again afterwards."""
    layers = [layer for model in models for layer in tuner_layers(model)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def lora_state(model) -> dict[str, torch.Tensor]:
    """The model's LoRA weights in peft's key format (what checkpoints store)."""
    return {k: v.detach().cpu().contiguous()
            for k, v in get_peft_model_state_dict(model, adapter_name=ADAPTER).items()}


def load_lora_state(model, state: dict[str, torch.Tensor]) -> None:
    result = set_peft_model_state_dict(model, state, adapter_name=ADAPTER)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise RuntimeError(f"LoRA state has keys the model does not: {unexpected[:3]}")


# Only the keys every peft release since 0.14 accepts: diffusers passes them to peft's LoraConfig(**metadata).
PORTABLE_CONFIG_KEYS = ("r", "lora_alpha", "target_modules", "use_dora", "lora_bias")


def adapter_metadata(model) -> dict:
    """The model's LoRA (or DoRA) config as diffusers stores it in a file, so rank and alpha reload exactly."""
    config = lora_config(model).to_dict()
    metadata = {key: config[key] for key in PORTABLE_CONFIG_KEYS if key in config}
    if isinstance(metadata.get("target_modules"), (set, tuple)):
        metadata["target_modules"] = sorted(metadata["target_modules"])
    return metadata
