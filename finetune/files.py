"""Files written atomically that still follow the user's umask, like every other file their tools write.

Two writers ignore the umask: tempfile.mkstemp creates its file with mode 0600, and safetensors (0.8) writes
through a temporary file that is always 0600 and renames it into place (safetensors issue #782). An export or
fused model left 0600 cannot be read by a UI running as another user. So scratch files get a plain unique name
(created by the writer as any program does), and every .safetensors file we write is given the mode a new file
gets from the umask (0644 under the usual 022).
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path


def scratch_path(final: str | Path, tag: str) -> Path:
    """A unique hidden name beside `final` (same folder, so the rename is atomic): .<tag>-<pid>-<random><suffix>."""
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
