"""`finetune plan`: estimate a run's peak GPU memory from the architecture and settings, before buying the card.

A run has up to three peaks, and the largest counts:
- class images (only if some are still to draw): the pipeline in half precision drawing a batch with guidance;
- encoding: the U-Net already on the GPU, the text encoder(s) and the fp32 VAE encoding one image at a time;
- training: the U-Net, LoRA with its gradients and optimizer state, and the activations kept for the backward pass.
Weights are counted exactly from the model's configs (no weights are read). Activations and the VAE's working
memory are per-sample constants measured on an H100 (BENCHMARKS.md, benchmarks/results/) and scaled by pixel count;
CONTEXT_MIB is what nvidia-smi shows beyond PyTorch's own reservation (CUDA context, cuBLAS/cuDNN workspaces).
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from .config import load
from .errors import FinetuneError

MIB = 2**20
CONTEXT_MIB = 700           # nvidia-smi minus torch's reserved peak: 695-855 MiB across the H100 runs
VAE_ENCODE_MIB_512 = 1170   # the fp32 VAE encoder's working memory for one 512 px image
GENERATE_MIB_512 = 1060     # drawing one class image at 512 px (two U-Net samples with guidance, then the decoder)
# Activations kept for the backward pass, per sample: (without, with gradient checkpointing, at this many px),
# bf16 with SDPA; keyed by the model family (finetune.family). SD: the SD1.5 probe
# (benchmarks/probe_step.py). SDXL with checkpointing: the H100 probe (7.04 GiB at batch 2 with 4.78 GiB of
# weights); without: that plus the 6.8 GB the peer saves by checkpointing at batch 2.
ACTIVATIONS_MIB = {"sd1": (1250, 372, 512), "sd2": (1250, 372, 512), "sdxl": (4550, 1156, 1024)}
HALF, FP32 = 2, 4


@dataclasses.dataclass
class Architecture:
    unet_params: int
    unet_linear_params: int
    text_encoder_params: int
    vae_params: int
    family: str                                  # sd1, sd2 or sdxl
    target_linear_shapes: list[tuple[int, int]]  # (in, out) of every linear layer that gets LoRA


def parse_size(text: str) -> float:
    """'8GiB', '8 GB', '6144MiB', '8' -> MiB (GB and GiB both read as 2**30 bytes: cards are sold that way)."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([GMgm]i?[Bb]?)?\s*", text)
    if not match:
        raise FinetuneError(f"--gpu-memory {text!r}: write it as e.g. 8GiB, 6GB or 6144MiB")
    value, unit = float(match.group(1)), (match.group(2) or "G").upper()
    return value * 1024 if unit.startswith("G") else value


def read_architecture(model_dir: str, unet_targets: str) -> Architecture:
    """Count parameters from the configs alone: the U-Net is built on the meta device, so nothing is allocated."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoConfig, AutoModel

    from .family import decide, folder_facts
    from .lora import UNET_TARGETS

    root = Path(model_dir)
    if not (root / "unet" / "config.json").is_file():
        raise FinetuneError(f"model.pretrained: {model_dir} is not a diffusers folder with unet/config.json; plan "
                            f"reads the model's configs from a local folder (download the model first)")
    family = decide(folder_facts(root))
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(root / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(root / "vae"))
        encoders = [AutoModel.from_config(AutoConfig.from_pretrained(root / name))
                    for name in ("text_encoder", "text_encoder_2") if (root / name / "config.json").is_file()]
    pattern = re.compile(UNET_TARGETS[unet_targets])
    linears = [(name, m) for name, m in unet.named_modules() if isinstance(m, torch.nn.Linear)]
    return Architecture(
        unet_params=sum(p.numel() for p in unet.parameters()),
        unet_linear_params=sum(m.weight.numel() for _, m in linears),
        text_encoder_params=sum(p.numel() for e in encoders for p in e.parameters()),
        vae_params=sum(p.numel() for p in vae.parameters()),
        family=family.base,
        target_linear_shapes=[(m.in_features, m.out_features) for name, m in linears if pattern.fullmatch(name)])


def unet_bytes(arch: Architecture, quantize: str, weight_bytes: int) -> float:
    if quantize == "nf4":  # 4 bits per linear weight plus one fp32 scale per 64-weight block; the rest in bf16
        return arch.unet_linear_params * (0.5 + 4 / 64) + (arch.unet_params - arch.unet_linear_params) * HALF
    return arch.unet_params * weight_bytes


def estimate(arch: Architecture, train, model, lora, samples_per_step: int, class_images_to_draw: int,
             generation_batch: int) -> dict:
    """Peak MiB of each phase and of the run (as nvidia-smi would show it) for these settings."""
    weight_bytes = FP32 if train.mixed_precision == "no" else HALF
    unet = unet_bytes(arch, model.quantize_unet, weight_bytes)
    pixels = (train.resolution / 512) ** 2
    phases = {}
    if class_images_to_draw:  # the pipeline in half precision, a batch of images with guidance
        batch = min(generation_batch, class_images_to_draw)
        phases["class_images"] = (unet_bytes(arch, model.quantize_unet, HALF) + (arch.text_encoder_params +
                                  arch.vae_params) * HALF + GENERATE_MIB_512 * pixels * batch * MIB)
    encoders = arch.text_encoder_params * weight_bytes
    phases["encoding"] = unet + encoders + arch.vae_params * FP32 + VAE_ENCODE_MIB_512 * pixels * MIB
    without, with_checkpointing, reference_px = ACTIVATIONS_MIB[arch.family]
    per_sample = with_checkpointing if train.gradient_checkpointing else without
    activations = per_sample * (train.resolution / reference_px) ** 2 * samples_per_step * MIB
    # Per adapted layer: LoRA r(i + o); DoRA adds a magnitude per output; LoHa holds two such pairs; LoKr's factors
    # are smaller than LoRA's pair, which stays an upper bound for it.
    pairs = 2 if lora.type == "loha" else 1
    lora_params = sum(pairs * lora.rank * (i + o) + (o if lora.type == "dora" else 0)
                      for i, o in arch.target_linear_shapes)
    lora_total = lora_params * (FP32 + FP32 + (2 if train.optimizer == "adamw8bit" else 8))  # weights, grads, state
    encoders_resident = lora.text_encoder or not train.cache_text_embeddings
    phases["training"] = unet + lora_total + activations + (encoders if encoders_resident else 0)
    result = {f"{name}_mib": round(value / MIB) for name, value in phases.items()}
    result["peak_mib"] = round(max(phases.values()) / MIB + CONTEXT_MIB)
    return result


def samples_per_step(cfg) -> int:
    """Per process and micro-batch: the instance images plus as many class images with prior preservation."""
    return cfg.train.batch_size * (2 if cfg.prior.num_class_images else 1)


def estimate_config(cfg, arch: Architecture) -> dict:
    """estimate() for a recipe config as `finetune train` would run it."""
    return estimate(arch, cfg.train, cfg.model, cfg.lora, samples_per_step(cfg), class_images_to_draw(cfg),
                    cfg.prior.generation_batch_size)


def class_images_to_draw(cfg) -> int:
    """How many class images the run would generate first (they cost memory of their own)."""
    from .data.class_images import missing_class_indices
    prior = cfg.prior
    if not prior.num_class_images:
        return 0
    folder = Path(cfg.data.class_dir) if cfg.data.class_dir else None
    return len(missing_class_indices(folder, prior.num_class_images)) if folder else prior.num_class_images


# The settings worth comparing, fastest first: (label, overrides).
CANDIDATES = [("train.mode=fast", ["train.mode=fast", "train.gradient_checkpointing=false"]),
              ("train.mode=fast train.gradient_checkpointing=true",
               ["train.mode=fast", "train.gradient_checkpointing=true"]),
              ("train.mode=low_memory", ["train.mode=low_memory"]),
              ("train.mode=low_memory prior.generation_batch_size=1",
               ["train.mode=low_memory", "prior.generation_batch_size=1"])]


def plan_report(config_class: type, config_path: str, overrides: list[str], gpu_mib: float) -> tuple[str, dict]:
    """The table `finetune plan` prints for a recipe's config (its class, YAML and overrides), and the estimates
    as data."""
    cfg = load(config_class, config_path, overrides)
    arch = read_architecture(cfg.model.pretrained, cfg.lora.unet_targets)
    samples = samples_per_step(cfg)
    rows, estimates = [], {}
    for label, extra in [("as configured", []), *CANDIDATES]:
        variant = load(config_class, config_path, [*overrides, *extra])
        est = estimate_config(variant, arch)
        estimates[label] = est
        fits = "fits" if est["peak_mib"] <= gpu_mib else "too big"
        rows.append(f"  {est['peak_mib'] / 1024:5.1f} GiB  {fits:8s} {label}")
    fitting = [label for label, est in estimates.items() if label != "as configured" and est["peak_mib"] <= gpu_mib]
    advice = (f"use: {fitting[0]}" if fitting else
              "nothing fits: lower train.resolution or train.batch_size, or use a bigger card")
    header = (f"{cfg.model.pretrained}: U-Net {arch.unet_params / 1e6:.0f}M params, {cfg.train.resolution} px, "
              f"{samples} samples per step; estimated peak GPU memory (as nvidia-smi shows it) on a "
              f"{gpu_mib / 1024:.1f} GiB card:")
    return "\n".join([header, *rows, advice]), {"gpu_mib": gpu_mib, "estimates": estimates, "advice": advice,
                                                 "architecture": dataclasses.asdict(arch) | {
                                                     "target_linear_shapes": len(arch.target_linear_shapes)}}

