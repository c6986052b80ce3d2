"""Where a training step's time and memory go: the U-Net + LoRA step alone, in variants, on one GPU.

    python benchmarks/probe_step.py --model /tmp/finetune-bench/model-sd15 --batch 2 --out probe.json

Each variant runs the same step as the recipe (frozen U-Net, LoRA on every attention projection, MSE on noise,
gradient clipping, an optimizer step) on fixed random latents and embeddings, and reports the median step time
(CUDA events around a block of steps, no host sync inside), the reserved memory peak, and for one variant a
profile table of where the GPU time goes. It isolates the U-Net step from data, logging and checkpointing, so the
gap between this and the recipe's steady it/s is the loop's own overhead.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusers.training_utils import cast_training_params  # noqa: E402

from finetune.config import LoraConfig  # noqa: E402
from finetune.lora import add_unet_lora, lora_parameters  # noqa: E402

VARIANTS = {  # name -> (frozen weight dtype, autocast dtype or None, optimizer, channels_last, checkpointing, compile)
    # fp8 storage: diffusers' layerwise casting (frozen weights kept in float8_e4m3fn, each layer cast to bf16 for
    # its forward), with checkpointing so the bf16 copies live one block at a time.
    "fp16_autocast_bnb8bit": (torch.float16, torch.float16, "bnb8bit", False, False, False),
    "bf16_autocast_bnb8bit": (torch.bfloat16, torch.bfloat16, "bnb8bit", False, False, False),
    "bf16_autocast_fused_adamw": (torch.bfloat16, torch.bfloat16, "fused", False, False, False),
    "bf16_channels_last_fused": (torch.bfloat16, torch.bfloat16, "fused", True, False, False),
    "bf16_checkpointing_fused": (torch.bfloat16, torch.bfloat16, "fused", False, True, False),
    "bf16_compile_fused": (torch.bfloat16, torch.bfloat16, "fused", False, False, True),
    "fp8_storage_checkpointing_fused": (torch.float8_e4m3fn, None, "fused", False, True, False),
    "bf16_checkpointing_noautocast_fused": (torch.bfloat16, None, "fused", False, True, False),
}


def build(model: str, variant: tuple, rank: int):
    from diffusers import UNet2DConditionModel
    dtype, _, opt, channels_last, checkpointing, _ = variant
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    unet.requires_grad_(False)
    add_unet_lora(unet, LoraConfig(rank=rank, alpha=float(rank), unet_targets="all_attention"))
    if dtype == torch.float8_e4m3fn:
        unet.to("cuda", torch.bfloat16)
        unet.enable_layerwise_casting(storage_dtype=dtype, compute_dtype=torch.bfloat16,
                                      skip_modules_pattern=("norm", "lora_", "time_embedding", "conv_in", "conv_out"))
    else:
        unet.to("cuda", dtype)
    cast_training_params(unet, torch.float32)
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    params = lora_parameters(unet)
    if opt == "bnb8bit":
        import bitsandbytes as bnb
        optimizer = bnb.optim.AdamW8bit(params, lr=1e-4, min_8bit_size=0)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    return unet, params, optimizer


def make_step(unet, params, optimizer, autocast_dtype, scaler, compile_unet: bool):
    forward = torch.compile(unet) if compile_unet else unet

    def step(latents, embeddings, noise, timesteps):
        with torch.autocast("cuda", dtype=autocast_dtype, enabled=autocast_dtype is not None):
            noisy = latents + noise if autocast_dtype is not None else (latents + noise).to(torch.bfloat16)
            prediction = forward(noisy, timesteps, embeddings).sample
        loss = F.mse_loss(prediction.float(), noise.float())
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def run_variant(model: str, name: str, batch: int, size: int, steps: int, rank: int, profile: bool) -> dict:
    variant = VARIANTS[name]
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    unet, params, optimizer = build(model, variant, rank)
    scaler = torch.amp.GradScaler("cuda") if variant[1] == torch.float16 else None
    step = make_step(unet, params, optimizer, variant[1], scaler, variant[5])
    g = torch.Generator("cuda").manual_seed(0)
    fmt = torch.channels_last if variant[3] else torch.contiguous_format
    inputs = [(torch.randn(batch, 4, size, size, device="cuda", generator=g).to(memory_format=fmt),
               torch.randn(batch, 77, unet.config.cross_attention_dim, device="cuda", generator=g,
                           dtype=torch.bfloat16 if variant[0] == torch.float8_e4m3fn else variant[0]),
               torch.randn(batch, 4, size, size, device="cuda", generator=g).to(memory_format=fmt),
               torch.randint(0, 1000, (batch,), device="cuda", generator=g)) for _ in range(4)]
    first = time.perf_counter()
    for i in range(5):
        step(*inputs[i % 4])
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - first
    times = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(steps):
            step(*inputs[i % 4])
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / steps)
    result = {"variant": name, "batch": batch, "ms_per_step": round(sorted(times)[1], 2),
              "ms_spread": [round(t, 2) for t in times], "it_per_s": round(1000 / sorted(times)[1], 2),
              "peak_reserved_mib": round(torch.cuda.max_memory_reserved() / 2**20),
              "setup_s": round(first - t0, 1), "warmup_s": round(warm_s, 1)}
    if profile:
        result["profile"] = profile_steps(step, inputs)
    del unet, params, optimizer, step
    return result


def profile_steps(step, inputs) -> str:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(5):
            step(*inputs[i % 4])
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=50)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="a diffusers folder (benchmarks/models.py builds one)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--batch", type=int, default=2, help="1 instance + 1 class image = 2")
    parser.add_argument("--latent-size", type=int, default=64, help="64 for 512 px, 128 for 1024 px")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--profile", default="bf16_autocast_fused_adamw", help="variant to profile ('' for none)")
    parser.add_argument("--out", default="probe.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("probe_step.py times CUDA steps: run it on a machine with an NVIDIA GPU")
    results = []
    for name in args.variants.split(","):
        try:
            results.append(run_variant(args.model, name, args.batch, args.latent_size, args.steps, args.rank,
                                       name == args.profile))
        except Exception as error:  # one broken variant must not cost the others' figures
            results.append({"variant": name, "error": f"{type(error).__name__}: {error}"[:500]})
        print(json.dumps({k: v for k, v in results[-1].items() if k != "profile"}), flush=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
    for r in results:
        if "profile" in r:
            print(r["profile"])


if __name__ == "__main__":
    main()
