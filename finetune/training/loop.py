"""The training loop: one function, read top to bottom.

Each optimizer step runs the objective on each accumulated micro-batch (objective -> U-Net call -> U-Net: three
calls from here) and steps unless the loss or gradient is NaN/Inf (train.max_bad_steps in a row stop the run).
A SIGINT or SIGTERM finishes the step, saves a checkpoint and stops; checkpoints are written atomically every
train.checkpoint_every steps; validation grids every validation.every steps.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import DreamBoothConfig, resolved
from .checkpoint import CHECKPOINTS, save_checkpoint
from .distributed import samples_per_step
from .dreambooth import Run, Training
from .guard import NonFiniteGuard
from .interrupt import graceful_stop
from .summary import StepClock, optimizer_state_summary


@dataclasses.dataclass
class Checkpointer:
    """Writes checkpoints/step-N (resumable state, plus that step's export from `write_export(folder, step)`)."""
    cfg: DreamBoothConfig
    run: Run
    write_export: Callable[[Path, int], Path]

    def due(self, step: int) -> bool:
        every, last = self.cfg.train.checkpoint_every, resolved(self.cfg.train.max_steps, "train.max_steps")
        return bool(every) and step % every == 0 and step < last

    def save(self, step: int) -> Path:
        """The samples seen so far go with it: where a resumed run, on any process count, goes on."""
        train, accelerator = self.cfg.train, self.run.accelerator
        progress = {"samples": self.run.seen + (step - self.run.start) * samples_per_step(train,
                                                                                           accelerator.num_processes)}
        return save_checkpoint(accelerator, self.cfg.output_dir, step, train.keep_checkpoints,
                               lambda folder: self.write_export(folder, step), progress)


@dataclasses.dataclass
class LoopResult:
    summary: dict  # speed, peak memory, optimizer state, setup time: what train_summary.json records
    skipped: int   # optimizer steps skipped for a NaN/Inf loss or gradient


def train_loop(cfg, run: Run, training: Training, plans: list, objective, checkpointer: Checkpointer,
               validator) -> LoopResult:
    """Train from run.start to train.max_steps; `plans` are this process's micro-batches, in order."""
    accelerator, train = run.accelerator, cfg.train
    guard = NonFiniteGuard(accelerator, train.max_bad_steps, train.learning_rate,
                           str(Path(cfg.output_dir) / CHECKPOINTS))
    stop = graceful_stop(accelerator)  # SIGINT/SIGTERM: finish the step, save, exit
    # Updated by hand once a step is done, so a message after step N (a stop, an error) finds the bar at N.
    bar = tqdm(initial=run.start, total=train.max_steps, desc="training", disable=not accelerator.is_local_main_process)
    setup_seconds = time.perf_counter() - run.started
    clock = StepClock(accelerator.device, train.max_steps - run.start)
    trained = list(training.models.values())
    micro_steps = train.gradient_accumulation
    for step in range(run.start, train.max_steps):
        for plan in plans[(step - run.start) * micro_steps:(step - run.start + 1) * micro_steps]:
            with accelerator.accumulate(*trained):
                loss, parts = objective(plan)
                accelerator.backward(loss)
                guard.watch(loss)
                if accelerator.sync_gradients:
                    if guard.clip_and_check(training.params, train.max_grad_norm):
                        training.optimizer.step()
                        if not accelerator.optimizer_step_was_skipped:
                            training.lr_scheduler.step()
                            training.ema.step()  # train.ema_decay: only steps that were taken
                    training.optimizer.zero_grad(set_to_none=True)
        clock.step_done()
        for hook in training.step_hooks:  # e.g. lora.pivotal's embeddings fixed from their stop step on
            hook(step + 1)
        bar.update(1)
        guard.record(step + 1)
        if (step + 1) % train.log_every == 0 or step + 1 == train.max_steps:
            log_step(accelerator, bar, step + 1, loss, parts, training.lr_scheduler, guard.skipped)
        if stop.requested():
            bar.close()
            raise stop.stop(checkpointer.save(step + 1), step + 1)
        if checkpointer.due(step + 1) and guard.healthy:
            checkpointer.save(step + 1)
        if validator.due(step + 1):
            with training.ema.applied():  # the grid shows what would be exported
                validator.validate(step + 1)
    bar.close()
    summary = {**clock.summary(train.max_steps), **optimizer_state_summary(training.optimizer, training.params),
               "mode": train.mode, "channels_last": train.channels_last, "setup_seconds": round(setup_seconds, 2)}
    return LoopResult(summary, guard.skipped)


def log_step(accelerator, bar, step: int, loss: torch.Tensor, parts: dict, lr_scheduler, skipped: int) -> None:
    """The loss and its parts, averaged over processes: to the progress bar and TensorBoard."""
    means = accelerator.reduce(torch.stack([loss.detach(), *parts.values()]), "mean").tolist()
    logs = {"loss": means[0], "lr": lr_scheduler.get_last_lr()[0], **dict(zip(parts, means[1:])),
            "skipped_steps": skipped}
    bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
    accelerator.log(logs, step=step)
