"""benchmarks/multi_gpu.py end to end on the tiny model with CPU processes: the logic the GPU run relies on."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_multi_gpu_benchmark_runs_one_and_two_processes_and_reports_speedups(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "benchmarks/multi_gpu.py", "--tiny", "--cpu", "--processes", "1", "2",
                           "--class-images", "4", "--steps", "2", "--warmup", "1", "--work", str(tmp_path / "work"),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert json.loads(done.stdout) == report
    assert [run["processes"] for run in report["runs"]] == [1, 2]
    for run in report["runs"]:
        assert run["class_images"] == 4 and run["class_images_per_s"] > 0 and run["train_it_per_s"] > 0
        want = run["processes"] * run["per_gpu_batch"] / run["step_seconds"]  # samples/s counts every process
        assert abs(run["train_samples_per_s"] - want) < 0.01 * want
        # Each process count generated its own complete class set (its share per process) and trained.
        folder = tmp_path / "work" / f"p{run['processes']}"
        assert len(list((folder / "class_images").glob("class-*.png"))) == 4
        assert (folder / "train" / "pytorch_lora_weights.safetensors").is_file()
    assert report["speedup_vs_first"]["1"] == {"class_images": 1.0, "train_samples": 1.0}
    assert set(report["speedup_vs_first"]["2"]) == {"class_images", "train_samples"}
