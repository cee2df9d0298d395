"""Where the project keeps what it builds once and reuses (the pretrained base, the quality network).

The cache root is ``$DGPO_CACHE`` when set, else ``~/.cache/dgpo``. Everything under it is keyed by a
hash of the config that produced it, so a changed config never picks up a stale artefact.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def cache_root() -> Path:
    """The cache directory (created on demand)."""
    root = Path(os.environ.get("DGPO_CACHE", Path.home() / ".cache" / "dgpo")).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def config_hash(obj) -> str:
    """A short stable hash of a JSON-serialisable object (a config as a dict)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]
