"""Where the low-memory peaks and the end-to-end seconds go: measurements that choose issue 15's levers.

    python benchmarks/probe_memory.py unet-load --model /tmp/finetune-bench/model-sdxl --out load.json
    python benchmarks/probe_memory.py class-images --model /tmp/finetune-bench/model-sd15 --out classes.json
    python benchmarks/probe_memory.py imports --out imports.json
    python benchmarks/probe_memory.py nf4-convs --model /tmp/finetune-bench/model-sd15 --out convs.json
    python benchmarks/probe_memory.py layouts --model /tmp/finetune-bench/model-sd15 --out layouts.json
    python benchmarks/probe_memory.py recordings --model /tmp/finetune-bench/model-sd15 --out recordings.json
    python benchmarks/probe_memory.py allocator --out allocator.json

`unet-load` loads the SDXL U-Net in NF4 three ways, each in a process of its own (so each peak is its own):
quantized while it loads (what diffusers' bitsandbytes loader does from a bf16/fp16 folder), loaded from a folder
that holds it already quantized (diffusers' `save_pretrained` of the 4-bit model), and the same through
`finetune.models.load_nf4_unet` with the quantized copy in its cache. `class-images` draws SD1.5 class images at
several (steps, batch) settings and reports seconds per image and the reserved peak. `imports` times what the CLI
imports before it does anything. `nf4-convs` loads the U-Net with model.quantize_unet=nf4 and nf4_all (each in a
process of its own, expandable segments on as in low_memory) and takes an eager and a CUDA-graph training step
with checkpointing at batch 2: memory after loading, what autograd saves in the forward, each step's peak, the
device memory outside PyTorch's allocator, and each memory pool's segments after the CUDA-graph recording.
`layouts` draws class images and takes fast-mode training steps with the U-Net in channels-last memory format
and/or cuDNN's autotuner on, each in a process of its own. `recordings` records an nf4_all U-Net's training step
as CUDA graphs in five ways (measure_recording says which) and reports each memory pool before and after.
`allocator` sets PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True at three points of a fresh process and reports
whether the allocator's segments became expandable.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# The layout probe also runs on a CPU on a tiny model (a dry run of the script; its timings mean nothing there).
DEVICE = "cuda" if os.environ.get("PROBE_DEVICE", "cuda") == "cuda" else "cpu"


def synchronize() -> None:
    import torch
    if DEVICE == "cuda":
        torch.cuda.synchronize()


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


def nf4_training_step_setup(how: str, model: str, latent: int, out: dict):
    """A 4-bit U-Net (model.quantize_unet=how) with fp32 LoRA on every attention projection and checkpointing, as
    low_memory trains it, an AdamW over the LoRA and a batch-2 input; the memory after loading and packing goes
    into `out`. Returns (unet, optimizer, latents, text embeddings, timesteps)."""
    import torch
    from diffusers.training_utils import cast_training_params

    from finetune.config import LoraConfig, ModelConfig
    from finetune.lora import add_unet_lora, lora_parameters
    from finetune.models import load_nf4_unet, store_convolutions_in_nf4

    mib = 2**20
    unet = load_nf4_unet(ModelConfig(pretrained=model, quantize_unet=how), torch.bfloat16)
    out["loaded_allocated_mib"] = round(torch.cuda.memory_allocated() / mib)
    out["loaded_outside_torch_mib"] = outside_torch_mib()
    if how == "nf4_all":
        out["convolutions_stored"] = store_convolutions_in_nf4(unet)
    torch.cuda.empty_cache()
    out["weights_allocated_mib"] = round(torch.cuda.memory_allocated() / mib)
    out["weights_reserved_mib"] = round(torch.cuda.memory_reserved() / mib)
    add_unet_lora(unet, LoraConfig(rank=4, unet_targets="all_attention"))
    unet.enable_gradient_checkpointing()
    unet.train()
    cast_training_params(unet, dtype=torch.float32)  # fp32 LoRA on the bf16 U-Net, as the recipe trains it
    optimizer = torch.optim.AdamW(lora_parameters(unet), lr=1e-4)
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(2, 4, latent, latent, device="cuda", generator=g)
    emb = torch.randn(2, 77, unet.config.cross_attention_dim, device="cuda", generator=g)
    t = torch.tensor([10, 500], device="cuda")
    return unet, optimizer, x, emb, t


def measure_nf4_step(how: str, model: str, latent: int) -> dict:
    import torch
    import torch.nn.functional as F

    from finetune.training.unet_call import UNetForward

    mib = 2**20
    out: dict = {"quantize_unet": how}
    unet, optimizer, x, emb, t = nf4_training_step_setup(how, model, latent, out)
    for use_graphs in (False, True):
        forward = UNetForward(unet, torch.bfloat16, use_graphs=use_graphs)
        saved: list[int] = []

        def count(tensor, saved=saved):
            saved.append(tensor.numel() * tensor.element_size())
            return tensor
        torch.cuda.reset_peak_memory_stats()
        for i in range(4):
            counting = i == 0 and not use_graphs
            with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t) if counting else contextlib.nullcontext():
                loss = F.mse_loss(forward(x, t, emb).float(), x)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=not use_graphs)
        torch.cuda.synchronize()
        name = "graphs" if use_graphs else "eager"
        if not use_graphs:
            out["eager_saved_in_forward_mib"] = round(sum(saved) / mib)
        out[f"{name}_peak_allocated_mib"] = round(torch.cuda.max_memory_allocated() / mib)
        out[f"{name}_peak_reserved_mib"] = round(torch.cuda.max_memory_reserved() / mib)
        out[f"{name}_outside_torch_mib"] = outside_torch_mib()
        if use_graphs:
            out["pools_after_recording"] = pools(torch.cuda.memory_snapshot())
        t0 = time.perf_counter()
        for _ in range(10):
            loss = F.mse_loss(forward(x, t, emb).float(), x)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=not use_graphs)
        torch.cuda.synchronize()
        out[f"{name}_it_per_s"] = round(10 / (time.perf_counter() - t0), 2)
    return out


def outside_torch_mib() -> int:
    """Device memory in use that PyTorch's allocator does not hold: the CUDA context, libraries' code and handles."""
    import torch
    free, total = torch.cuda.mem_get_info()
    return round((total - free - torch.cuda.memory_reserved()) / 2**20)


def pools(snapshot: list[dict]) -> list[dict]:
    """Per memory pool (the default one and each CUDA graph's) and CUDA stream: segments, their size, what is
    allocated in them, and the largest segments, in MiB. The stream tells a side stream's warm-up memory apart."""
    by_pool: dict = {}
    for segment in snapshot:
        key = f"{segment.get('segment_pool_id')} stream {segment.get('stream')}"
        pool = by_pool.setdefault(key, {"segments": 0, "total": 0, "allocated": 0, "sizes": []})
        pool["segments"] += 1
        pool["total"] += segment["total_size"]
        pool["allocated"] += segment["allocated_size"]
        pool["sizes"].append(segment["total_size"])
    return [{"pool": key, "segments": v["segments"], "total_mib": round(v["total"] / 2**20),
             "allocated_mib": round(v["allocated"] / 2**20),
             "largest_mib": [round(size / 2**20, 1) for size in sorted(v["sizes"], reverse=True)[:8]]}
            for key, v in by_pool.items()]


def in_fresh_process(one: str, how: str, key: str, arguments: list[str], env: dict | None = None,
                     **noted) -> dict:
    """`probe_memory.py ONE --how HOW ARGUMENTS` in a process of its own (so each peak is its own, and CUDA starts
    afresh): its last line of output as JSON, with `noted` added; if it failed, {key: how, "error": the end of its
    stderr}. Printed as it comes."""
    proc = subprocess.run([sys.executable, __file__, one, "--how", how, *arguments], capture_output=True, text=True,
                          env=env)
    lines = proc.stdout.strip().splitlines()
    result = ({**json.loads(lines[-1]), **noted} if proc.returncode == 0 and lines else
              {key: how, "error": proc.stderr[-2000:]})
    print(json.dumps(result), flush=True)
    return result


def nf4_convs(args) -> list[dict]:
    step = ["--model", args.model, "--latent", str(args.latent)]
    return [in_fresh_process("nf4-step-one", how, "quantize_unet", step,
                             {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": alloc}, alloc_conf=alloc)
            for how, alloc in (("nf4", "expandable_segments:True"), ("nf4_all", "expandable_segments:True"),
                               ("nf4_all", "expandable_segments:False"))]


def measure_recording(how: str, model: str, latent: int) -> dict:
    """An nf4_all U-Net's CUDA-graph training step, recorded one of five ways, in a fresh process (no eager step
    before it, as in training): where each memory pool stands before and after recording, and the peak.

    torch: make_graphed_callables with its own 3 warm-up calls (on a side stream), as unet_call does now.
    own_warmup: 3 warm-up calls of ours on a side stream, everything they made let go and the cache emptied, then
    make_graphed_callables with no warm-up of its own. main_warmup: the same on the main stream, not a side one.
    one_warmup: torch's warm-up, once instead of 3 times. no_warmup: none at all (the recording may fail: lazy
    initialisation inside a capture is an error; the failure is then the result).
    """
    import gc

    import torch
    import torch.nn.functional as F

    from finetune.lora import lora_parameters
    from finetune.training.unet_call import UNetOnTensors

    mib = 2**20
    out: dict = {"recording": how}
    unet, optimizer, x, emb, t = nf4_training_step_setup("nf4_all", model, latent, out)
    samples = (x.to(torch.bfloat16), t, emb.to(torch.bfloat16))
    module = UNetOnTensors(unet)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    out["before"] = pools(torch.cuda.memory_snapshot())

    def warm_up(times: int) -> None:
        for _ in range(times):
            prediction = module(*samples)
            grads = torch.autograd.grad(prediction.float().square().mean(), lora_parameters(unet))
            del prediction, grads
    t0 = time.perf_counter()
    if how in ("own_warmup", "main_warmup"):
        side = torch.cuda.Stream() if how == "own_warmup" else torch.cuda.current_stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            warm_up(3)
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.empty_cache()
        out["after_warmup"] = pools(torch.cuda.memory_snapshot())
    warmups = {"torch": 3, "one_warmup": 1}.get(how, 0)
    graphed = torch.cuda.make_graphed_callables(module, samples, num_warmup_iters=warmups)
    torch.cuda.synchronize()
    out["recording_s"] = round(time.perf_counter() - t0, 2)
    out["after_recording"] = pools(torch.cuda.memory_snapshot())
    gc.collect()
    torch.cuda.empty_cache()
    out["after_empty_cache"] = pools(torch.cuda.memory_snapshot())
    out["recording_peak_reserved_mib"] = round(torch.cuda.max_memory_reserved() / mib)
    out["recording_peak_allocated_mib"] = round(torch.cuda.max_memory_allocated() / mib)
    for count in (3, 20):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(count):
            loss = F.mse_loss(graphed(*samples).float(), x)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)
        torch.cuda.synchronize()
    out["it_per_s"] = round(20 / (time.perf_counter() - t0), 2)
    out["peak_reserved_mib"] = round(torch.cuda.max_memory_reserved() / mib)
    out["end"] = pools(torch.cuda.memory_snapshot())
    out["outside_torch_mib"] = outside_torch_mib()
    out["device_used_mib"] = round((torch.cuda.mem_get_info()[1] - torch.cuda.mem_get_info()[0]) / mib)
    return out


def recordings(args) -> list[dict]:
    env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    return [in_fresh_process("record-one", how, "recording", ["--model", args.model, "--latent", str(args.latent)],
                             env) for how in args.recordings.split(",")]


def measure_layout_step(layout: str, model: str, latent: int) -> dict:
    """A fast-mode training step (bf16 U-Net, fp32 LoRA, CUDA graphs, batch 2) in a given memory layout."""
    import torch
    import torch.nn.functional as F
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import cast_training_params

    from finetune.config import LoraConfig
    from finetune.lora import add_unet_lora, lora_parameters
    from finetune.training.unet_call import UNetForward

    torch.backends.cudnn.benchmark = "benchmark" in layout
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=torch.bfloat16).to(DEVICE)
    add_unet_lora(unet, LoraConfig(rank=4, unet_targets="all_attention"))
    cast_training_params(unet, dtype=torch.float32)
    memory_format = torch.channels_last if "channels_last" in layout else torch.contiguous_format
    unet.to(memory_format=memory_format)
    unet.train()
    optimizer = torch.optim.AdamW(lora_parameters(unet), lr=1e-4, fused=True)
    g = torch.Generator(DEVICE).manual_seed(0)
    x = torch.randn(2, 4, latent, latent, device=DEVICE, generator=g).to(memory_format=memory_format)
    emb = torch.randn(2, 77, unet.config.cross_attention_dim, device=DEVICE, generator=g)
    t = torch.tensor([10, 500], device=DEVICE)
    forward = UNetForward(unet, torch.bfloat16, use_graphs=DEVICE == "cuda")
    out: dict = {"layout": layout}
    for phase, count in (("warm", 5), ("timed", 40)):
        synchronize()
        t0 = time.perf_counter()
        for _ in range(count):
            loss = F.mse_loss(forward(x, t, emb).float(), x)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)
        synchronize()
        out[f"{phase}_s"] = round(time.perf_counter() - t0, 3)
    out["it_per_s"] = round(40 / out["timed_s"], 2)
    out["peak_reserved_mib"] = round(torch.cuda.max_memory_reserved() / 2**20) if DEVICE == "cuda" else None
    return out


def layouts(args) -> list[dict]:
    """Drawing (20 steps x batch 8, as the shipped setting) and a fast-mode step, in each layout."""
    return [in_fresh_process("layout-one", layout, "layout", ["--model", args.model, "--latent", str(args.latent),
                                                              "--count", str(args.count), "--work", args.work])
            for layout in args.layouts.split(",")]


def measure_layout(layout: str, model: str, latent: int, count: int, work: str) -> dict:
    import torch
    from diffusers import StableDiffusionPipeline

    from finetune.config import ModelConfig, PriorConfig
    from finetune.data.class_images import generate_class_images
    from finetune.models import load_pipeline

    torch.backends.cudnn.benchmark = "benchmark" in layout
    pipe = load_pipeline(ModelConfig(pretrained=model), StableDiffusionPipeline, dtype=torch.bfloat16).to(DEVICE)
    if "channels_last" in layout:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    prior = PriorConfig(num_class_images=count, generation_batch_size=8, generation_steps=20)
    folder = Path(work) / f"layout-{layout}"
    generate_class_images(pipe, folder, "a photo of dog", prior, 8 * latent, 0, DEVICE, range(0, 8))  # warm-up
    synchronize()
    t0 = time.perf_counter()
    generate_class_images(pipe, folder, "a photo of dog", prior, 8 * latent, 0, DEVICE, range(8, 8 + count))
    synchronize()
    drawing = {"s_per_image": round((time.perf_counter() - t0) / count, 4)}
    del pipe
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return {**measure_layout_step(layout, model, latent), **drawing}


def unet_load(args) -> list[dict]:
    return [in_fresh_process("load-one", how, "load", ["--model", args.model, "--work", args.work],
                             {**os.environ, **({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
                                               if expandable else {})}, expandable_segments=expandable)
            for how, expandable in (("quantize_on_load", False), ("quantize_on_load", True), ("prequantized", False),
                                    ("prequantized", True))]


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


def measure_allocator_order(when: str) -> dict:
    """Whether PyTorch's allocator sees PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, by when it is set: in
    the environment before Python starts, after `import torch`, or after `import bitsandbytes` (where the recipe
    used to set it). Two 64 MiB tensors share one segment only when segments are expandable (otherwise each large
    allocation gets a cudaMalloc of its own)."""
    from finetune.allocator import EXPANDABLE, VARIABLE
    if when == "after_torch":
        import torch
        os.environ[VARIABLE] = EXPANDABLE
    import bitsandbytes  # noqa: F401
    import torch
    started = torch.cuda.is_initialized()
    if when == "after_bitsandbytes":
        os.environ[VARIABLE] = EXPANDABLE
    first, second = (torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda") for _ in range(2))
    snapshot = torch.cuda.memory_snapshot()

    def holder(tensor) -> int:
        return next(i for i, s in enumerate(snapshot)
                    if s["address"] <= tensor.data_ptr() < s["address"] + s["total_size"])
    return {"set": when, "cuda_started_by_imports": started, "segments": len(snapshot),
            "one_segment": holder(first) == holder(second),
            "is_expandable": [s.get("is_expandable") for s in snapshot]}


def allocator(args) -> list[dict]:
    from finetune.allocator import EXPANDABLE, VARIABLE
    without = {key: value for key, value in os.environ.items() if key != VARIABLE}
    return [in_fresh_process("allocator-one", when, "set", [],
                             {**without, VARIABLE: EXPANDABLE} if when == "environment" else without)
            for when in ("environment", "after_torch", "after_bitsandbytes")]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["unet-load", "load-one", "class-images", "imports", "nf4-convs",
                                         "nf4-step-one", "layouts", "layout-one", "recordings", "record-one",
                                         "allocator", "allocator-one"])
    parser.add_argument("--recordings", default="torch,own_warmup,main_warmup,one_warmup,no_warmup",
                        help="recordings: ways to record the CUDA graphs, comma-separated")
    parser.add_argument("--layouts", default="plain,channels_last,benchmark,channels_last+benchmark",
                        help="layouts: memory format and cuDNN autotuning, comma-separated")
    parser.add_argument("--latent", type=int, default=64, help="nf4-convs: latent size (64 for 512 px)")
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
    if args.what == "record-one":
        print(json.dumps(measure_recording(args.how, args.model, args.latent)))
        return
    if args.what == "layout-one":
        print(json.dumps(measure_layout(args.how, args.model, args.latent, args.count, args.work)))
        return
    if args.what == "allocator-one":
        print(json.dumps(measure_allocator_order(args.how)))
        return
    if args.what == "nf4-step-one":
        print(json.dumps(measure_nf4_step(args.how, args.model, args.latent)))
        return
    results = {"unet-load": unet_load, "class-images": class_images, "imports": imports,
               "nf4-convs": nf4_convs, "layouts": layouts,
               "recordings": recordings, "allocator": allocator}[args.what](args)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
