"""One writer per run folder: a lock held by the process that writes the run, for as long as it lives.

A run folder is written by one process at a time. ``dgpo train --resume RUN`` while ``dgpo train --out RUN`` is
still running (a double submit, a requeue while the old job lives) would otherwise have both write checkpoints,
``metrics.jsonl`` and ``final/``. The process that claims a run folder (a new run, :func:`~dgpo.runtime.output_dir.
claim_run_dir`) or reopens it (``--resume``, :func:`~dgpo.runtime.run_folder.reopen_run`) takes an exclusive
``flock`` on ``RUN/.writer.lock`` and keeps it until it exits; a second writer is refused with one line naming the
holder's process, host, command and start time (written into the file).

The kernel drops the lock when its process ends, killed or crashed too, so a stale lock never blocks a requeue.
The file itself stays in the folder (removing it would let a newcomer lock a fresh file while an older process
still holds the old one); a run that is released because it saved nothing removes it with the folder.
Where the filesystem does not support ``flock`` the run proceeds with a warning.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
import warnings
from pathlib import Path

from dgpo.errors import UserError

LOCK_NAME = ".writer.lock"
_HELD: dict[str, int] = {}  # resolved folder → file descriptor holding its lock (this process)


def _holder(path: Path) -> str:
    """Who holds the lock, as its file says."""
    try:
        info = json.loads(path.read_text())
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        return f"process {info['pid']} on {info['host']} ({info['command']}, since {since})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _command() -> str:
    """This process's command line, short (``dgpo train --out runs/x``)."""
    line = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "python"
    return line if len(line) <= 120 else line[:117] + "..."


def hold(folder: str | Path) -> None:
    """Take this run folder's writer lock for the rest of this process (a no-op if it already holds it); a
    UserError naming the holder if another process writes the folder."""
    folder = Path(folder).resolve()
    if str(folder) in _HELD:
        return
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"{str(folder)!r} is being written by {_holder(path)}: a run folder has one writer at a "
                        f"time; wait for it to end (or stop it), then --resume") from None
    except OSError as e:  # a filesystem without flock: run, but say that nothing guards the folder
        warnings.warn(f"{folder}: the writer lock is not supported here ({e.strerror}); make sure no other "
                      f"process writes this run folder", stacklevel=2)
        _HELD[str(folder)] = fd
        return
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                         "command": _command()})
    os.ftruncate(fd, 0)
    os.pwrite(fd, record.encode() + b"\n", 0)
    _HELD[str(folder)] = fd


def release(folder: str | Path, remove: bool = False) -> None:
    """Let go of this process's lock on ``folder`` (and, ``remove``, delete the lock file: only for a run that is
    being undone, whose folder goes back to what it was)."""
    folder = Path(folder).resolve()
    fd = _HELD.pop(str(folder), None)
    if remove:
        (folder / LOCK_NAME).unlink(missing_ok=True)
    if fd is not None:
        os.close(fd)
