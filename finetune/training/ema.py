"""An exponential moving average (EMA) of the LoRA weights (train.ema_decay), for validation and exports.

The recurrence, its step count and its state are diffusers' EMAModel (parameters only): after the k-th optimizer
step that was taken, shadow <- shadow - (1 - d_k) (shadow - weights), with d_1 = 0 (the shadow starts as the
weights after the first step) and d_k = min(train.ema_decay, k / (9 + k)) after that (EMAModel's warm-up, so a
short run is not dominated by the LoRA's zero start). Steps skipped for a NaN/Inf loss are not counted.
What this module adds: where the shadow lives between steps (train.ema_device), checkpointing it through
Accelerate with the rest of the state, and swapping it into the model and back (bit for bit) for drawing and
exporting.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from diffusers.training_utils import EMAModel

from ..errors import FinetuneError


class LoraEMA:
    """The EMA of `params` (the trained LoRA tensors, in the order lora_parameters gives them)."""

    enabled = True

    def __init__(self, params: list[torch.nn.Parameter], decay: float, keep_on: torch.device):
        self.params, self.keep_on = params, keep_on
        self.average = EMAModel(params, decay=decay)
        self.average.to(keep_on)
        self._applied = 0

    def step(self) -> None:
        """After an optimizer step that was taken (not one the NaN guard or the fp16 scaler skipped)."""
        where = self.params[0].device
        if where != self.keep_on:  # train.ema_device=cpu: updated beside the weights, kept in CPU memory
            self.average.to(where)
        self.average.step(self.params)
        if where != self.keep_on:
            self.average.to(self.keep_on)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The EMA weights in the model for the block, then the trained weights back exactly (a copy, not a
        recomputation). Nested uses swap once."""
        if self._applied == 0:
            self.average.store(self.params)
            self.average.copy_to(self.params)
        self._applied += 1
        try:
            yield
        finally:
            self._applied -= 1
            if self._applied == 0:
                self.average.restore(self.params)

    def state_dict(self) -> dict:
        """What Accelerate's save_state writes (custom_checkpoint_N.pkl): the shadow tensors and the step count."""
        return self.average.state_dict()

    def load_state_dict(self, state: dict) -> None:
        shadow = state.get("shadow_params") or []
        if [tuple(t.shape) for t in shadow] != [tuple(p.shape) for p in self.params]:
            raise FinetuneError("train.resume: the checkpoint's EMA does not fit this run's LoRA tensors; resume "
                                "with the lora.* settings it was trained with")
        self.average.load_state_dict(state)
        self.average.to(self.keep_on)  # Accelerate loads it onto the CPU


class NoEMA:
    """train.ema_decay=0: the trained weights are what is drawn and exported."""

    enabled = False

    def step(self) -> None:
        pass

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        yield


def lora_ema(params: list[torch.nn.Parameter], train, accelerator) -> LoraEMA | NoEMA:
    """The run's EMA (registered with Accelerate, so checkpoints save and resume it), or NoEMA when it is off.
    Call after the LoRA's starting weights are in place and before the checkpoint is loaded."""
    if not train.ema_decay:
        return NoEMA()
    keep_on = torch.device("cpu") if train.ema_device == "cpu" else accelerator.device
    ema = LoraEMA(params, train.ema_decay, keep_on)
    accelerator.register_for_checkpointing(ema)
    return ema
