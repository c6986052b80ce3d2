"""What a run measured: steady-state speed and peak GPU memory, written beside the export as JSON."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch


class StepClock:
    """Times the steps after a warm-up with one device sync at each end and none in between."""

    def __init__(self, device: torch.device, steps_this_run: int, warmup: int = 10):
        self.device = device
        self.warmup = min(warmup, steps_this_run // 2)  # short runs still time their second half
        self.done = 0
        self.start_time = None
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
                  "steady_it_per_s": round(timed / (now - self.start_time), 4) if timed > 0 else None,
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
