"""Optimizer choice: 8-bit state for small LoRA tensors on CUDA; torch AdamW with a notice elsewhere."""
import logging

import pytest
import torch

from finetune.config import TrainConfig
from finetune.training import optim


def test_cpu_falls_back_to_adamw_with_a_notice(caplog):
    params = [torch.nn.Parameter(torch.zeros(4, 320))]
    with caplog.at_level(logging.WARNING, logger="finetune"):
        opt = optim.build_optimizer(params, TrainConfig(optimizer="adamw8bit", learning_rate=1e-4),
                                    torch.device("cpu"))
    assert type(opt) is torch.optim.AdamW
    assert "bitsandbytes 8-bit AdamW needs a CUDA GPU" in caplog.text


def test_8bit_adamw_keeps_8bit_state_for_lora_sized_tensors(monkeypatch):
    bnb = pytest.importorskip("bitsandbytes")
    monkeypatch.setattr(optim, "bitsandbytes_usable", lambda device: True)
    params = [torch.nn.Parameter(torch.zeros(4, 320))]  # 1280 elements: under bitsandbytes' default 4096
    opt = optim.build_optimizer(params, TrainConfig(optimizer="adamw8bit", learning_rate=1e-4), torch.device("cuda"))
    assert isinstance(opt, bnb.optim.AdamW8bit)
    assert opt.args.min_8bit_size <= params[0].numel()
    assert opt.param_groups[0]["lr"] == 1e-4 and opt.param_groups[0]["weight_decay"] == 1e-2


def test_warmup_and_schedules():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=1.0)
    sched = optim.build_lr_scheduler(opt, TrainConfig(lr_scheduler="constant", lr_warmup_steps=4, max_steps=10))
    lrs = []
    for _ in range(6):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    from finetune.errors import ConfigError
    with pytest.raises(ConfigError, match="train.lr_scheduler: 'sawtooth'"):
        optim.build_lr_scheduler(opt, TrainConfig(lr_scheduler="sawtooth"))
