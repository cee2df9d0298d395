"""Where the project keeps what it builds once and reuses (the pretrained base, the quality network).

The cache root is ``$DGPO_CACHE`` when set (and not empty), else ``~/.cache/dgpo``. Everything under it is keyed by a
hash of the config that produced it, so a changed config never picks up a stale artefact.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path


def cache_root() -> Path:
    """The cache directory (created on demand): ``$DGPO_CACHE`` when set and not empty, else ``~/.cache/dgpo``.
    A folder that cannot be created is a UserError naming it."""
    root = Path(os.environ.get("DGPO_CACHE") or Path.home() / ".cache" / "dgpo").expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        from dgpo.errors import UserError
        raise UserError(f"the cache folder {str(root)!r} cannot be created ({e.strerror}): set DGPO_CACHE to a "
                        f"folder you can write") from None
    return root


def check_cache_writable() -> Path:
    """The cache folder, once a file could be written in it (checked before a command's work, not after it)."""
    import tempfile
    root = cache_root()
    try:
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as e:
        from dgpo.errors import UserError
        raise UserError(f"the cache folder {str(root)!r} cannot be written ({e.strerror}): set DGPO_CACHE to a "
                        f"folder you can write") from None
    return root


def config_hash(obj) -> str:
    """A short stable hash of a JSON-serialisable object (a config as a dict)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


@contextmanager
def exclusive_lock(path: str | Path, on_wait=None):
    """Hold an exclusive ``fcntl.flock`` on the file ``path`` (created if missing) for the ``with`` block.

    One process at a time runs the block per lock file; the others wait. ``on_wait()`` is called once
    when the lock is busy, before waiting. The kernel drops the lock when the process exits, even when it
    is killed, so a lock is never left stale. The lock file itself stays (removing it would let a waiting
    process and a newcomer lock two different files).
    """
    import fcntl
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
