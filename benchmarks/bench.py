"""finetune vs the peer (diffusers' DreamBooth-LoRA script) on one GPU: same model, images and settings.

    python benchmarks/bench.py --arch sd15 --steps 150 --ours custom,fast,low_memory --e2e-steps 500 \
        --peer default,checkpointing --peer-dir .bench/reference --out results.json

Builds a random-weight model of the real architecture, 5 instance photos and 100 class images (once, shared by
both), then runs each of our variants and the peer's as separate processes, sampling nvidia-smi for the peak.
This process never touches the GPU itself, so nvidia-smi's reading is the run's alone. With --e2e-steps, one more
run of ours (train.mode=fast) starts from an empty class folder and is timed from process start to the exported
file. Prints a markdown row per figure for BENCHMARKS.md and writes everything as JSON.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONFIGS = {"sd15": "recipes/configs/sd15_dreambooth_lora.yaml", "sdxl": "recipes/configs/sdxl_dreambooth_lora.yaml",
           "tiny": "recipes/configs/sd15_dreambooth_lora.yaml"}
RESOLUTION = {"sd15": 512, "sdxl": 1024, "tiny": 64}
# `tiny` runs the same code path on a CPU in seconds (the tests use it so the benchmark cannot rot).
TINY_OVERRIDES = ["train.mixed_precision=no", "train.optimizer=adamw", "train.resolution=64",
                  "prior.num_class_images=8"]
NUM_CLASS = {"sd15": 100, "sdxl": 100, "tiny": 8}
# The SDXL config draws validation grids while training; the peer draws none, and drawing is not a step.
# The peer trains rank 4 on square center crops: so does ours here.
ARCH_OVERRIDES = {"sdxl": ["validation.prompts=[]", "validation.before_after=false", "lora.rank=4", "lora.alpha=4",
                           "data.buckets=false"]}
# Our variants: name -> overrides on top of the shipped config. The peer's: name -> extra flags.
# The peer puts LoRA on every attention projection (self and cross): ours does the same here, for the same job.
SAME_JOB = ["lora.unet_targets=all_attention"]
# custom: fp16 under autocast, 8-bit AdamW, eager (the settings before train.mode existed, and the peer's).
OURS = {"custom": [*SAME_JOB, "train.mode=custom"], "fast": [*SAME_JOB, "train.mode=fast"],
        "low_memory": [*SAME_JOB, "train.mode=low_memory"],
        "fast_checkpointing": [*SAME_JOB, "train.mode=fast", "train.gradient_checkpointing=true"],
        "fast_no_checkpointing": [*SAME_JOB, "train.mode=fast", "train.gradient_checkpointing=false"],
        "low_memory_draws": [*SAME_JOB, "train.mode=low_memory"],
        "low_memory_linear_nf4": [*SAME_JOB, "train.mode=low_memory", "model.quantize_unet=nf4"],
        "low_memory_all_nf4_eager": [*SAME_JOB, "train.mode=low_memory", "model.quantize_unet=nf4_all",
                                     "train.cuda_graphs=false"],
        "low_memory_all_nf4": [*SAME_JOB, "train.mode=low_memory", "model.quantize_unet=nf4_all"],
        "fast_channels_last": [*SAME_JOB, "train.mode=fast", "train.channels_last=true"],
        "fast_checkpointing_channels_last": [*SAME_JOB, "train.mode=fast", "train.gradient_checkpointing=true",
                                             "train.channels_last=true"],
        "low_memory_channels_last": [*SAME_JOB, "train.mode=low_memory", "train.channels_last=true"]}
# Variants that draw this many class images into an empty folder first: the drawing phase's time and memory.
DRAWS = {"low_memory_draws": 4}
PEER = {"default": ["--use_8bit_adam"], "checkpointing": ["--use_8bit_adam", "--gradient_checkpointing"]}


class GpuMemorySampler:
    """Peak of nvidia-smi's memory.used over a process's life (what a user's card must have)."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        try:
            proc = subprocess.Popen(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                     "-lms", "100"], stdout=subprocess.PIPE, text=True)
        except FileNotFoundError:  # no NVIDIA GPU: nothing to sample
            self.peak = None
            return
        for line in proc.stdout:
            if line.strip().split(",")[0].strip().isdigit():
                self.peak = max(self.peak, int(line.strip().split(",")[0]))
            if self._stop.is_set():
                break
        proc.kill()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        time.sleep(0.3)
        self._stop.set()


def prepare(arch: str, work: Path, shared_classes: bool = True) -> dict:
    """Model, photos and class images, built once and shared by every run."""
    from benchmarks.models import build_sd15, build_sdxl
    from finetune.demo import prepare_photos
    from finetune.tiny import build_tiny_sd

    model = work / f"model-{arch}"
    if not (model / "model_index.json").is_file():
        t0 = time.perf_counter()
        {"sd15": build_sd15, "sdxl": build_sdxl, "tiny": build_tiny_sd}[arch](model)
        print(f"built {arch} in {time.perf_counter() - t0:.0f} s", flush=True)
    photos = work / "photos"
    if not photos.is_dir():
        prepare_photos(photos)
        (photos / "cat_3.txt").unlink()  # the peer reads no caption files; keep the job identical
    classes = work / f"class-{arch}"
    timing = {}
    if shared_classes and len(list(classes.glob("*.png"))) < NUM_CLASS[arch]:  # in a child: this one holds no GPU
        proc = subprocess.run([sys.executable, __file__, "--classes-only", "--arch", arch, "--work", str(work)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"class image generation failed:\n{proc.stderr[-3000:]}")
        timing = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"model": model, "photos": photos, "classes": classes, **timing}


def generate_classes(arch: str, model: Path, folder: Path) -> dict:
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from finetune.config import ModelConfig, PriorConfig
    from finetune.data.class_images import generate_class_images
    from finetune.models import load_pipeline

    cuda = torch.cuda.is_available()
    device, sync = ("cuda", torch.cuda.synchronize) if cuda else ("cpu", lambda: None)
    cls = StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline
    dtype = torch.float16 if cuda else torch.float32
    pipe = load_pipeline(ModelConfig(pretrained=str(model)), cls, dtype=dtype).to(device)
    # SDXL's class images only need to exist (random weights draw noise anyway); 4 steps keep the GPU lease for
    # the training runs. Their time per image is reported for SD1.5 only.
    count, steps = NUM_CLASS[arch], {"sd15": 25, "sdxl": 4, "tiny": 2}[arch]
    prior = PriorConfig(num_class_images=count, generation_batch_size=8, generation_steps=steps)
    generate_class_images(pipe, folder, "a photo of dog", prior, RESOLUTION[arch], 0, device, range(0, 4))  # warm-up
    sync()
    t0 = time.perf_counter()
    generate_class_images(pipe, folder, "a photo of dog", prior, RESOLUTION[arch], 0, device, range(4, count))
    sync()
    seconds = time.perf_counter() - t0
    del pipe
    return {"class_images_s_per_image": round(seconds / (count - 4), 4),
            "class_images_settings": f"dpm++ {steps} steps, batch 8"}


def launcher(how: str, arch: str) -> list[str]:
    """`accelerate launch` (README's first command) or `finetune train` without it (the single-GPU command)."""
    if how == "direct":
        return [sys.executable, "-m", "finetune"]
    precision = "no" if arch == "tiny" else "fp16"
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
            "--mixed_precision", precision, "--dynamo_backend", "no", "-m", "finetune"]


def run_ours(arch: str, data: dict, steps: int, name: str, overrides: list[str], work: Path,
             launch: str = "accelerate") -> dict:
    out = work / f"ours-{arch}-{name}"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    cmd = [*launcher(launch, arch), "train", CONFIGS[arch],
           f"model.pretrained={data['model']}", f"data.instance_dir={data['photos']}",
           f"data.class_dir={data['classes']}", "data.instance_prompt=a photo of sks dog",
           "data.class_prompt=a photo of dog", f"train.max_steps={steps}", "train.checkpoint_every=0",
           f"output_dir={out}", *(TINY_OVERRIDES if arch == "tiny" else []), *ARCH_OVERRIDES.get(arch, []),
           *overrides]
    t0 = time.perf_counter()
    with GpuMemorySampler() as memory:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], flush=True)
        return {"who": "finetune", "variant": name, "rc": proc.returncode}
    summary = json.loads((out / "train_summary.json").read_text())
    return {"who": "finetune", "variant": name, "rc": 0, "it_per_s": summary["steady_it_per_s"],
            "peak_gpu_mib": memory.peak, "torch_reserved_mib": summary.get("peak_reserved_mib"),
            "cuda_graphs": summary.get("cuda_graphs"), "optimizer": summary.get("optimizer"), "steps": steps,
            "setup_s": summary.get("setup_seconds"), "train_s": summary.get("train_seconds"),
            "phase_s": summary.get("phase_seconds"), "phase_peak_reserved_mib": summary.get("phase_peak_reserved_mib"),
            "wall_s": round(wall, 1), "command": ("accelerate launch " + shlex.join(cmd[3:]) if launch == "accelerate"
                                                  else "finetune " + shlex.join(cmd[3:]))}


def run_end_to_end(arch: str, data: dict, steps: int, work: Path, launch: str, settings: str = "fast") -> dict:
    """The whole standard job from an empty class folder: generate, train, export; timed from process start.
    `settings`: the variant of ours (OURS) whose overrides it runs with."""
    fresh = work / f"class-{arch}-e2e"
    subprocess.run(["rm", "-rf", str(fresh)], check=True)
    result = run_ours(arch, {**data, "classes": fresh}, steps, f"e2e_{launch}", OURS[settings], work, launch)
    return {**result, "e2e_settings": settings, "class_images_made": len(list(fresh.glob("*.png")))}


def run_peer_end_to_end(arch: str, data: dict, steps: int, work: Path, peer_dir: Path) -> dict:
    """The peer on the same whole job: an empty class folder, which its script fills itself, then training."""
    fresh = work / f"class-{arch}-peer-e2e"
    subprocess.run(["rm", "-rf", str(fresh)], check=True)
    fresh.mkdir()
    result = run_peer(arch, {**data, "classes": fresh}, steps, "e2e", PEER["default"], peer_dir)
    return {**result, "class_images_made": len(list(fresh.glob("*.*")))}


def run_drawing(arch: str, data: dict, steps: int, name: str, work: Path) -> dict:
    """A variant that draws DRAWS[name] class images into an empty folder before it trains."""
    fresh = work / f"class-{arch}-{name}"
    subprocess.run(["rm", "-rf", str(fresh)], check=True)
    overrides = [*OURS[name], f"prior.num_class_images={DRAWS[name]}"]
    result = run_ours(arch, {**data, "classes": fresh}, steps, name, overrides, work)
    result["class_images_made"] = len(list(fresh.glob("*.png")))
    return result


def run_peer(arch: str, data: dict, steps: int, name: str, flags: list[str], peer_dir: Path) -> dict:
    cmd = ["bash", str(peer_dir / "run_peer.sh"), arch, str(data["model"]), str(data["photos"]),
           str(data["classes"]), str(steps), name, *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        print(proc.stdout[-2000:], proc.stderr[-3000:], flush=True)
        return {"who": "peer", "variant": name, "rc": proc.returncode}
    result = json.loads(lines[-1])
    return {"who": "peer", "variant": name, "rc": result["rc"], "it_per_s": result["it_per_s"],
            "peak_gpu_mib": result["peak_gpu_mib"], "wall_s": result["wall_s"], "flags": " ".join(flags)}


def versions() -> dict:
    import accelerate  # noqa: E401
    import diffusers
    import peft
    import torch
    import transformers
    try:
        import bitsandbytes
        bnb = bitsandbytes.__version__
    except Exception:
        bnb = None
    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__,
            "transformers": transformers.__version__, "accelerate": accelerate.__version__, "bitsandbytes": bnb,
            "gpu": gpu_name()}


def gpu_name() -> str:
    """From nvidia-smi, not torch: a CUDA context in this process would add to every memory reading."""
    try:
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True).stdout.split("\n")
    except FileNotFoundError:
        return "cpu"
    return names[0].strip() or "cpu"


NOT_RUN = "the peer did not run in this run | no ratio |"


def markdown_rows(arch: str, results: list[dict], meta: dict) -> list[str]:
    """A row per run of ours: steps against the peer's steps, and the end-to-end job's seconds against the peer's
    on the same job (when it ran)."""
    peer = {r["variant"]: r for r in results if r["who"] == "peer" and r.get("it_per_s")}
    peer_job = peer.pop("e2e", {})
    rows = []
    for r in results:
        if r["who"] != "finetune" or not r.get("it_per_s"):
            continue
        if r["variant"].startswith("e2e"):
            ours = f"| {meta['date']} | {meta['gpu']} | {arch} {r['variant']} (whole job) | {r['wall_s']} s, " \
                   f"{r['peak_gpu_mib']} MiB |"
            rows.append(f"{ours} peer: {peer_job['wall_s']} s, {peer_job.get('peak_gpu_mib')} MiB | "
                        f"{peer_job['wall_s'] / r['wall_s']:.2f}x faster |" if peer_job.get("wall_s") else
                        f"{ours} {NOT_RUN}")
            continue
        # The peer's variant of this run; else its whole job's steps (default flags, measured the same way), whose
        # peak is its class images' and is not compared.
        p = peer.get("default") or next(iter(peer.values()), {}) or \
            ({**peer_job, "variant": "its whole job's steps", "peak_gpu_mib": None} if peer_job.get("it_per_s") else {})
        ours = f"| {meta['date']} | {meta['gpu']} | {arch} {r['variant']} | {r['it_per_s']:.2f} it/s, " \
               f"{r['peak_gpu_mib']} MiB |"
        if not p:
            rows.append(f"{ours} {NOT_RUN}")
            continue
        mem = f"{r['peak_gpu_mib'] / p['peak_gpu_mib']:.2f}x memory" if p.get("peak_gpu_mib") and \
            r["peak_gpu_mib"] else "memory not compared"
        peak = f", {p['peak_gpu_mib']} MiB" if p.get("peak_gpu_mib") else ""
        rows.append(f"{ours} {p['variant']}: {p['it_per_s']} it/s{peak} | {r['it_per_s'] / p['it_per_s']:.2f}x speed, "
                    f"{mem} |")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", choices=CONFIGS, default="sd15")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--work", default="/tmp/finetune-bench")
    parser.add_argument("--peer-dir", default=None, help="folder with run_peer.sh and the peer scripts")
    parser.add_argument("--ours", default="fast", help=f"comma-separated variants of ours: {', '.join(OURS)}")
    parser.add_argument("--peer", default="default", help=f"comma-separated variants of the peer: {', '.join(PEER)}")
    parser.add_argument("--e2e-steps", type=int, default=0, help="also time the whole job (fast mode) at this many "
                                                                   "steps from an empty class folder")
    parser.add_argument("--e2e-launch", default="direct",
                        help="the end-to-end runs' commands, comma-separated: direct (finetune train) and/or "
                             "accelerate (accelerate launch)")
    parser.add_argument("--peer-e2e", action="store_true", help="also time the peer on the end-to-end job")
    parser.add_argument("--e2e-variant", default="fast", choices=OURS,
                        help="the variant of ours whose settings the end-to-end runs use")
    parser.add_argument("--classes-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="bench.json")
    parser.add_argument("--rows-to", default=None, help="append the markdown rows to this file (BENCHMARKS.md)")
    args = parser.parse_args()
    launches = args.e2e_launch.split(",")
    if not set(launches) <= {"direct", "accelerate"}:
        parser.error(f"--e2e-launch: {args.e2e_launch!r}; use direct, accelerate or both, comma-separated")
    if args.peer_e2e and not (args.e2e_steps and args.peer_dir):
        parser.error("--peer-e2e: needs --e2e-steps (the job's steps) and --peer-dir (the peer's scripts)")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.classes_only:
        print(json.dumps(generate_classes(args.arch, work / f"model-{args.arch}", work / f"class-{args.arch}")))
        return
    meta = {"date": time.strftime("%Y-%m-%d"), **versions()}
    data = prepare(args.arch, work, shared_classes=bool(args.ours.strip(",") or (args.peer_dir and args.peer)))
    report = {"meta": meta, "arch": args.arch, "steps": args.steps,
              **{k: v for k, v in data.items() if k.startswith("class_images")}, "results": []}

    def record(result: dict) -> None:  # written after every run: a run cut short keeps the figures before it
        report["results"].append(result)
        print(json.dumps(result), flush=True)
        Path(args.out).write_text(json.dumps(report, indent=2, default=str))

    if args.peer_dir:  # the peer first: a run cut short by a GPU lease still has the figure every ratio needs
        for name in filter(None, args.peer.split(",")):
            record(run_peer(args.arch, data, args.steps, name, PEER[name], Path(args.peer_dir)))
    for name in filter(None, args.ours.split(",")):
        record(run_ours(args.arch, data, args.steps, name, OURS[name], work) if name not in DRAWS else
               run_drawing(args.arch, data, args.steps, name, work))
    if args.peer_e2e:
        record(run_peer_end_to_end(args.arch, data, args.e2e_steps, work, Path(args.peer_dir)))
    if args.e2e_steps:
        for launch in launches:
            record(run_end_to_end(args.arch, data, args.e2e_steps, work, launch, args.e2e_variant))
    rows = markdown_rows(args.arch, report["results"], meta)
    print("\n".join(rows))
    if args.rows_to:  # BENCHMARKS.md: the rows go under the results table's heading, newest last
        with open(args.rows_to, "a", encoding="utf-8") as out:
            stamp = f"{time.strftime('%Y-%m-%d %H:%M')} {meta['gpu']}"
            out.write(f"\n<!-- bench.py {stamp}: {shlex.join(sys.argv[1:])} -->\n")
            out.write("".join(row + "\n" for row in rows))


if __name__ == "__main__":
    main()
