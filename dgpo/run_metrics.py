"""The ``metrics.jsonl`` of a run folder (one JSON object per line), shared by ``dgpo train`` and
``tdm-r1 distill``: read it, cut it back to a checkpoint on resume, turn an evaluation row into a result."""

from __future__ import annotations

import json
import os
from pathlib import Path


def read_metrics(path: Path) -> list[dict]:
    """Every row of ``path`` (an empty list when the file does not exist yet)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(path: Path, step: int, key: str) -> None:
    """Drop rows whose ``key`` (epoch / iteration) is past the checkpoint we resume from: the resumed run
    recomputes them identically. Atomic: the file is replaced, never half-written."""
    rows = [r for r in read_metrics(path) if r[key] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def eval_result(row: dict) -> dict:
    """An evaluation row as the result dict that :func:`dgpo.evaluation.format_table` prints."""
    out = {"geneval": row["eval_geneval"], "per_category": row["eval_per_category"], "partial": row["eval_partial"]}
    if row.get("eval_fd") is not None:
        out["fd"] = row["eval_fd"]
    return out
