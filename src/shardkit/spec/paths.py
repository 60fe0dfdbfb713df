"""The files a run reads and the folders it writes, checked before anything happens, as one line."""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..errors import UsageError


def read_text(path: Path) -> str:
    """A text file's content; bytes that are not UTF-8 are refused with the line they are on."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise UsageError(f"{path}:{line}: not UTF-8 text (byte 0x{data[error.start]:02x})") from None


def folder_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be (or become) a folder to write in, or None.

    Root may write almost anywhere as far as ``os.access`` tells, and a virtual file system such as /proc
    refuses new entries only when one is made; so a folder is made and removed at once in the nearest
    existing parent, the one place a later mkdir would start from."""
    folder = Path(path)
    parent = folder
    try:
        if folder.exists() and not folder.is_dir():
            return "is a file, not a folder"
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            return f"{parent} is a file, not a folder"
        Path(tempfile.mkdtemp(prefix=".shardkit-check-", dir=parent)).rmdir()
    except OSError as error:
        return f"cannot write in {parent} ({error.strerror})"
    return None
