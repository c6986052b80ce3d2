"""Two processes through `accelerate launch` (gloo on CPU) against one: class images split, LoRA replicas equal,
2 processes x batch 1 == 1 process x batch 2, and a 2-process checkpoint resumed by 1 process."""
from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from finetune.cli import load_recipe_config
from finetune.run_files import NO_EMA_WEIGHT_NAME
from finetune.training.distributed import state_digest
from recipes import dreambooth_lora, sdxl_dreambooth_lora
from tests.helpers import SDXL, add_wide_photo, sdxl_overrides, tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
SD15 = "recipes/configs/sd15_dreambooth_lora.yaml"
EXPORT, EMBEDDINGS = "pytorch_lora_weights.safetensors", "embeddings.safetensors"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*args: str) -> subprocess.CompletedProcess:
    """`accelerate launch` with the shipped multi-GPU config (2 processes), on CPU: ACCELERATE_USE_CPU makes
    Accelerate take gloo instead of NCCL, and the precision falls back to fp32."""
    env = dict(os.environ, ACCELERATE_USE_CPU="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               "examples/accelerate_multi_gpu.yaml", "--mixed_precision", "no",
               "--main_process_port", str(free_port()), *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def failure(run: subprocess.CompletedProcess) -> str:
    """What a failed launch said: each process's own error lines first (the launcher's traceback, which names only
    the rank that died, comes after them and fills the tail), then the tail."""
    errors = [line for line in run.stderr.splitlines() if "error" in line.lower() and "Traceback" not in line]
    return "\n".join(errors[:20]) + "\n...\n" + run.stderr[-1500:]


def lora_states(checkpoint: Path) -> list[dict[str, torch.Tensor]]:
    return [load_file(checkpoint / f"lora_{i}.safetensors") for i in range(2)]


def assert_states_close(a, b):
    for sa, sb in zip(a, b):
        assert sa.keys() == sb.keys()
        for key in sa:
            torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=2e-6, msg=key)


def test_two_processes_split_class_images_and_train_like_one_process_with_twice_the_batch(
        tiny_sd1, photos, tmp_path, caplog):
    class_dir = tmp_path / "class_images"
    class_dir.mkdir()
    some_photo = Image.open(next(photos.glob("*.jpg"))).convert("RGB").resize((64, 64))
    some_photo.save(class_dir / "mine.png")                       # the user's own class image
    some_photo.save(class_dir / "class-00001-0123456789ab.png")   # index 1 left by an interrupted run
    overrides = tiny_overrides(tiny_sd1, photos, tmp_path, **{
        "train.checkpoint_every": 2, "lora.text_encoder": "true", "data.random_flip": "true",
        "train.lr_scheduler": "linear", "train.lr_warmup_steps": 1, "prior.generation_batch_size": 1})

    # 2 processes x batch 1, through the real CLI and the shipped launch config.
    two = launch("-m", "finetune", "train", SD15, *overrides, f"output_dir={tmp_path / 'two'}",
                 "train.batch_size=1")
    assert two.returncode == 0, failure(two)
    # Class images: the two missing ones (indices 0 and 2: the gaps), one per process, none twice.
    assert "class images generated per process: process 0: [0]; process 1: [2]" in two.stderr
    names = sorted(p.name for p in class_dir.glob("*.png"))
    assert len(names) == 4 and [n[:11] for n in names] == ["class-00000", "class-00001", "class-00002", "mine.png"]
    assert (class_dir / names[0]).read_bytes() != (class_dir / names[2]).read_bytes()  # seeds 0 and 2 differ
    # Every process ended with the same LoRA weights, and they are what the checkpoint holds.
    digests = re.search(r"LoRA weights per process \(sha256\): (\w+) (\w+)", two.stderr).groups()
    assert digests[0] == digests[1] == state_digest(lora_states(tmp_path / "two" / "checkpoints" / "step-000004"))
    assert (tmp_path / "two" / "pytorch_lora_weights.safetensors").is_file()
    # the main process alone exports and lists the files once (the diffusers file, the kohya file)
    assert two.stderr.count("the LoRA, diffusers format") == 1 and two.stderr.count("the LoRA, kohya format") == 1

    # 1 process x batch 2 on the same class images: the same samples, noise and mean gradient per step.
    _, cfg = load_recipe_config(SD15, [*overrides, f"output_dir={tmp_path / 'one'}", "train.batch_size=2"])
    dreambooth_lora.main(cfg)
    for step in ("step-000002", "step-000004"):
        assert_states_close(lora_states(tmp_path / "one" / "checkpoints" / step),
                            lora_states(tmp_path / "two" / "checkpoints" / step))

    # Resume the 2-process checkpoint of step 2 with 1 process x batch 2: step, optimizer, schedule and data
    # order carry on, so it ends where the 1-process run did.
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "two" / "checkpoints" / "step-000002", resumed / "checkpoints" / "step-000002")
    caplog.set_level(logging.INFO, logger="finetune")
    _, cfg = load_recipe_config(SD15, [*overrides, f"output_dir={resumed}", "train.batch_size=2",
                                       "train.resume=latest"])
    dreambooth_lora.main(cfg)
    assert "at step 2 (4 samples seen)" in caplog.text
    assert_states_close(lora_states(resumed / "checkpoints" / "step-000004"),
                        lora_states(tmp_path / "one" / "checkpoints" / "step-000004"))


def test_two_processes_take_whole_buckets_and_train_sdxl_like_one_process_accumulating_two(
        tiny_sdxl, photos, tmp_path):
    """With buckets every process's batch is one bucketed batch of the global order, so 2 processes x batch 2
    train what 1 process x batch 2 x accumulation 2 does: the same batches, noise, captions and mean gradient.

    Only float summation differs (all-reduce against accumulation), and Adam's first steps divide by |g| + eps, so
    entries with near-zero gradients move by up to ~1% of a step (lr 1e-3) apart; a wrong batch would move
    every entry by a whole step."""
    add_wide_photo(photos)
    Image.open(photos / "cat_1.jpg").resize((240, 80)).save(photos / "wide_2.jpg")  # the wide bucket holds two
    overrides = sdxl_overrides(tiny_sdxl, photos, tmp_path, **{
        "train.max_steps": 2, "data.random_flip": "true", "data.caption_dropout": 0.3, "export.kohya": "false",
        "lora.unet_targets": "cross_attention"})
    two = launch("-m", "finetune", "train", SDXL, *overrides, f"output_dir={tmp_path / 'two'}")
    assert two.returncode == 0, failure(two)
    assert "photos: 7 used" in two.stderr
    _, cfg = load_recipe_config(SDXL, [*overrides, f"output_dir={tmp_path / 'one'}", "train.gradient_accumulation=2"])
    sdxl_dreambooth_lora.main(cfg)
    one, two = (load_file(tmp_path / run / "checkpoints" / "step-000002" / "lora_0.safetensors")
                for run in ("one", "two"))
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=0, atol=1e-5, msg=key)


def test_two_processes_keep_the_same_ema_masks_and_pivotal_rows_as_one_with_twice_the_batch(tiny_sd1, photos,
                                                                                            tmp_path):
    """One launch for three things kept per process (one run: each launch costs a dozen seconds of imports here).
    Each process keeps its own EMA of the same weights and loads the masks of its own share of the photos; the new
    embedding rows are no module Accelerate wraps, so their gradient is averaged across processes by hand, or each
    process's copy would drift and the main process's export would be its own half of the batch. The result is
    the one process's at batch 2."""
    masks = tmp_path / "masks"
    masks.mkdir()
    for photo in sorted(photos.glob("*.jpg")):
        width, height = Image.open(photo).size
        array = np.full((height, width), 255, dtype=np.uint8)
        array[: height // 3] = 0  # the top third is background
        Image.fromarray(array, mode="L").save(masks / f"{photo.stem}.png")
    overrides = tiny_overrides(tiny_sd1, photos, tmp_path, **{
        "prior.num_class_images": 0, "train.max_steps": 3, "train.ema_decay": 0.5,
        "data.masks": masks, "data.mask_weight": 0.1, "data.random_flip": "true",
        "lora.pivotal": "true", "lora.pivotal_word": "sks", "lora.pivotal_stop_step": 2,
        "lora.pivotal_learning_rate": 1e-2, "data.caption_dropout": 0})
    two = launch("-m", "finetune", "train", SD15, *overrides, f"output_dir={tmp_path / 'two'}", "train.batch_size=1")
    assert two.returncode == 0, failure(two)
    _, cfg = load_recipe_config(SD15, [*overrides, f"output_dir={tmp_path / 'one'}", "train.batch_size=2"])
    dreambooth_lora.main(cfg)
    for name in (EXPORT, NO_EMA_WEIGHT_NAME, EMBEDDINGS):
        a, b = load_file(tmp_path / "one" / name), load_file(tmp_path / "two" / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=2e-6, msg=f"{name}: {key}")
    ema, raw = load_file(tmp_path / "one" / EXPORT), load_file(tmp_path / "one" / NO_EMA_WEIGHT_NAME)
    assert any((ema[k] - raw[k]).abs().max() > 1e-5 for k in ema)  # two different files were compared
    rows = load_file(tmp_path / "one" / EMBEDDINGS)["clip_l"]
    saved = load_file(tmp_path / "one" / "checkpoints" / "step-000003" / EMBEDDINGS)["clip_l"]
    assert torch.equal(rows, saved)  # the final checkpoint holds the final rows
