"""One GPU against several, on the SD1.5 architecture: class-image generation and training throughput.

    python benchmarks/multi_gpu.py --processes 1 2 --out bench-out        # on a machine with 2 GPUs
    python benchmarks/multi_gpu.py --tiny --cpu --processes 1 2          # the same logic on a tiny model, CPU

It builds a random-weight pipeline with the real SD1.5 shapes (UNet 859.5M; cost does not depend on the weight
values), writes a few random photos, then for each process count runs this file under `accelerate launch` as a
worker that drives the recipe's own code, and prints one JSON object:
- class images: the recipes' ensure_class_images (finetune.training.distributed) on an empty folder, timed
  between barriers -> images/s;
- training: dreambooth_lora.main for W + S steps; the steady-state rate from the recipe's run summary
  (train_summary.json) -> it/s and samples/s (instance samples; as many class samples ride along).
The per-GPU batch is the same for every process count, so samples/s should scale with the processes.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a file: import this checkout's finetune and recipes
SD15_CONFIG = "recipes/configs/sd15_dreambooth_lora.yaml"

def write_photos(folder: Path, count: int, size: int) -> Path:
    """Random RGB photos: the subject's looks do not change the cost."""
    import numpy as np
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"photo_{i}.jpg")
    return folder


def overrides(args, model: Path, photos: Path, work: Path) -> list[str]:
    values = {"model.pretrained": model, "data.instance_dir": photos, "data.class_dir": work / "class_images",
              "prior.num_class_images": args.class_images, "train.batch_size": args.batch,
              "train.checkpoint_every": 0, "train.seed": 0}
    if args.tiny:
        values.update({"train.resolution": 64, "prior.generation_steps": 2, "prior.generation_batch_size": 1})
    if args.cpu:
        values.update({"train.mixed_precision": "no", "train.optimizer": "adamw"})
    return [f"{k}={v}" for k, v in values.items()] + list(args.set)


def worker(args) -> None:
    """Runs in every process of one `accelerate launch`; the main process writes the figures."""
    import torch

    from finetune.cli import load_recipe_config
    from finetune.console import configure
    from finetune.models import load_pipeline
    from finetune.training.accelerator import make_accelerator
    from finetune.training.distributed import ensure_class_images
    from recipes import dreambooth_lora

    configure()
    work = Path(args.work) / f"p{args.worker}"
    base = overrides(args, Path(args.model), Path(args.photos), work)
    _, cfg = load_recipe_config(SD15_CONFIG, base + [f"output_dir={work / 'setup'}"])
    accelerator = make_accelerator(cfg.train, work / "setup", "bench")
    pipe = load_pipeline(cfg.model)
    accelerator.wait_for_everyone()
    began = time.perf_counter()
    ensure_class_images(accelerator, pipe, cfg.data, cfg.prior, cfg.train.resolution, cfg.train.seed)  # a barrier
    class_seconds = time.perf_counter() - began
    del pipe
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    # One run of W + S steps; the recipe's run summary times the steps after its warm-up with a device sync at
    # each end, so it measures when the GPU finished, not when the host queued the work.
    _, cfg = load_recipe_config(SD15_CONFIG, base + [f"output_dir={work / 'train'}",
                                                      f"train.max_steps={args.warmup + args.steps}"])
    dreambooth_lora.main(cfg)
    if accelerator.num_processes != args.worker:
        raise RuntimeError(f"launched {args.worker} processes but Accelerate sees {accelerator.num_processes}")
    if accelerator.is_main_process:  # only the main process writes the run summary
        summary = json.loads((work / "train" / "train_summary.json").read_text())
        step_seconds = 1 / summary["steady_it_per_s"]
        n = accelerator.num_processes
        Path(args.result).write_text(json.dumps({
            "processes": n, "class_images": args.class_images, "class_seconds": round(class_seconds, 3),
            "class_images_per_s": round(args.class_images / class_seconds, 3),
            "per_gpu_batch": args.batch, "timed_steps": args.steps, "step_seconds": round(step_seconds, 4),
            "train_it_per_s": round(1 / step_seconds, 3),
            "train_samples_per_s": round(args.batch * n / step_seconds, 3)}))


def launch_worker(args, processes: int, model: Path, photos: Path, work: Path) -> dict:
    shutil.rmtree(work / f"p{processes}", ignore_errors=True)  # no class images or checkpoints of a past run
    result = work / f"result-{processes}.json"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if args.cpu:
        env.update(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")  # gloo on CPU instead of NCCL
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no" if args.cpu else "fp16", "--dynamo_backend", "no",
               "--main_process_port", str(port), *(["--multi_gpu"] if processes > 1 else []),
               str(Path(__file__).resolve()), "--worker", str(processes), "--model", str(model),
               "--photos", str(photos), "--work", str(work), "--result", str(result),
               "--class-images", str(args.class_images), "--batch", str(args.batch), "--steps", str(args.steps),
               "--warmup", str(args.warmup), *(["--tiny"] if args.tiny else []), *(["--cpu"] if args.cpu else []),
               *[item for value in args.set for item in ("--set", value)]]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"benchmark worker with {processes} processes failed:\n{done.stderr[-4000:]}")
    return json.loads(result.read_text())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="process counts to compare")
    parser.add_argument("--class-images", type=int, default=32, help="class images generated per run")
    parser.add_argument("--batch", type=int, default=1, help="instance images per GPU per step")
    parser.add_argument("--steps", type=int, default=40, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=5, help="steps not timed (cudnn autotune, allocator)")
    parser.add_argument("--tiny", action="store_true", help="tiny model at 64 px: checks the logic in seconds")
    parser.add_argument("--cpu", action="store_true", help="CPU processes talking through gloo")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra recipe override")
    parser.add_argument("--work", default="/tmp/finetune-bench", help="model, photos, class images, runs")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    for hidden in ("--model", "--photos", "--result"):
        parser.add_argument(hidden, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1")
    if args.worker is not None:
        return worker(args)

    work = Path(args.work)
    model = work / ("tiny-sd1" if args.tiny else "random-sd15")
    if not (model / "model_index.json").is_file():
        from benchmarks.models import build_sd15
        from finetune.tiny import build_tiny_sd
        build_tiny_sd(model) if args.tiny else build_sd15(model)
    photos = write_photos(work / "photos", 5, 64 if args.tiny else 512)
    runs = [launch_worker(args, n, model, photos, work) for n in args.processes]
    base = runs[0]
    report = {"model": "tiny-sd1" if args.tiny else "sd15-architecture (random weights)",
              "device": "cpu" if args.cpu else "cuda", "runs": runs,
              "speedup_vs_first": {str(r["processes"]): {
                  "class_images": round(r["class_images_per_s"] / base["class_images_per_s"], 3),
                  "train_samples": round(r["train_samples_per_s"] / base["train_samples_per_s"], 3)}
                  for r in runs}}
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
