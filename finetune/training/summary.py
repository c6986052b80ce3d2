"""What a run measured: steady-state speed and peak GPU memory, written beside the export as JSON."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import torch

from ..console import seconds
from ..models import free_gpu_cache

log = logging.getLogger("finetune")


@dataclasses.dataclass
class Phase:
    """What one phase did, told by the code inside it (`add`): said on the phase's line before its time."""
    notes: list[str] = dataclasses.field(default_factory=list)

    def add(self, note: str) -> None:
        self.notes.append(note)


class PhaseClock:
    """One line per phase (said by the main process) with what it did, its time and, on a GPU, its peak memory:
    'class images: 4 images drawn into class_images/ (12 s, peak 3412 MiB reserved)'. The times are kept for
    train_summary.json.

    The first entry is the process's start-up and imports, from the moment the OS started the process; its line
    comes with the first phase, so a run that stops at its checks (before any phase) prints only its error.
    """

    def __init__(self, device: torch.device, main_process: bool = True):
        self.device, self.main_process = device, main_process
        self.startup = time.time() - psutil.Process().create_time()
        self.seconds: dict[str, float] = {"start-up and imports": round(self.startup, 2)}
        self.peak_mib: dict[str, int] = {}
        self.started_phases = False

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[Phase]:
        if not self.started_phases:
            self.started_phases = True
            self.say("start-up and imports", None, self.startup)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        started, done = time.perf_counter(), Phase()
        yield done
        if cuda:
            torch.cuda.synchronize(self.device)
            self.peak_mib[phase] = round(torch.cuda.max_memory_reserved(self.device) / 2**20)
            free_gpu_cache()  # what this phase left cached would otherwise add to the next one's peak
        elapsed = time.perf_counter() - started
        self.seconds[phase] = round(self.seconds.get(phase, 0.0) + elapsed, 2)
        self.say(phase, "; ".join(done.notes), elapsed, self.peak_mib.get(phase))

    def split_off(self, phase: str, part: str, elapsed: float) -> None:
        """Move `elapsed` seconds of a finished phase into an entry of their own, so the split's entries add up
        without overlap (the CUDA-graph recording happens inside the training phase's first step)."""
        if elapsed > 0 and phase in self.seconds:
            self.seconds[part] = round(elapsed, 2)
            self.seconds[phase] = round(max(self.seconds[phase] - elapsed, 0.0), 2)

    def say(self, phase: str, note: str | None, elapsed: float, peak_mib: int | None = None) -> None:
        if not self.main_process:
            return
        measured = seconds(elapsed) + (f", peak {peak_mib} MiB reserved" if peak_mib is not None else "")
        log.info("%s: %s", phase, f"{note} ({measured})" if note else measured)

    def summary(self) -> dict:
        return {"phase_seconds": dict(self.seconds), **({"phase_peak_reserved_mib": dict(self.peak_mib)}
                                                        if self.peak_mib else {})}


class StepClock:
    """Times the steps after a warm-up with one device sync at each end and none in between."""

    def __init__(self, device: torch.device, steps_this_run: int, warmup: int = 10):
        self.device = device
        self.warmup = min(warmup, steps_this_run // 2)  # short runs still time their second half
        self.done = 0
        self.start_time: float | None = None
        self.wall_start = time.perf_counter()
        if self.warmup == 0:
            self.start_time = self.wall_start

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step_done(self) -> None:
        self.done += 1
        if self.done == self.warmup:
            self._sync()
            self.start_time = time.perf_counter()

    def summary(self, step: int) -> dict:
        self._sync()
        now = time.perf_counter()
        timed = self.done - self.warmup
        result = {"steps": step, "steps_this_run": self.done, "timed_steps": timed,
                  "train_seconds": round(now - self.wall_start, 3),
                  "steady_it_per_s": round(timed / (now - self.start_time), 4)
                  if timed > 0 and self.start_time is not None else None,
                  "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"}
        if self.device.type == "cuda":
            result["peak_reserved_mib"] = round(torch.cuda.max_memory_reserved(self.device) / 2**20)
            result["peak_allocated_mib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20)
        return result


def optimizer_state_summary(optimizer, params) -> dict:
    """Bytes of optimizer state per trained parameter: about 8 for fp32 AdamW, about 2 when 8-bit state is real."""
    inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate wraps it
    tensors = {t.data_ptr(): t for state in inner.state.values() for t in state.values()
               if torch.is_tensor(t) and t.dim() > 0}  # bitsandbytes shares one quantization map across params
    state_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    count = sum(p.numel() for p in params)
    return {"optimizer": type(inner).__name__, "trained_params": count,
            "optimizer_state_bytes_per_param": round(state_bytes / max(count, 1), 3)}


def write_summary(output_dir: str | Path, summary: dict) -> Path:
    path = Path(output_dir) / "train_summary.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return path
