"""One run per output folder: output_dir/.finetune.lock, held with an OS file lock (flock) for the whole run.

The kernel drops a flock when its process ends, however it ends, so a crashed or killed run never leaves the
folder locked: its lock file stays behind, unlocked, and the next run takes it over. The file names the holder
(pid, host, start time) for the message a second run prints. Written by hand because filelock, the usual
package, truncates the file on every attempt to lock it, which would erase the holder's name.

flock needs POSIX (Linux, macOS); elsewhere the folder is not locked and a notice says so.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from ..errors import FinetuneError

fcntl: Any
try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

log = logging.getLogger("finetune")
LOCK_NAME = ".finetune.lock"
_held: dict[Path, int] = {}  # resolved output_dir -> descriptor of the lock this process holds


def _key(root: str | Path) -> Path:
    return Path(root).expanduser().resolve()


def describe_holder(fd: int) -> str:
    """'pid 1234 on host, since 2026-12-01 10:00:00' from the lock file's contents."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode() or "{}")
        return f"pid {info['pid']} on {info['host']}, since {info['since']}"
    except (OSError, ValueError, KeyError):
        return "a process that has not written its name yet"


def lock_holder(root: str | Path) -> str | None:
    """Who holds `root`'s lock, or None when nobody (or this process) does. Creates and changes nothing."""
    path = Path(root) / LOCK_NAME
    if fcntl is None or _key(root) in _held:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return describe_holder(fd)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def acquire_run_lock(root: str | Path) -> None:
    """Take `root`'s lock for this process (again is fine), or a one-line error naming the run that holds it."""
    key, path = _key(root), Path(root) / LOCK_NAME
    if key in _held:
        return
    if fcntl is None:
        log.warning("notice: no POSIX file locks here, so output_dir %s is not locked against a second run", root)
        return
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = describe_holder(fd)
            os.close(fd)
            raise FinetuneError(f"output_dir {root} is in use by another finetune run ({holder}); wait for it to "
                                "end or choose another output_dir") from None
        # A run that just ended unlinks its lock file: if we locked that unlinked file, lock the new one instead.
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since}).encode())
    _held[key] = fd


def release_run_lock(root: str | Path) -> None:
    """Remove the lock file and drop the lock (a no-op when this process does not hold it)."""
    fd = _held.pop(_key(root), None)
    if fd is None:
        return
    try:
        (Path(root) / LOCK_NAME).unlink(missing_ok=True)
    finally:
        os.close(fd)


@atexit.register
def _release_all() -> None:
    """A run started from Python (recipe.main(cfg)) holds its lock until the process ends."""
    for root in list(_held):
        release_run_lock(root)
