"""A full disk, an exceeded quota or a read-only folder, recognised whatever library was writing, told in one line.

Python's own writes raise OSError with an errno. The writers of our dependencies do not: safetensors' Rust writer
raises SafetensorError with "os error 28" in its text, and torch.save's C++ zip writer raises a RuntimeError whose
text ("unexpected pos 576 vs 534", "file write failed") does not say why. For those, a small probe write into the
same folder tells what the disk says now.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
from pathlib import Path

from safetensors import SafetensorError

from .errors import FinetuneError

STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
OS_ERROR_CODE = re.compile(r"os error (\d+)")
TORCH_WRITER = ("inline_container", "PytorchStreamWriter")  # torch's zip writer names itself in its errors
PROBE_BYTES = 64 * 1024


def storage_reason(exc: BaseException, folder: str | Path | None = None) -> str | None:
    """Why a write into `folder` failed, when the disk or its permissions are the cause ("No space left on
    device"); None for any other error, which is then not ours to explain."""
    if isinstance(exc, OSError):
        return (exc.strerror or str(exc)) if exc.errno in STORAGE_ERRNOS else None
    if isinstance(exc, SafetensorError):
        code = OS_ERROR_CODE.search(str(exc))
        return os.strerror(int(code.group(1))) if code and int(code.group(1)) in STORAGE_ERRNOS else None
    if isinstance(exc, RuntimeError) and any(name in str(exc) for name in TORCH_WRITER):
        return probe_folder(folder) or "a write failed part-way (is the disk full?)"
    return None


def probe_folder(folder: str | Path | None) -> str | None:
    """Write and remove a small file in `folder` (or its nearest existing parent); the OS's reason if that fails."""
    if folder is None:
        return None
    folder = Path(folder)
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    probe = folder / f".finetune-probe-{os.getpid()}"
    try:
        with open(probe, "wb") as handle:
            handle.write(b"\0" * PROBE_BYTES)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        return exc.strerror or str(exc)
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return None


@contextlib.contextmanager
def writing_into(folder: str | Path, where: str, advice: str):
    """Turn a storage failure while writing into `folder` into one line: `where: reason; advice`.

    Any other error passes through untouched; so do our own one-line errors."""
    try:
        yield
    except FinetuneError:
        raise
    except (OSError, SafetensorError, RuntimeError) as exc:
        reason = storage_reason(exc, folder)
        if reason is None:
            raise
        raise FinetuneError(f"{where}: {reason}; {advice}") from None


def save_safetensors_atomically(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write a .safetensors file under a temporary name beside `path`, then rename: a full disk or a crash leaves
    the earlier file (or none), never half of one, and no temporary file behind."""
    from safetensors.torch import save_file  # torch's side of safetensors: only the writers need it

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, scratch = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".safetensors")
    os.close(handle)
    try:
        save_file(tensors, scratch, metadata=metadata)
        os.replace(scratch, path)
    finally:
        if os.path.exists(scratch):
            os.remove(scratch)
    return path
