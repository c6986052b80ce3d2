"""SIGINT/SIGTERM during training: finish the step in flight, save a checkpoint, exit with a message.

The CLI installs the handlers around a training command (`catch_stop_signals`); the recipe arms them when its loop
starts (`graceful_stop`) and asks `requested()` after each step. Before the loop (loading, class images, caching)
there is nothing to save, so a signal stops the run at once; files written so far (class images) are complete,
since each is written under a temporary name and renamed. A second signal during the loop stops at once too.
Used as a library (no CLI), Python's default behaviour is untouched.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import threading

import torch

from ..errors import FinetuneError

log = logging.getLogger("finetune")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(FinetuneError):
    """The run was stopped by a signal; the CLI exits with 128 + the signal number (130 SIGINT, 143 SIGTERM)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class _State:
    installed = False
    armed = False
    received: int | None = None


def _handle(signum, frame) -> None:
    name = signal.Signals(signum).name
    if not _State.armed or _State.received is not None:
        raise Interrupted(f"interrupted by {name}; training had not reached a step to save"
                          if not _State.armed else f"interrupted by {name} again; stopped without saving", signum)
    _State.received = signum
    log.warning("finetune: %s received; finishing this step and saving a checkpoint (send it again to stop now)",
                name)


@contextlib.contextmanager
def catch_stop_signals():
    """Route SIGINT/SIGTERM to `_handle` for the duration (main thread only; elsewhere signals stay as they are)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _handle) for s in STOP_SIGNALS}
    _State.installed, _State.armed, _State.received = True, False, None
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _State.installed, _State.armed, _State.received = False, False, None


class GracefulStop:
    """The loop's view: has a stop been asked for? All processes agree, so they all save the same step."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        _State.armed = _State.installed

    def requested(self) -> bool:
        if not _State.installed:
            return False
        if self.accelerator.num_processes == 1:
            return _State.received is not None
        # One 1-element all-reduce per step: a signal may reach only some processes.
        flag = torch.tensor(float(_State.received is not None), device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, "sum") > 0)

    def stop(self, checkpoint, step: int) -> Interrupted:
        signum = _State.received or signal.SIGTERM
        return Interrupted(f"interrupted by {signal.Signals(signum).name} after step {step}; saved {checkpoint}; "
                           "continue with train.resume=latest", signum)


def graceful_stop(accelerator) -> GracefulStop:
    return GracefulStop(accelerator)
