"""Shared fixtures: tiny models built once per session, real photos, and a CLI runner."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# One thread per process: pytest-xdist runs a worker per core, and torch's default of a thread per core in each
# worker (and in each process a test starts) made them fight over the cores: the suite took 296 s that way on a
# 2-core machine, 187 s like this. Set before torch is imported, which reads it once.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# bitsandbytes' CPU fallback for 4-bit dequantization (model.quantize_unet=nf4_all's tests) goes through
# torch.compile, which compiles a kernel per weight shape on the CPU: 18 s for one test. Nothing here compiles on
# purpose, so the tests run eagerly, as the GPU path (a CUDA kernel) does anyway.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach the Hub; fail fast if it tries
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def tiny_sd1(tmp_path_factory) -> Path:
    from finetune.tiny import build_tiny_sd
    return build_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd1", family="sd1")


@pytest.fixture(scope="session")
def tiny_sd2(tmp_path_factory) -> Path:
    from finetune.tiny import build_tiny_sd
    return build_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd2", family="sd2")


@pytest.fixture(scope="session")
def photos_master(tmp_path_factory) -> Path:
    from finetune.demo import prepare_photos
    folder = tmp_path_factory.mktemp("photos")
    prepare_photos(folder)
    return folder


@pytest.fixture
def photos(photos_master, tmp_path) -> Path:
    """A private copy of the subject photos (5 crops of a real cat photo, one with a caption file)."""
    return Path(shutil.copytree(photos_master, tmp_path / "photos"))


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; each test starts as a new process would."""
    from accelerate.state import AcceleratorState, GradientState, PartialState
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture
def run_cli(capsys):
    """Run `finetune ARGS...` in-process; returns (exit code, stdout, stderr)."""
    from finetune.cli import main

    def run(*args: str):
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err
    return run



@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    from finetune.tiny import build_tiny_sdxl
    return build_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture(scope="session")
def trained_sd1(tiny_sd1, tmp_path_factory) -> Path:
    """An SD 1.x run folder (2 steps; rank 2, alpha 6, text-encoder LoRA) with its diffusers and kohya files."""
    from finetune.cli import main
    from finetune.demo import prepare_photos
    from tests.helpers import SD15, TRAINED_SD1, tiny_overrides
    root = tmp_path_factory.mktemp("trained-sd1")
    prepare_photos(root / "photos")
    assert main(["train", SD15, *tiny_overrides(tiny_sd1, root / "photos", root, **TRAINED_SD1)]) == 0
    return root / "run"


@pytest.fixture(scope="session")
def trained_sdxl(tiny_sdxl, tmp_path_factory) -> Path:
    """An SDXL run folder (2 steps; rank 2, alpha 4, LoRA on both text encoders) with its diffusers and kohya
    files."""
    from finetune.cli import main
    from finetune.demo import prepare_photos
    from tests.helpers import SDXL, TRAINED_SDXL, sdxl_overrides
    root = tmp_path_factory.mktemp("trained-sdxl")
    prepare_photos(root / "photos")
    assert main(["train", SDXL, *sdxl_overrides(tiny_sdxl, root / "photos", root, **TRAINED_SDXL)]) == 0
    return root / "run"

