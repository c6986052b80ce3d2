"""Where the low-memory peaks and the end-to-end seconds go: measurements that choose issue 15's levers.

    python benchmarks/probe_memory.py unet-load --model /tmp/finetune-bench/model-sdxl --out load.json
    python benchmarks/probe_memory.py class-images --model /tmp/finetune-bench/model-sd15 --out classes.json
    python benchmarks/probe_memory.py imports --out imports.json

`unet-load` loads the SDXL U-Net in NF4 three ways, each in a process of its own (so each peak is its own):
quantized while it loads (what diffusers' bitsandbytes loader does from a bf16/fp16 folder), loaded from a folder
that holds it already quantized (diffusers' `save_pretrained` of the 4-bit model), and the same through
`finetune.models.load_nf4_unet` with the quantized copy in its cache. `class-images` draws SD1.5 class images at
several (steps, batch) settings and reports seconds per image and the reserved peak. `imports` times what the CLI
imports before it does anything.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def measure_load(how: str, model: str, quantized: str) -> dict:
    import torch
    from diffusers import BitsAndBytesConfig, UNet2DConditionModel

    torch.cuda.init()
    base = torch.cuda.memory_reserved()
    t0 = time.perf_counter()
    if how == "quantize_on_load":
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                    bnb_4bit_compute_dtype=torch.bfloat16)
        unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", quantization_config=config,
                                                    torch_dtype=torch.bfloat16)
        seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        unet.save_pretrained(quantized)
        save_s = time.perf_counter() - t1
    elif how == "prequantized":
        unet = UNet2DConditionModel.from_pretrained(quantized, torch_dtype=torch.bfloat16)
        seconds, save_s = time.perf_counter() - t0, 0.0
    else:
        raise SystemExit(f"unknown load {how}")
    torch.cuda.synchronize()
    stats = torch.cuda.memory_stats()
    return {"load": how, "seconds": round(seconds, 2), "save_seconds": round(save_s, 2),
            "peak_inactive_split_mib": round(stats.get("inactive_split_bytes.all.peak", 0) / 2**20),
            "peak_reserved_mib": round((torch.cuda.max_memory_reserved() - base) / 2**20),
            "peak_allocated_mib": round(torch.cuda.max_memory_allocated() / 2**20),
            "allocated_after_mib": round(torch.cuda.memory_allocated() / 2**20),
            "device": str(next(unet.parameters()).device),
            "folder_mib": round(sum(f.stat().st_size for f in Path(quantized).rglob("*") if f.is_file()) / 2**20)
            if Path(quantized).is_dir() else None}


def unet_load(args) -> list[dict]:
    results = []
    for how, expandable in (("quantize_on_load", False), ("quantize_on_load", True), ("prequantized", False),
                            ("prequantized", True)):
        env = {**os.environ, **({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"} if expandable else {})}
        proc = subprocess.run([sys.executable, __file__, "load-one", "--how", how, "--model", args.model,
                               "--work", args.work], capture_output=True, text=True, env=env)
        lines = proc.stdout.strip().splitlines()
        results.append({**json.loads(lines[-1]), "expandable_segments": expandable}
                       if proc.returncode == 0 and lines else {"load": how, "error": proc.stderr[-1500:]})
        print(json.dumps(results[-1]), flush=True)
    return results


def class_images(args) -> list[dict]:
    import torch
    from diffusers import StableDiffusionPipeline

    from finetune.config import ModelConfig, PriorConfig
    from finetune.data.class_images import generate_class_images
    from finetune.models import load_pipeline

    pipe = load_pipeline(ModelConfig(pretrained=args.model), StableDiffusionPipeline,
                         dtype=torch.bfloat16).to("cuda")
    results = []
    for setting in args.settings.split(","):
        steps, batch = (int(v) for v in setting.split("x"))
        folder = Path(args.work) / f"classes-{steps}x{batch}"
        prior = PriorConfig(num_class_images=args.count, generation_batch_size=batch, generation_steps=steps)
        generate_class_images(pipe, folder, "a photo of dog", prior, 512, 0, "cuda", range(0, batch))  # warm-up
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        generate_class_images(pipe, folder, "a photo of dog", prior, 512, 0, "cuda", range(batch, batch + args.count))
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        results.append({"steps": steps, "batch": batch, "images": args.count,
                        "s_per_image": round(seconds / args.count, 4), "seconds": round(seconds, 2),
                        "peak_reserved_mib": round(torch.cuda.max_memory_reserved() / 2**20)})
        print(json.dumps(results[-1]), flush=True)
    return results


def imports(args) -> list[dict]:
    results = []
    for what in ("import finetune.cli", "import torch", "import diffusers", "import finetune.training.loop"):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", what], check=True)
        results.append({"import": what, "seconds": round(time.perf_counter() - t0, 2)})
        print(json.dumps(results[-1]), flush=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "finetune", "--help"], check=True, capture_output=True)
    results.append({"command": "finetune --help", "seconds": round(time.perf_counter() - t0, 2)})
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", "import finetune.cli"], capture_output=True,
                          text=True)
    rows = [line.split("|") for line in proc.stderr.splitlines() if line.startswith("import time:")][1:]
    top = sorted(((int(r[1]), r[2].rstrip()) for r in rows if r[1].strip().isdigit()), reverse=True)[:25]
    results.append({"importtime_top_cumulative_us": top})
    print(json.dumps(results[-2:]), flush=True)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["unet-load", "load-one", "class-images", "imports"])
    parser.add_argument("--model", default=None, help="a diffusers folder (benchmarks/models.py builds one)")
    parser.add_argument("--work", default="/tmp/probe-memory")
    parser.add_argument("--how", default="quantize_on_load", help=argparse.SUPPRESS)
    parser.add_argument("--settings", default="25x4,25x8,20x8,20x16,15x16", help="steps x batch, comma-separated")
    parser.add_argument("--count", type=int, default=48, help="class images per setting")
    parser.add_argument("--out", default="probe-memory.json")
    args = parser.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    if args.what == "load-one":
        print(json.dumps(measure_load(args.how, args.model, str(Path(args.work) / "unet-nf4"))))
        return
    results = {"unet-load": unet_load, "class-images": class_images, "imports": imports}[args.what](args)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
