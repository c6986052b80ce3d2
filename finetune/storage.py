"""A full disk, an exceeded quota or a read-only folder, recognised whatever library was writing, told in one line.

Python's own writes raise OSError with an errno. The writers of our dependencies do not: safetensors' Rust writer
raises SafetensorError with "os error 28" in its text, and torch.save's C++ zip writer raises a RuntimeError whose
text ("unexpected pos 576 vs 534", "file write failed") does not say why. For those, a small probe write into the
same folder tells what the disk says now.

Files written here also follow the umask, like every other file the user's tools write. Two writers ignore it:
tempfile.mkstemp creates its file 0600, and safetensors (0.8) writes through a temporary file that is always 0600
and renames it into place (safetensors issue #782); an export or fused model left 0600 cannot be read by a UI
running as another user. So scratch names are plain unique names (created as any program creates a file), and
every .safetensors file we write is given the mode a new file gets from the umask (0644 under the usual 022).
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import uuid
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

    Any other error passes through untouched."""
    try:
        yield
    except (OSError, SafetensorError, RuntimeError) as exc:
        reason = storage_reason(exc, folder)
        if reason is None:
            raise
        raise FinetuneError(f"{where}: {reason}; {advice}") from None


def scratch_path(final: str | Path, tag: str) -> Path:
    """A unique hidden name beside `final` (same folder, so the rename is atomic): .<tag>-<pid>-<random><suffix>.
    Not mkstemp: its 0600 would outlive the rename."""
    final = Path(final)
    return final.with_name(f".{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}{final.suffix}")


def current_umask() -> int:
    """The process's umask: read from /proc/self/status where Linux shows it (no change to it), else set and put
    back (with a restrictive value in between)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    previous = os.umask(0o077)
    os.umask(previous)
    return previous


def follow_umask(path: str | Path) -> Path:
    """Give a file written by safetensors, or every .safetensors file under a folder, the mode the umask gives new
    files."""
    path = Path(path)
    mode = 0o666 & ~current_umask()
    for file in sorted(path.rglob("*.safetensors")) if path.is_dir() else [path]:
        os.chmod(file, mode)
    return path


def save_safetensors_atomically(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write a .safetensors file under a temporary name beside `path`, then rename: a full disk or a crash leaves
    the earlier file (or none), never half of one, and no temporary file behind. The file follows the umask."""
    from safetensors.torch import save_file  # torch's side of safetensors: only the writers need it

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = scratch_path(path, path.stem)
    try:
        save_file(tensors, scratch, metadata=metadata)
        os.replace(follow_umask(scratch), path)
    finally:
        if os.path.exists(scratch):
            os.remove(scratch)
    return path
