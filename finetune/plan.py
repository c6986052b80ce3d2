"""`finetune plan`: estimate a run's peak GPU memory from the architecture and settings, before buying the card.

A run's phases never share the GPU (each hands its cached memory back when it ends), so the largest one counts:
- class images (only if some are still to draw): the pipeline in half precision drawing a batch with guidance,
  the decoder taking one image at a time (in 512 px tiles with train.vae_tiling);
- text encoding: the text encoder(s) alone;
- latent encoding: the fp32 VAE alone, one image at a time (in 512 px tiles with train.vae_tiling);
- training: the U-Net (arriving only now), LoRA with its gradients and optimizer state, and the activations kept
  for the backward pass (with CUDA graphs, their pool).
Weights are counted exactly from the model's configs (no weights are read). Activations and working memory are
per-sample constants fitted on the H200 runs of 2026-12-01 (BENCHMARKS.md, benchmarks/results/) and scaled by pixel
count; CONTEXT_MIB is what nvidia-smi shows beyond PyTorch's own reservation (CUDA context, cuBLAS/cuDNN workspaces).
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import NamedTuple

from .config import load
from .errors import FinetuneError

MIB = 2**20
CONTEXT_MIB = 860           # nvidia-smi minus torch's reserved peak: 855-895 MiB in the H200 runs peaking in training
VAE_ENCODE_MIB_512 = 1170   # the fp32 VAE encoder's working memory for one 512 px image (H100 and H200 alike)
TILE_PX = 512               # finetune.models.TILE_PX: the tile of train.vae_tiling
# Drawing class images, per 512 px image, bf16: the U-Net's working memory per image of a batch (with guidance)
# and the decoder's for the one image it decodes at a time. Without slicing the two came to 1347 MiB per image
# of a batch (H200 probe, batches 4, 8 and 16).
GENERATE_UNET_MIB_512 = 150
DECODE_MIB_512 = 1200


class Activations(NamedTuple):
    """Activations kept for the backward pass, MiB per sample at the family's native size (CUDA graphs' pool
    included), bf16 with SDPA, fitted on the training phases of the H200 runs (phase_peak_reserved_mib)."""
    plain: int                         # without gradient checkpointing
    checkpointed: int                  # with it, on a bf16 U-Net
    quantized: int                     # with it, on a 4-bit U-Net, in fixed-size segments
    quantized_expandable: int | None   # the same, with CUDA graphs and train.expandable_segments in effect
    reference_px: int


# Until 2026-12-01's fifth session train.expandable_segments came too late to take effect (finetune.allocator), so
# every run before it had fixed-size segments: the `quantized` figures are theirs. The expandable figures were
# fitted on the nf4 runs of the fifth (SD, 2032 MiB reserved in training) and sixth (SDXL, 3466) sessions; None:
# not measured, and the fixed-size figure stands in (expandable segments only hand memory back). SDXL's bf16
# figure with checkpointing was fitted on the sixth session's fast run with checkpointing (6836 MiB reserved in
# training); the 1351 MiB fitted before came from a run whose encoding phase left its cache to training. SD's
# bf16-with-checkpointing figure is the NF4 one (not measured on its own); SDXL without checkpointing is the
# earlier H100 estimate (the checkpointed figure plus the 6.8 GB the peer saves by checkpointing at batch 2).
ACTIVATIONS_MIB = {"sd1": Activations(1190, 550, 550, 377, 512), "sd2": Activations(1190, 550, 550, 377, 512),
                   "sdxl": Activations(4550, 925, 852, 787, 1024)}
HALF, FP32 = 2, 4
# model.quantize_unet=nf4_all with CUDA graphs and expandable segments: the graphs' pool also holds the dequantized
# weights of the convolutions a checkpointed block works with. 303 MiB on SD 1.5 (1528 MiB reserved in training
# against nf4's 2032, whose weights are 807 MiB more), fitted on that run and used for every family (SDXL's nf4_all
# run is the check: +3.7%). In fixed-size segments the training peak stayed at nf4's (2224 MiB reserved against 2204):
# after the convolutions were packed, 1116 MiB stayed reserved for 469 allocated (the probe), so there the U-Net
# counts as nf4's. Without graphs nf4_all keeps this share of the fixed-size activations: 1318 MiB reserved in
# training (SD 1.5, batch 2, checkpointing), fitted on that one run, in fixed-size segments.
NF4_ALL_GRAPH_WORKING_MIB = 303
EAGER_NF4_ALL_ACTIVATIONS = 0.77


@dataclasses.dataclass
class Architecture:
    unet_params: int
    unet_linear_params: int
    unet_conv_params: int                        # convolution weights that model.quantize_unet=nf4_all stores in NF4
    text_encoder_params: int
    vae_params: int
    family: str                                  # sd1, sd2 or sdxl
    target_linear_shapes: list[tuple[int, int]]  # (in, out) of every linear layer that gets LoRA


# Bytes per unit: GB and MB are decimal (10^9, 10^6), GiB and MiB binary (2^30, 2^20) as nvidia-smi counts.
UNITS = {"gb": 1e9, "gib": 2**30, "mb": 1e6, "mib": 2**20, "tb": 1e12, "tib": 2**40}


def parse_size(text: str) -> float:
    """'8GiB', '24 GB', '6144MiB' -> MiB. A unit is required (a bare 8 could be either), and GB means 10^9 bytes:
    24GB is 22.4 GiB. (A card sold as "24 GB" usually holds 24 GiB: nvidia-smi shows 24564 MiB on one.)
    A number that does not parse ('1.2.3') raises ValueError; a missing or unknown unit, a one-line error."""
    match = re.fullmatch(r"\s*([0-9.]*)\s*([A-Za-z ]*?)\s*", text)
    value = float(match.group(1)) if match and match.group(1) else None  # ValueError for '1.2.3'
    unit = match.group(2).lower() if match else ""
    if value is None or unit not in UNITS:
        raise FinetuneError(f"--gpu-memory {text!r}: give the size with its unit, e.g. 8GiB, 24GB or 6144MiB "
                            "(GiB/MiB: 2^30/2^20 bytes, as nvidia-smi counts; GB/MB: 10^9/10^6 bytes)")
    return value * UNITS[unit] / 2**20


def describe_size(text: str, mib: float) -> str:
    """The card as given and in GiB, e.g. '24GB (22.4 GiB)'; '8GiB' for a size given in GiB."""
    given = text.strip()
    return given if given.lower().endswith("gib") else f"{given} ({mib / 1024:.1f} GiB)"


def read_architecture(model_dir: str, unet_targets: str) -> Architecture:
    """Count parameters from the configs alone: the U-Net is built on the meta device, so nothing is allocated."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoConfig, AutoModel

    from .family import decide, folder_facts
    from .lora import UNET_TARGETS
    from .models import nf4_convolutions

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
        unet_conv_params=sum(conv.weight.numel() for conv in nf4_convolutions(unet)),
        text_encoder_params=sum(p.numel() for e in encoders for p in e.parameters()),
        vae_params=sum(p.numel() for p in vae.parameters()),
        family=family.base,
        target_linear_shapes=[(m.in_features, m.out_features) for name, m in linears if pattern.fullmatch(name)])


def unet_bytes(arch: Architecture, quantize: str, weight_bytes: int) -> float:
    """The U-Net's weights: in NF4, 4 bits per weight plus one fp32 scale per 64-weight block; the rest in bf16."""
    if quantize == "none":
        return arch.unet_params * weight_bytes
    in_nf4 = arch.unet_linear_params + (arch.unet_conv_params if quantize == "nf4_all" else 0)
    return in_nf4 * (0.5 + 4 / 64) + (arch.unet_params - in_nf4) * HALF


def estimate(arch: Architecture, train, model, lora, prior, samples_per_step: int, class_images_to_draw: int,
             prompts_cached: bool) -> dict:
    """Peak MiB of each phase and of the run (as nvidia-smi would show it) for these settings; `prompts_cached`:
    DreamBoothConfig.caches_prompt_embeddings (else the text encoders stay on the GPU through training)."""
    weight_bytes = FP32 if train.mixed_precision == "no" else HALF
    # nf4_all under graphs in fixed-size segments kept nf4's peak (the comment on NF4_ALL_GRAPH_WORKING_MIB)
    counted_as = ("nf4" if model.quantize_unet == "nf4_all" and train.cuda_graphs and not train.expandable_segments
                  else model.quantize_unet)
    unet = unet_bytes(arch, counted_as, weight_bytes)
    pixels = (train.resolution / 512) ** 2
    vae_pixels = (min(train.resolution, TILE_PX) / 512) ** 2 if train.vae_tiling else pixels
    phases = {}
    if class_images_to_draw:  # the pipeline in half precision, a batch of images with guidance
        batch = min(prior.generation_batch_size, class_images_to_draw)
        parts = (arch.text_encoder_params * HALF,
                 unet_bytes(arch, model.quantize_unet, HALF) + GENERATE_UNET_MIB_512 * pixels * batch * MIB,
                 arch.vae_params * HALF + DECODE_MIB_512 * vae_pixels * MIB)
        # With prior.generation_offload each model is on the GPU only while it runs.
        phases["class_images"] = max(parts) if prior.generation_offload else sum(parts)
    encoders = arch.text_encoder_params * weight_bytes
    phases["text_encoding"] = encoders
    phases["latent_encoding"] = arch.vae_params * FP32 + VAE_ENCODE_MIB_512 * vae_pixels * MIB
    per_sample = activations_per_sample(ACTIVATIONS_MIB[arch.family], train, model.quantize_unet)
    activations = (per_sample * (train.resolution / ACTIVATIONS_MIB[arch.family].reference_px) ** 2 *
                   samples_per_step * MIB * (EAGER_NF4_ALL_ACTIVATIONS if counted_as == "nf4_all" and
                                             not train.cuda_graphs else 1))
    if counted_as == "nf4_all" and train.cuda_graphs:
        activations += NF4_ALL_GRAPH_WORKING_MIB * MIB
    # Per adapted layer: LoRA r(i + o); DoRA adds a magnitude per output; LoHa holds two such pairs; LoKr's factors
    # are smaller than LoRA's pair, which stays an upper bound for it.
    pairs = 2 if lora.type == "loha" else 1
    lora_params = sum(pairs * lora.rank * (i + o) + (o if lora.type == "dora" else 0)
                      for i, o in arch.target_linear_shapes)
    lora_total = lora_params * (FP32 + FP32 + (2 if train.optimizer == "adamw8bit" else 8))  # weights, grads, state
    if model.quantize_unet == "nf4_all":  # the U-Net arrives as nf4's, its convolutions packed one by one after
        phases["unet_loading"] = unet_bytes(arch, "nf4", HALF)
    phases["training"] = unet + lora_total + activations + (0 if prompts_cached else encoders)
    result = {f"{name}_mib": round(value / MIB) for name, value in phases.items()}
    result["peak_mib"] = round(max(phases.values()) / MIB + CONTEXT_MIB)
    result["peak_phase"] = max(phases, key=lambda name: phases[name])
    return result


def activations_per_sample(measured: Activations, train, quantize_unet: str) -> int:
    """The per-sample figure that describes these settings (Activations says which runs each comes from)."""
    if not train.gradient_checkpointing:
        return measured.plain
    if quantize_unet == "none":
        return measured.checkpointed
    if train.cuda_graphs and train.expandable_segments and measured.quantized_expandable is not None:
        return measured.quantized_expandable
    return measured.quantized


def samples_per_step(cfg) -> int:
    """Per process and micro-batch: the instance images plus as many class images with prior preservation."""
    return cfg.train.batch_size * (2 if cfg.prior.num_class_images else 1)


def estimate_config(cfg, arch: Architecture) -> dict:
    """estimate() for a recipe config as `finetune train` would run it."""
    return estimate(arch, cfg.train, cfg.model, cfg.lora, cfg.prior, samples_per_step(cfg), class_images_to_draw(cfg),
                    cfg.caches_prompt_embeddings())


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
              ("train.mode=low_memory", ["train.mode=low_memory"])]


PHASE_NAMES = {"class_images": "drawing class images", "text_encoding": "encoding prompts",
               "latent_encoding": "encoding photos", "unet_loading": "loading the U-Net", "training": "training"}


def plan_report(config_class: type, config_path: str, overrides: list[str], gpu_mib: float,
                card: str | None = None) -> tuple[str, dict]:
    """The table `finetune plan` prints for a recipe's config (its class, YAML and overrides), and the estimates
    as data; `card` is the card's size as the user wrote it. Each row names the phase that sets its peak."""
    cfg = load(config_class, config_path, overrides)
    arch = read_architecture(cfg.model.pretrained, cfg.lora.unet_targets)
    samples = samples_per_step(cfg)
    rows, estimates = [], {}
    for label, extra in [("as configured", []), *CANDIDATES]:
        variant = load(config_class, config_path, [*overrides, *extra])
        est = estimate_config(variant, arch)
        estimates[label] = est
        fits = "fits" if est["peak_mib"] <= gpu_mib else "too big"
        rows.append(f"  {est['peak_mib'] / 1024:5.1f} GiB  {fits:8s} {label}  (peak: "
                    f"{PHASE_NAMES[est['peak_phase']]})")
    fitting = [label for label, est in estimates.items() if label != "as configured" and est["peak_mib"] <= gpu_mib]
    advice = (f"use: {fitting[0]}" if fitting else
              "nothing fits: lower train.resolution or train.batch_size, or use a bigger card")
    header = (f"{cfg.model.pretrained}: U-Net {arch.unet_params / 1e6:.0f}M params, {cfg.train.resolution} px, "
              f"{samples} samples per step; estimated peak GPU memory (as nvidia-smi shows it) on a "
              f"{card or f'{gpu_mib / 1024:.1f} GiB'} card:")
    return "\n".join([header, *rows, advice]), {"gpu_mib": gpu_mib, "estimates": estimates, "advice": advice,
                                                 "architecture": dataclasses.asdict(arch) | {
                                                     "target_linear_shapes": len(arch.target_linear_shapes)}}

