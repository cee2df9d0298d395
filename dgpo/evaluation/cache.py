"""A cache of the epoch-0 evaluation, shared by every run on the same base with the same protocol.

At epoch 0 every method's policy *is* the base (LoRA B starts at zero, EMAs start at the weights), so its
evaluation depends only on the base's weights and the evaluation protocol. Benchmarks start several runs
from one base (``scripts/bench_rl.py``: one per method), and each would spend minutes re-evaluating it.

The key hashes: the base's weight files (path, size, modification time — not their bytes, which can be
gigabytes), the evaluation protocol (split, images per prompt, seed, FD and sharpness, sampler), the number of
zero T5 tokens, the precision and device, and the *source* of the code that generates and scores the images,
so an edited verifier or sampler never reads a stale number. Entries live under
``cache_root() / "evals" / KEY/`` (``result.json`` + the sample grid), written atomically.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from dgpo.paths import cache_root, config_hash

PACKAGE = Path(__file__).resolve().parents[1]
# The code an evaluation's numbers depend on (paths in the package); any edit to these files changes the key.
SOURCES = ("evaluation/evaluate.py", "sampling/generation.py", "sampling/ode.py", "models/handle.py", "worlds/shapes.py",
           "worlds/quality.py", "worlds/sharpness.py", "worlds/shapes_world.py", "worlds/categories.py")


def weight_files(base: Path) -> list[list]:
    """(relative path, size, mtime_ns) of every weight file of a saved pipeline."""
    files = sorted(p for p in Path(base).rglob("*") if p.suffix in (".safetensors", ".bin") and p.is_file())
    return [[str(p.relative_to(base)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def eval_key(base: Path, protocol: dict) -> str:
    """The cache key of the base's evaluation under ``protocol`` (any JSON-serialisable dict)."""
    sources = {name: config_hash((PACKAGE / name).read_text()) for name in SOURCES}
    return config_hash({"base": str(Path(base).resolve()), "weights": weight_files(base), "protocol": protocol,
                        "sources": sources})


def entry_dir(key: str) -> Path:
    return cache_root() / "evals" / key


def load(key: str) -> tuple[dict, Path | None] | None:
    """(result, grid PNG or None) of a cached evaluation, or None."""
    d = entry_dir(key)
    if not (d / "result.json").is_file():
        return None
    grid = d / "grid.png"
    return json.loads((d / "result.json").read_text()), grid if grid.is_file() else None


def store(key: str, result: dict, grid: Path | None) -> None:
    """Write an entry atomically (a temp folder renamed into place; a concurrent writer's entry wins)."""
    final = entry_dir(key)
    tmp = final.with_name(f".{key}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "result.json").write_text(json.dumps(result))
    if grid is not None and grid.is_file():
        shutil.copyfile(grid, tmp / "grid.png")
    try:
        os.replace(tmp, final)
    except OSError:  # another run stored the same entry first
        shutil.rmtree(tmp, ignore_errors=True)
