"""Files through which two instances on one host agree without talking: created exclusively (whoever
creates one first decides), removed whether or not they are there, and whether the process that
named itself in one is still alive."""
from __future__ import annotations

import os
import tempfile


def default_dir() -> str:
    """Where instances on one host meet by default: /dev/shm (memory), else the temporary directory."""
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def create_marker(path: str) -> bool:
    """Create path if no one has: True if this call did (False too where its directory has gone: the
    instance that offered closed)."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        return True
    except (FileExistsError, FileNotFoundError):
        return False


def write_marker(path: str, content: str) -> None:
    """Create (or replace) path holding content, whole: a reader never sees it half written."""
    with open(path + ".part", "w") as f:
        f.write(content)
    os.replace(path + ".part", path)


def release_unread(marker: str) -> None:
    """A consumer that will not read what marker (a path without its suffix) names: claimed and done,
    so that its producer frees it (unless the producer has claimed it first, giving it up)."""
    if create_marker(marker + ".claim"):
        create_marker(marker + ".done")


def remove_file(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
