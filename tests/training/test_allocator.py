"""train.expandable_segments reaches PyTorch only if PYTORCH_CUDA_ALLOC_CONF is set before CUDA starts, and
importing bitsandbytes (which every recipe does) starts it. On the H200, setting it after that import left
fixed-size segments, and setting it before gave expandable ones (benchmarks/probe_memory.py allocator,
BENCHMARKS.md). Here: `finetune train` sets it before it imports the recipe, a user's own setting is kept, and a
run that finds CUDA started without it says so.
"""
from __future__ import annotations

import os
import sys

import pytest

from finetune import allocator
from finetune.allocator import EXPANDABLE, VARIABLE, ask_for_expandable_segments
from finetune.errors import FinetuneError
from tests.helpers import SD15, tiny_overrides


@pytest.fixture
def no_setting(monkeypatch):
    """PYTORCH_CUDA_ALLOC_CONF unset, and put back as it was afterwards (also when the code under test sets it)."""
    monkeypatch.setenv(VARIABLE, "")
    monkeypatch.delenv(VARIABLE)


@pytest.mark.usefixtures("no_setting")
def test_the_setting_is_made_while_cuda_has_not_started(monkeypatch):
    monkeypatch.setattr(allocator, "cuda_started", lambda: False)
    assert ask_for_expandable_segments() is True and os.environ[VARIABLE] == EXPANDABLE


@pytest.mark.parametrize("users, then", [("max_split_size_mb:128", f"max_split_size_mb:128,{EXPANDABLE}"),
                                         ("expandable_segments:False", "expandable_segments:False")])
def test_a_users_own_setting_is_kept(monkeypatch, users, then):
    monkeypatch.setenv(VARIABLE, users)
    monkeypatch.setattr(allocator, "cuda_started", lambda: False)
    assert ask_for_expandable_segments() is True and os.environ[VARIABLE] == then


@pytest.mark.usefixtures("no_setting")
def test_once_cuda_has_started_the_setting_is_not_made_and_the_answer_says_so(monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert allocator.cuda_started() is True
    assert ask_for_expandable_segments() is False and VARIABLE not in os.environ
    monkeypatch.setitem(sys.modules, "torch", None)  # torch not imported: CUDA cannot have started
    assert allocator.cuda_started() is False


@pytest.mark.usefixtures("no_setting")
@pytest.mark.parametrize("overrides, expected", [(["train.mode=low_memory"], EXPANDABLE),
                                                 (["train.mode=fast", "train.expandable_segments=true"], EXPANDABLE),
                                                 (["train.mode=low_memory", "train.expandable_segments=false"], None),
                                                 (["train.mode=fast"], None)])
def test_finetune_train_sets_it_before_it_imports_the_recipe(monkeypatch, run_cli, overrides, expected):
    """The recipe's import is inside load_recipe_config: what the environment holds when it is called is what
    CUDA will start with."""
    seen = []

    def recipe_import(path, given):
        seen.append(os.environ.get(VARIABLE))
        raise FinetuneError("stopped before the recipe's import")
    monkeypatch.setattr("finetune.cli.load_recipe_config", recipe_import)
    code, _, err = run_cli("train", SD15, *overrides)
    assert code == 2 and "stopped before the recipe's import" in err
    assert seen == [expected]


@pytest.mark.usefixtures("no_setting")
def test_a_run_that_finds_cuda_started_without_it_says_the_key_had_no_effect(tiny_sd1, photos, tmp_path, run_cli,
                                                                            monkeypatch, caplog):
    import torch
    monkeypatch.setattr(allocator, "cuda_started", lambda: True)
    monkeypatch.setattr("finetune.config.setting_as_written", lambda *args: None)  # as if started from Python
    code, _, err = run_cli("train", SD15, *tiny_overrides(tiny_sd1, photos, tmp_path, **{
        "train.max_steps": 1, "train.expandable_segments": "true"}))
    assert code == 0, err
    assert "train.expandable_segments has no effect in this process: CUDA started before it was set" in caplog.text
    assert f"set {VARIABLE}={EXPANDABLE} before Python starts" in caplog.text
    assert VARIABLE not in os.environ and (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()
    assert torch.cuda.is_initialized() is False  # the stand-in only pretended
