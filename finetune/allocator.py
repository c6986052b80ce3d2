"""train.expandable_segments: PyTorch's CUDA allocator setting, which has to be in place before CUDA starts.

PyTorch reads PYTORCH_CUDA_ALLOC_CONF once, when CUDA starts in the process, and importing bitsandbytes starts it
(it asks for the GPU's compute capability). A recipe module imports bitsandbytes, so setting the variable when
the run starts comes too late, and the allocator quietly keeps fixed-size segments. `finetune train` therefore
sets it from the YAML file and overrides before it imports the recipe. PyTorch has no public call that changes the
setting once CUDA has started, so a run started some other way (a notebook that imported bitsandbytes first) is
told that the key had no effect.
"""
from __future__ import annotations

import os
import sys

VARIABLE = "PYTORCH_CUDA_ALLOC_CONF"
EXPANDABLE = "expandable_segments:True"


def cuda_started() -> bool:
    """Whether this process's CUDA state exists already (and with it the allocator's settings)."""
    torch = sys.modules.get("torch")  # not imported: CUDA cannot have started, and the CLI stays light
    return torch is not None and torch.cuda.is_initialized()


def ask_for_expandable_segments() -> bool:
    """Add expandable_segments:True to PYTORCH_CUDA_ALLOC_CONF (a user's own expandable_segments entry wins, and
    their other entries stay). Returns False when the setting comes too late: CUDA started without it."""
    current = os.environ.get(VARIABLE, "")
    if "expandable_segments" in current:
        return True  # the user's choice, or set by `finetune train` before CUDA started
    if cuda_started():
        return False
    os.environ[VARIABLE] = f"{current},{EXPANDABLE}" if current else EXPANDABLE
    return True
