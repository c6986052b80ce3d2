"""One TensorBoard run per training run, in output_dir/logs/<recipe>.

Accelerate's tracker would store the config with SummaryWriter.add_hparams' default, a new run named by the
time (plus an hparams.yml in another timestamped folder): every start and resume added an empty run beside the
real one. Here the hyperparameters go into the run itself, a fresh run removes an earlier run's events (only a
folder with no checkpoints, or train.overwrite=true, starts fresh: preflight refuses the rest), and a resumed run
passes TensorBoard's `purge_step`, so the steps after its checkpoint that the stopped run had logged are dropped
and the curves stay one run with steps in order.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

from ..config import to_dict
from .accelerator import flat_hparams

log = logging.getLogger("finetune")
LOGS = "logs"


def start_tensorboard(accelerator, cfg, project: str, start: int, resumed: bool) -> None:
    """Open the run's TensorBoard run (main process): continued after `start` when resumed, else started clean."""
    if not accelerator.is_main_process:
        return
    folder = Path(cfg.output_dir) / LOGS / project
    if not resumed and folder.exists():
        shutil.rmtree(folder)
        log.info("TensorBoard: removed the earlier run's logs in %s (this run starts at step 0)", folder)
    kwargs = {"purge_step": start + 1} if resumed else {}
    accelerator.init_trackers(project, init_kwargs={"tensorboard": kwargs})
    writer = accelerator.get_tracker("tensorboard", unwrap=True)
    # run_name "." puts the hyperparameters into this run's folder instead of a new timestamped run.
    writer.add_hparams(flat_hparams(to_dict(cfg)), {}, run_name=".", global_step=start)
    writer.flush()
