"""README's launch command, exactly: `accelerate launch --config_file accelerate_config.yaml -m finetune train`."""
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from tests.helpers import tiny_overrides

ROOT = Path(__file__).resolve().parent.parent.parent


def test_accelerate_launch_with_the_shipped_config(tiny_sd1, photos, tmp_path):
    overrides = tiny_overrides(tiny_sd1, photos, tmp_path, **{"prior.num_class_images": 2})
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch",
                           "--config_file", "accelerate_config.yaml",
                           "-m", "finetune", "train", "recipes/configs/sd15_dreambooth_lora.yaml", *overrides],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_file(tmp_path / "run" / "pytorch_lora_weights.safetensors")
    assert len(list((tmp_path / "class_images").glob("*.png"))) == 2
