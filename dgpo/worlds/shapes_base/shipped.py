"""Bases shipped pretrained inside the package: the weights the README's numbers describe, with no pretraining.

A shipped base is a diffusers pipeline folder under ``shipped/<name>/`` (package data) holding, besides the
pipeline, the config it was pretrained from (``pretrain_config.yaml``), its summary (``pretrain_summary.json``,
whose ``key`` is the cache key :func:`dgpo.worlds.shapes_base.pretrain.base_key` of that config) and
``SHIPPED.json``: the config file of this repository it reproduces and the exact command that pretrains it again.

:func:`dgpo.worlds.shapes_base.pretrain.ensure_base` returns the shipped folder for a config whose key matches,
before it looks in the cache: every user of a shipped config gets the same weights (a pretraining on another
machine reproduces the recipe, not the bits). The folder is read-only to the project: nothing writes into it.
"""

from __future__ import annotations

import json
from pathlib import Path

SHIPPED_ROOT = Path(__file__).resolve().parent / "shipped"
SHIPPED_FILE = "SHIPPED.json"


def shipped_bases() -> dict[str, Path]:
    """Cache key → folder of every base shipped with the package."""
    found = {}
    for folder in sorted(SHIPPED_ROOT.glob("*/")):
        summary = folder / "pretrain_summary.json"
        if (folder / "model_index.json").is_file() and summary.is_file():
            found[json.loads(summary.read_text())["key"]] = folder
    return found


def shipped_base(key: str) -> Path | None:
    """The shipped folder of the base with cache key ``key``, or None."""
    return shipped_bases().get(key)


def shipped_record(folder: Path) -> dict:
    """``SHIPPED.json`` of a shipped base: ``config`` (its config file, relative to the repository) and
    ``command`` (the pretraining that reproduces it)."""
    return json.loads((Path(folder) / SHIPPED_FILE).read_text())
