"""The GPU benchmark's code path, on a tiny model on the CPU, so that it cannot rot between GPU runs."""
import json
import subprocess
import sys
from pathlib import Path

from benchmarks.bench import markdown_rows

ROOT = Path(__file__).resolve().parent.parent


def test_benchmark_runs_our_recipe_end_to_end_on_a_tiny_model(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "benchmarks/bench.py", "--arch", "tiny", "--steps", "4", "--e2e-steps", "2",
                           "--e2e-variant", "fast_channels_last", "--work", str(tmp_path), "--out", str(out),
                           "--rows-to", str(tmp_path / "BENCHMARKS.md")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["meta"]["torch"] and report["class_images_s_per_image"] > 0
    ours = report["results"][0]
    assert ours["who"] == "finetune" and ours["rc"] == 0 and ours["it_per_s"] > 0
    assert ours["command"].startswith("accelerate launch ") and "finetune train" in ours["command"]
    assert len(list((tmp_path / "class-tiny").glob("*.png"))) == 8
    assert (tmp_path / "ours-tiny-fast" / "pytorch_lora_weights.safetensors").is_file()
    # the end-to-end run: the single-GPU command without Accelerate's launcher, from an empty class folder
    e2e = report["results"][1]
    assert e2e["variant"] == "e2e_direct" and e2e["rc"] == 0 and e2e["class_images_made"] == 8
    assert e2e["command"].startswith("finetune train ") and e2e["phase_s"]["class images"] > 0
    assert e2e["e2e_settings"] == "fast_channels_last" and e2e["command"].endswith(" train.channels_last=true")
    assert json.loads((tmp_path / "ours-tiny-e2e_direct" / "train_summary.json").read_text())["channels_last"]
    assert (tmp_path / "ours-tiny-e2e_direct" / "pytorch_lora_weights.safetensors").is_file()
    rows = (tmp_path / "BENCHMARKS.md").read_text().splitlines()
    assert rows[1].startswith("<!-- bench.py ")
    assert rows[2].startswith(f"| {report['meta']['date']} | cpu | tiny fast |")
    assert rows[3].startswith(f"| {report['meta']['date']} | cpu | tiny e2e_direct (whole job) | {e2e['wall_s']} s,")


def test_rows_compare_steps_with_the_peers_steps_and_the_whole_job_with_the_peers_whole_job():
    results = [{"who": "peer", "variant": "default", "it_per_s": 3.0, "peak_gpu_mib": 6000, "wall_s": 80},
               {"who": "peer", "variant": "e2e", "it_per_s": 3.1, "peak_gpu_mib": 7000, "wall_s": 200},
               {"who": "finetune", "variant": "fast", "it_per_s": 24.0, "peak_gpu_mib": 4800, "wall_s": 40},
               {"who": "finetune", "variant": "e2e_direct", "it_per_s": 24.0, "peak_gpu_mib": 4900, "wall_s": 62.5}]
    assert markdown_rows("sd15", results, {"date": "D", "gpu": "G"}) == [
        "| D | G | sd15 fast | 24.00 it/s, 4800 MiB | default: 3.0 it/s, 6000 MiB | 8.00x speed, 0.80x memory |",
        "| D | G | sd15 e2e_direct (whole job) | 62.5 s, 4900 MiB | peer: 200 s, 7000 MiB | 3.20x faster |"]


def test_rows_without_the_peer_in_the_same_run_say_so_instead_of_a_ratio():
    results = [{"who": "finetune", "variant": "low_memory_draws", "it_per_s": 13.7, "peak_gpu_mib": 2373},
               {"who": "finetune", "variant": "e2e_direct", "it_per_s": 24.0, "peak_gpu_mib": 4900, "wall_s": 62.5}]
    assert markdown_rows("sd15", results, {"date": "D", "gpu": "G"}) == [
        "| D | G | sd15 low_memory_draws | 13.70 it/s, 2373 MiB | the peer did not run in this run | no ratio |",
        "| D | G | sd15 e2e_direct (whole job) | 62.5 s, 4900 MiB | the peer did not run in this run | no ratio |"]


def test_step_rows_fall_back_to_the_steps_of_the_peers_whole_job_in_the_same_run():
    results = [{"who": "peer", "variant": "e2e", "it_per_s": 3.2, "peak_gpu_mib": 7000, "wall_s": 200},
               {"who": "finetune", "variant": "fast", "it_per_s": 24.0, "peak_gpu_mib": 4800, "wall_s": 40}]
    assert markdown_rows("sd15", results, {"date": "D", "gpu": "G"}) == [
        "| D | G | sd15 fast | 24.00 it/s, 4800 MiB | its whole job's steps: 3.2 it/s | 7.50x speed, memory not "
        "compared |"]

