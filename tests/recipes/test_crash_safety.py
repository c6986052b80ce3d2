"""Training that loses nothing: real SIGKILL/SIGTERM and resume, SIGINT, failed saves, NaN steps."""
from __future__ import annotations

import errno
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.training.checkpoint import checkpoint_dirs
from finetune.training.loss import DreamBoothObjective
from tests.helpers import tiny_overrides

SD15 = "recipes/configs/sd15_dreambooth_lora.yaml"
ROOT = Path(__file__).resolve().parents[2]
EXPORT = "pytorch_lora_weights.safetensors"


def start_training(overrides: list[str], log: Path) -> subprocess.Popen:
    """`python -m finetune train` as a separate process, as a user (or a cluster scheduler) would run it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with open(log, "w") as err:
        return subprocess.Popen([sys.executable, "-m", "finetune", "train", SD15, *overrides], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=err)


def wait_for_checkpoint(proc: subprocess.Popen, run: Path, step: int, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not (run / "checkpoints" / f"step-{step:06d}" / "progress.json").is_file():
        if proc.poll() is not None:
            raise AssertionError(f"training ended (exit {proc.returncode}) before step {step}: "
                                 f"{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no checkpoint step {step} after {timeout}s")
        time.sleep(0.02)


def latest_step(run: Path) -> int:
    return int(checkpoint_dirs(run)[-1].name.split("-")[1])


def assert_same_weights(a: Path, b: Path) -> None:
    want, got = load_file(a), load_file(b)
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key


def test_sigkill_twice_then_sigterm_then_resume_ends_bitwise_equal(tiny_sd1, photos, tmp_path, run_cli):
    steps = 12  # text-encoder LoRA and accumulation are covered by the in-process resume test
    common = tiny_overrides(tiny_sd1, photos, tmp_path, **{
        "train.max_steps": steps, "train.checkpoint_every": 1, "prior.num_class_images": 2,
        "train.lr_scheduler": "cosine"})
    code, _, err = run_cli("train", SD15, *common, f"output_dir={tmp_path / 'straight'}")
    assert code == 0, err

    run = tmp_path / "killed"
    resume = [*common, f"output_dir={run}", "train.resume=latest"]
    log = tmp_path / "train.log"
    proc = start_training([*common, f"output_dir={run}"], log)
    wait_for_checkpoint(proc, run, 2, log)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    first = latest_step(run)

    proc = start_training(resume, log)
    wait_for_checkpoint(proc, run, first + 2, log)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    second = latest_step(run)
    assert first < second < steps

    # SIGTERM (a scheduler's time limit): the step in flight finishes, is saved, and the exit code says why.
    proc = start_training(resume, log)
    wait_for_checkpoint(proc, run, second + 1, log)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, log.read_text()[-3000:]
    message = [line for line in log.read_text().splitlines() if line.startswith("finetune: error:")]
    assert len(message) == 1 and "interrupted by SIGTERM after step" in message[0]
    assert "train.resume=latest" in message[0]
    third = latest_step(run)
    assert f"saved {run / 'checkpoints' / f'step-{third:06d}'}" in message[0]
    assert second < third < steps

    code, _, err = run_cli("train", SD15, *resume)
    assert code == 0, err
    assert not list((run / "checkpoints").glob(".*")), "leftovers of the killed saves were not cleaned"
    assert_same_weights(tmp_path / "straight" / EXPORT, run / EXPORT)


def test_sigint_saves_the_step_in_flight_and_exits_130(tiny_sd1, photos, tmp_path, run_cli, monkeypatch):
    real, calls = DreamBoothObjective.__call__, []

    def ctrl_c_during_step_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(DreamBoothObjective, "__call__", ctrl_c_during_step_two)
    overrides = tiny_overrides(tiny_sd1, photos, tmp_path, **{"prior.num_class_images": 0})
    # Python's own handler, or SIG_IGN where the suite runs in a background job (a shell's `cmd &` ignores SIGINT)
    handler_before = signal.getsignal(signal.SIGINT)
    code, _, err = run_cli("train", SD15, *overrides)
    run = tmp_path / "run"
    assert code == 130, err
    assert err.splitlines()[-1].startswith(
        f"finetune: error: interrupted by SIGINT after step 2; saved {run}/checkpoints/step-000002")
    bars = [piece for piece in err.replace("\r", "\n").splitlines() if piece.startswith("training: ")]
    assert " 2/4 [" in bars[-1], bars[-1]  # the bar stopped where the message says, on its own line
    assert [p.name for p in checkpoint_dirs(run)] == ["step-000002"]
    assert not (run / EXPORT).exists()
    assert signal.getsignal(signal.SIGINT) is handler_before  # the CLI put back the handler it found


@pytest.mark.parametrize("broken", ["finetune.training.checkpoint.save_file",   # the checkpoint's LoRA weights
                                    "finetune.export.diffusers_format.save_file"])  # the checkpoint's export
def test_a_save_failing_part_way_leaves_the_previous_checkpoint_and_export(tiny_sd1, photos, tmp_path, run_cli,
                                                                            monkeypatch, broken):
    overrides = tiny_overrides(tiny_sd1, photos, tmp_path, **{
        "prior.num_class_images": 0, "train.checkpoint_every": 1, "train.keep_checkpoints": 1})
    run = tmp_path / "run"
    code, _, err = run_cli("train", SD15, *overrides, "train.max_steps=2")
    assert code == 0, err
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*.safetensors")}

    import importlib
    module_name, name = broken.rsplit(".", 1)
    module = importlib.import_module(module_name)
    real = getattr(module, name)

    def disk_full(tensors, filename, *args, **kwargs):
        real(dict(list(tensors.items())[:1]), filename, *args, **kwargs)  # half a file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(module, name, disk_full)
    code, _, err = run_cli("train", SD15, *overrides, "train.max_steps=4", "train.resume=latest")
    assert code == 2
    assert err.splitlines()[-1] == (
        f"finetune: error: {run}/checkpoints/step-000003: could not write the checkpoint (No space left on device); "
        "the previous checkpoints and export are intact: free disk space or fix permissions, then resume with "
        "train.resume=latest")
    # keep_checkpoints=1, yet the only good checkpoint survived, unchanged and loadable; so did the export.
    assert [p.name for p in checkpoint_dirs(run)] == ["step-000002"]
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*.safetensors")
            if ".step-000003.tmp" not in str(p)} == before
    for path in before:
        load_file(run / path)

    monkeypatch.undo()
    code, _, err = run_cli("train", SD15, *overrides, "train.max_steps=4", "train.resume=latest")
    assert code == 0, err
    assert [p.name for p in checkpoint_dirs(run)] == ["step-000004"]
    assert not [p for p in run.rglob(".*") if p.name not in (".", "..")], "a half-written save was left behind"


def nan_from(calls_with_nan):
    real, calls = DreamBoothObjective.__call__, []

    def poisoned(*args, **kwargs):
        loss, parts = real(*args, **kwargs)
        calls.append(1)
        return (loss * math.nan, parts) if calls_with_nan(len(calls)) else (loss, parts)
    return poisoned


def test_a_nan_step_is_skipped_and_counted(tiny_sd1, photos, tmp_path, run_cli, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="finetune")
    monkeypatch.setattr(DreamBoothObjective, "__call__", nan_from(lambda call: call in (2, 4)))
    overrides = tiny_overrides(tiny_sd1, photos, tmp_path, **{
        "prior.num_class_images": 0, "train.checkpoint_every": 1, "train.keep_checkpoints": 4})
    code, _, err = run_cli("train", SD15, *overrides)
    assert code == 0, err
    assert "step 2 had a NaN/Inf loss or gradient; skipped it (1 in a row)" in caplog.text
    assert "done: 4 steps, 2 skipped (NaN/Inf)" in caplog.text
    ckpt = tmp_path / "run" / "checkpoints"
    # No checkpoint after a bad step (step 2); the final one is written, and the skipped step 4 changed nothing.
    assert [p.name for p in checkpoint_dirs(tmp_path / "run")] == ["step-000001", "step-000003", "step-000004"]
    assert_same_weights(ckpt / "step-000003" / "lora_0.safetensors", ckpt / "step-000004" / "lora_0.safetensors")
    a, b = (load_file(ckpt / f"step-00000{n}" / "lora_0.safetensors") for n in (1, 3))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert all(torch.isfinite(t).all() for t in load_file(tmp_path / "run" / EXPORT).values())


def test_too_many_bad_steps_in_a_row_stop_and_keep_the_last_good_checkpoint(tiny_sd1, photos, tmp_path, run_cli,
                                                                            monkeypatch):
    monkeypatch.setattr(DreamBoothObjective, "__call__", nan_from(lambda call: call >= 3))
    overrides = tiny_overrides(tiny_sd1, photos, tmp_path, **{
        "prior.num_class_images": 0, "train.checkpoint_every": 1, "train.max_steps": 8, "train.max_bad_steps": 2})
    code, _, err = run_cli("train", SD15, *overrides)
    err = err.splitlines()[-1]
    assert code == 2 and err.startswith("finetune: error: step 4: 2 steps in a row had a NaN/Inf loss or gradient")
    assert "fp16 VAE" in err and "train.learning_rate=0.001" in err and "train.resume=latest" in err
    run = tmp_path / "run"
    assert [p.name for p in checkpoint_dirs(run)] == ["step-000001", "step-000002"]
    assert all(torch.isfinite(t).all() for t in load_file(checkpoint_dirs(run)[-1] / "lora_0.safetensors").values())
    assert not (run / EXPORT).exists()


def test_a_full_disk_at_the_final_export_keeps_the_previous_export(tiny_sd1, photos, tmp_path, run_cli, monkeypatch):
    overrides = tiny_overrides(tiny_sd1, photos, tmp_path, **{"prior.num_class_images": 0, "train.max_steps": 1})
    assert run_cli("train", SD15, *overrides)[0] == 0
    run = tmp_path / "run"
    before = (run / EXPORT).read_bytes()

    from finetune.export import diffusers_format
    real = diffusers_format.save_file

    def disk_full_outside_checkpoints(tensors, filename, *args, **kwargs):
        if "checkpoints" in str(filename):
            return real(tensors, filename, *args, **kwargs)
        Path(filename).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device", str(filename))

    monkeypatch.setattr(diffusers_format, "save_file", disk_full_outside_checkpoints)
    code, _, err = run_cli("train", SD15, *overrides, "train.max_steps=2", "train.resume=latest")
    assert code == 2
    assert err.splitlines()[-1].endswith(": No space left on device; earlier files are intact: free disk space or fix "
                                         "permissions, then run again (train.resume=latest continues training)")
    assert (run / EXPORT).read_bytes() == before and load_file(run / EXPORT)
    assert [p.name for p in checkpoint_dirs(run)] == ["step-000001", "step-000002"]
    assert not list(run.glob(".export-*"))


def test_a_checkpoint_is_renamed_into_place_only_after_every_process_wrote_its_part(tmp_path):
    """Two processes' save_state, played by one that writes its file at once and a second that writes a moment
    later; wait_for_everyone, as Accelerate's barrier, waits for the second. The finished step-N folder and its
    progress.json must hold both files (before the fix, the rename could run while the second still wrote: CI saw
    'Parent directory .step-000004.tmp does not exist' on rank 1)."""
    import json
    import threading

    from finetune.training.checkpoint import save_checkpoint

    class TwoProcesses:
        is_main_process = True

        def __init__(self):
            self.others: list[threading.Thread] = []

        def save_state(self, folder):
            Path(folder, "random_states_0.pkl").write_bytes(b"main")

            def late():
                time.sleep(0.3)
                Path(folder, "random_states_1.pkl").write_bytes(b"other")
            self.others.append(threading.Thread(target=late))
            self.others[-1].start()

        def wait_for_everyone(self):
            for other in self.others:
                other.join()

    final = save_checkpoint(TwoProcesses(), tmp_path, step=4, keep=3)
    assert sorted(p.name for p in final.iterdir()) == ["progress.json", "random_states_0.pkl", "random_states_1.pkl"]
    assert set(json.loads((final / "progress.json").read_text())["files"]) == {"random_states_0.pkl",
                                                                              "random_states_1.pkl"}
    assert not list((tmp_path / "checkpoints").glob(".step-*"))
