"""Train from Python instead of the CLI: the same typed config, the same recipe.

    python examples/train_from_python.py recipes/configs/sd15_dreambooth_lora.yaml data.instance_dir=photos/
"""
import sys

from finetune import FinetuneError
from finetune.config import load
from recipes import dreambooth_lora

config_path, *overrides = sys.argv[1:]
try:
    cfg = load(dreambooth_lora.Config, config_path, [o for o in overrides])
except FinetuneError as exc:
    sys.exit(f"error: {exc}")
if cfg.train.max_steps is not None:  # unset: the run derives it from the photo count
    cfg.train.max_steps = min(cfg.train.max_steps, 1000)  # the config is a plain dataclass: edit it in code
result = dreambooth_lora.main(cfg)
print(f"LoRA written to {result.export} after {result.steps} steps")
