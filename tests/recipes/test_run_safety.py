"""One run per output folder (a real second run beside a running one), and a real disk that fills up while
class images are drawn, during a checkpoint, under generate and export (a small tmpfs; tests/full_disk_driver.py)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import tiny_overrides

SD15 = "recipes/configs/sd15_dreambooth_lora.yaml"
ROOT = Path(__file__).resolve().parents[2]
MOUNT_TMPFS = 'mount -t tmpfs -o size=3m tmpfs "$1" && shift && exec "$@"'


def test_a_second_run_refuses_while_the_first_runs_and_a_killed_run_leaves_no_lock(tiny_sd1, photos, tmp_path,
                                                                                     run_cli):
    overrides = tiny_overrides(tiny_sd1, photos, tmp_path, **{"prior.num_class_images": 0, "train.max_steps": 10000,
                                                              "train.checkpoint_every": 0})
    run, lock = tmp_path / "run", tmp_path / "run" / ".finetune.lock"
    first = subprocess.Popen([sys.executable, "-m", "finetune", "train", SD15, *overrides], cwd=ROOT,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (lock.is_file() and f'"pid": {first.pid}' in lock.read_text()):
            assert first.poll() is None, first.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the first run never took its lock"
            time.sleep(0.05)
        holder = json.loads(lock.read_text())
        code, _, err = run_cli("train", SD15, *overrides, "train.max_steps=1")
        assert code == 2 and err == (
            f"finetune: error: output_dir {run} is in use by another finetune run (pid {first.pid} on "
            f"{holder['host']}, since {holder['since']}); wait for it to end or choose another output_dir\n")
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        first.wait()
    assert lock.is_file()  # SIGKILL leaves the file behind, but the kernel dropped the lock with the process
    code, _, err = run_cli("train", SD15, *overrides, "train.max_steps=1")
    assert code == 0, err
    assert (run / "pytorch_lora_weights.safetensors").is_file() and not lock.exists()


def tmpfs_usable(folder: Path) -> bool:
    unshare = shutil.which("unshare")
    return bool(unshare) and subprocess.run([unshare, "-rm", "sh", "-c", MOUNT_TMPFS, "sh", folder, "true"],
                                            capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def full_disk(tiny_sd1, photos_master, tmp_path_factory):
    """The driver's results, run once in a mount namespace of its own on a 3 MiB tmpfs; and the mount point."""
    work = tmp_path_factory.mktemp("full-disk")
    mount, result = work / "disk", work / "result.json"
    mount.mkdir()
    if not tmpfs_usable(mount):
        pytest.skip("needs `unshare -rm` (user and mount namespaces) to mount a small tmpfs")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", MOUNT_TMPFS, "sh", mount, sys.executable,
                           "tests/full_disk_driver.py", mount, tiny_sd1, photos_master, work, result],
                          cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(result.read_text()), mount


def last_line(outcome: dict) -> str:
    assert "Traceback" not in outcome["err"], outcome["err"][-3000:]
    return outcome["err"].splitlines()[-1]


def test_a_full_disk_while_drawing_class_images_is_one_line_and_keeps_what_was_written(full_disk):
    results, mount = full_disk
    r = results["class_images"]
    assert r["full"]["code"] == 2
    assert last_line(r["full"]) == (
        f"finetune: error: data.class_dir {mount}/class_images: could not write class images: No space left on "
        "device; the class images written before are intact and will be reused: free disk space or fix "
        "permissions, then run again")
    assert 1 <= len(r["written"]) < 3 and r["whole"] and r["hidden"] == []  # no half-written PNG, no temporary file
    assert all(re.fullmatch(r"class-\d{5}-[0-9a-f]{12}\.png", name) for name in r["written"])


def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_every_earlier_file(full_disk):
    results, mount = full_disk
    assert results["checkpoints"]["first"]["code"] == 0
    for case in results["checkpoints"]["cases"]:  # nothing free (safetensors fails), room for lora_0 (torch.save)
        assert case["code"] == 2, case
        assert last_line(case) == (
            f"finetune: error: {mount}/run/checkpoints/step-000003: could not write the checkpoint (No space left "
            "on device); the previous checkpoints and export are intact: free disk space or fix permissions, then "
            "resume with train.resume=latest")
        assert {name: case["after"].get(name) for name in case["before"]} == case["before"]
        assert case["hidden"] == []  # the half-written save was removed, the lock released


def test_a_read_only_output_dir_is_one_line_before_anything_loads(full_disk):
    results, mount = full_disk
    assert results["read_only"]["code"] == 2
    assert last_line(results["read_only"]) == (f"finetune: error: output_dir: cannot write to {mount}/new-run "
                                               "(Read-only file system); choose a folder you can write to")


def test_a_full_disk_under_generate_and_export_names_out_and_keeps_earlier_files(full_disk):
    results, mount = full_disk
    r = results["generate_export"]
    assert r["first_export"]["code"] == 0
    assert (r["generate"]["code"], r["export"]["code"]) == (2, 2)
    assert last_line(r["generate"]) == (f"finetune: error: --out {mount}/generated: No space left on device; earlier "
                                        "files are intact: free disk space or fix permissions, then run again")
    assert last_line(r["export"]) == (f"finetune: error: --out {mount}/dog.safetensors: No space left on device; "
                                      "earlier files are intact: free disk space or fix permissions, then run again")
    assert r["after"] == r["before"] and len(r["before"]["generated"]) == 3 and r["hidden"] == []
