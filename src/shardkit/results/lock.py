"""One writer per output folder: a run or a campaign holds an advisory lock on its folder for as long as it
runs, so a second one into the same folder is refused (naming the holder) instead of deleting the first
one's results as stale. The kernel releases the lock when its holder dies, whatever kills it."""

from __future__ import annotations

import datetime
import fcntl
import os
import platform
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import UsageError

LOCK_FILE = ".shardkit.lock"


@contextmanager
def folder_lock(folder: Path, what: str) -> Iterator[None]:
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise UsageError(f"{folder}: cannot write there ({error.strerror})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            raise UsageError(f"{folder}: in use by {holder}; wait for it or choose another folder") from None
        since = datetime.datetime.now().isoformat(timespec="seconds")
        command = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {platform.node()} ({what}: {command}, since {since})".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the lock
