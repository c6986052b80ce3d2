"""`finetune env`: the versions and capabilities a bug report needs, and the known-bad combinations.

Like `accelerate env` and `diffusers-cli env`: one line per fact, so a user can paste it whole.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import platform
import sys
from collections.abc import Callable

from packaging.version import InvalidVersion, Version

PACKAGES = ("torch", "diffusers", "transformers", "peft", "accelerate", "bitsandbytes", "datasets",
            "huggingface_hub", "safetensors", "pillow")


@dataclasses.dataclass(frozen=True)
class KnownIssue:
    """A combination of installed versions that is known to misbehave, and what it means for finetune."""
    applies: Callable[[dict[str, Version | None]], bool]
    text: str


def _at_least(versions, name: str, floor: str) -> bool:
    return versions.get(name) is not None and versions[name] >= Version(floor)


def _below(versions, name: str, ceiling: str) -> bool:
    return versions.get(name) is not None and versions[name] < Version(ceiling)


KNOWN_ISSUES = (
    KnownIssue(lambda v: _at_least(v, "transformers", "5.24") and _below(v, "peft", "0.22"),
               "transformers >= 5.24 with peft < 0.22: transformers' own PEFT integration (add_adapter) refuses "
               "this peft; finetune injects LoRA through peft directly and is not affected, other tools may be"),
    KnownIssue(lambda v: _below(v, "peft", "0.21"),
               "peft < 0.21: older than any release finetune's tests have passed with; upgrade peft"),
    KnownIssue(lambda v: _below(v, "diffusers", "0.42"),
               "diffusers < 0.42: older than any release finetune's tests have passed with; upgrade diffusers"),
)


def installed_versions() -> dict[str, Version | None]:
    versions: dict[str, Version | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = Version(importlib.metadata.version(name))
        except (importlib.metadata.PackageNotFoundError, InvalidVersion):
            versions[name] = None
    return versions


def cuda_line() -> str:
    import torch
    if not torch.cuda.is_available():
        return f"no (torch built with CUDA {torch.version.cuda})" if torch.version.cuda else "no (CPU build of torch)"
    names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return f"yes, CUDA {torch.version.cuda}: {names}"


def bitsandbytes_line() -> str:
    """Whether bitsandbytes' 8-bit AdamW really steps here (one step on a small CUDA tensor)."""
    import torch
    if not torch.cuda.is_available():
        return "not usable: needs a CUDA GPU (training falls back to torch AdamW, with a notice)"
    try:
        import bitsandbytes as bnb
        param = torch.nn.Parameter(torch.ones(64, device="cuda"))
        optimizer = bnb.optim.AdamW8bit([param], min_8bit_size=0)
        param.grad = torch.ones_like(param)
        optimizer.step()
        torch.cuda.synchronize()
    except Exception as exc:  # a broken CUDA set-up raises anything from ImportError to RuntimeError
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"not usable: {first[:200]}"
    return "yes (one 8-bit AdamW step ran on the GPU)"


def env_report() -> list[str]:
    from . import __version__
    versions = installed_versions()
    lines = [f"finetune: {__version__}", f"Python: {sys.version.split()[0]} ({platform.platform()})"]
    lines += [f"{name}: {versions[name] or 'not installed'}" for name in PACKAGES]
    lines.append(f"CUDA: {cuda_line()}")
    lines.append(f"bitsandbytes 8-bit AdamW: {bitsandbytes_line()}")
    issues = [issue.text for issue in KNOWN_ISSUES if issue.applies(versions)]
    lines += [f"known issue: {text}" for text in issues] or ["known issues: none for these versions"]
    return lines
