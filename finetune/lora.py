"""Where LoRA goes, injected through peft (via diffusers' and transformers' adapter integrations)."""
from __future__ import annotations

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from .config import LoraConfig

ADAPTER = "default"

# peft matches a string target as a regular expression against the full module name.
UNET_TARGETS = {
    "cross_attention": r".*attn2\.(to_q|to_k|to_v|to_out\.0)$",
    "all_attention": r".*attn[12]\.(to_q|to_k|to_v|to_out\.0)$",
}
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def peft_config(lora: LoraConfig, targets) -> PeftLoraConfig:
    # init_lora_weights="gaussian" starts the up-projection at zero: training begins exactly at the base model.
    return PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          init_lora_weights="gaussian", target_modules=targets)


def add_unet_lora(unet, lora: LoraConfig) -> None:
    unet.add_adapter(peft_config(lora, UNET_TARGETS[lora.unet_targets]))


def add_text_encoder_lora(text_encoder, lora: LoraConfig) -> None:
    text_encoder.add_adapter(peft_config(lora, TEXT_ENCODER_TARGETS))


def lora_parameters(*models) -> list[torch.nn.Parameter]:
    return [p for model in models if model is not None for p in model.parameters() if p.requires_grad]


def keep_lora_fp32(*models) -> None:
    """Under mixed precision the frozen base runs in half precision, but the trained LoRA weights stay fp32."""
    for param in lora_parameters(*models):
        param.data = param.data.float()


def lora_state(model) -> dict[str, torch.Tensor]:
    """The model's LoRA weights in peft's key format (what checkpoints store)."""
    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def load_lora_state(model, state: dict[str, torch.Tensor]) -> None:
    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise RuntimeError(f"LoRA state has keys the model does not: {unexpected[:3]}")


# Only the keys every peft release since 0.14 accepts: diffusers passes them to peft's LoraConfig(**metadata).
PORTABLE_CONFIG_KEYS = ("r", "lora_alpha", "target_modules", "use_dora", "lora_bias")


def adapter_metadata(model) -> dict:
    """The model's LoRA config as diffusers stores it in a file, so rank and alpha reload exactly."""
    config = model.peft_config[ADAPTER].to_dict()
    metadata = {key: config[key] for key in PORTABLE_CONFIG_KEYS if key in config}
    if isinstance(metadata.get("target_modules"), (set, tuple)):
        metadata["target_modules"] = sorted(metadata["target_modules"])
    return metadata
