"""Non-finite guard: an optimizer step whose loss or gradient is NaN/Inf is skipped and counted; after
`train.max_bad_steps` such steps in a row the run stops, leaving the last good checkpoint as it was.

Skipping needs the answer on the host before `optimizer.step()`. What we chose:
- fp16 (Accelerate's GradScaler): the scaler already decides. It unscales, reads its found-inf flag on the host
  (its own sync, every step), skips the optimizer step and lowers the scale; Accelerate then skips the LR step too.
  We only read `accelerator.optimizer_step_was_skipped`. Skipping ourselves would starve the scaler of the
  overflow it needs to see, so it could never lower its scale.
- fp32 and bf16 (no scaler): we reduce "loss finite" over the micro-steps on the device (no sync per micro-step)
  and, once per optimizer step, read one boolean: isfinite(loss) & isfinite(gradient norm). The gradient norm is
  the one clipping computes anyway. That is one host sync per optimizer step, right after the backward pass the
  optimizer has to wait for anyway; on a GPU it costs the launch latency of the optimizer kernels, well under a
  millisecond against a U-Net step of tens to hundreds.
"""
from __future__ import annotations

import logging

import torch

from ..errors import FinetuneError

log = logging.getLogger("finetune")


class NonFiniteError(FinetuneError):
    """Training stopped after too many NaN/Inf steps in a row."""


class NonFiniteGuard:
    """Watches each optimizer step; call `watch(loss)` per micro-step and `clip_and_check` at each sync step."""

    def __init__(self, accelerator, max_bad_steps: int, learning_rate: float, checkpoints: str):
        self.accelerator = accelerator
        self.max_bad_steps, self.learning_rate, self.checkpoints = max_bad_steps, learning_rate, checkpoints
        self.uses_scaler = accelerator.scaler is not None
        self.skipped = 0      # non-finite steps over the whole run (this process's life)
        self.in_a_row = 0     # non-finite steps since the last good one
        self._loss_finite: torch.Tensor | None = None
        self._stepped = True

    def watch(self, loss: torch.Tensor) -> None:
        """Remember whether this micro-step's loss was finite, on the device: no host sync."""
        finite = torch.isfinite(loss.detach())
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite

    def clip_and_check(self, params, max_grad_norm: float) -> bool:
        """At a sync step: clip the gradients; True if the optimizer should step."""
        if max_grad_norm > 0:
            norm = self.accelerator.clip_grad_norm_(params, max_grad_norm)
        elif not self.uses_scaler:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        loss_finite, self._loss_finite = self._loss_finite, None
        if self.uses_scaler:
            self._stepped = True  # the scaler decides inside optimizer.step()
            return True
        assert loss_finite is not None, "watch(loss) runs before every clip_and_check"
        finite = torch.isfinite(torch.as_tensor(norm)).to(loss_finite.device) & loss_finite
        if self.accelerator.num_processes > 1:  # every process must take the same decision
            finite = self.accelerator.reduce(finite.float(), "sum") == self.accelerator.num_processes
        self._stepped = bool(finite)  # the one host sync per optimizer step
        return self._stepped

    def record(self, step: int) -> bool:
        """After optimizer step `step` (1-based): count it; raise NonFiniteError after too many bad in a row."""
        good = self._stepped and not self.accelerator.optimizer_step_was_skipped
        if good:
            self.in_a_row = 0
            return True
        self.skipped += 1
        self.in_a_row += 1
        log.warning("warning: step %d had a NaN/Inf loss or gradient; skipped it (%d in a row)", step, self.in_a_row)
        if self.in_a_row >= self.max_bad_steps:
            raise NonFiniteError(
                f"step {step}: {self.in_a_row} steps in a row had a NaN/Inf loss or gradient (train.max_bad_steps); "
                f"stopped. Likely causes: an fp16 VAE or fp16 overflow (try train.mixed_precision=bf16 or no, or an "
                f"fp32/fp16-fixed VAE), or a learning rate too high (train.learning_rate={self.learning_rate:g}); "
                f"the last good checkpoint in {self.checkpoints} is kept: fix the cause and resume with "
                f"train.resume=latest")
        return False

    @property
    def healthy(self) -> bool:
        """False while inside a run of bad steps: no checkpoint is written then (it would only push good ones out)."""
        return self.in_a_row == 0
