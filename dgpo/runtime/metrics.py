"""The ``metrics.jsonl`` of a run folder (one JSON object per line), shared by ``dgpo train`` and
``tdm-r1 distill``: read it, cut it back to a checkpoint on resume, turn an evaluation row into a result; and a
gain against the evaluation noise (two evaluations' standard errors, or the paired spread over seed sets)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np


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


#: The image-quality measures a world may report beside its task metric (result key → table column): the FD, and
#: the sharpness beside it (:mod:`dgpo.worlds.sharpness`). An evaluation row stores each as ``eval_<key>``.
QUALITY_MEASURES = {"fd": "FD", "sharpness": "sharpness", "edge_width": "edge width"}


def eval_result(row: dict) -> dict:
    """An evaluation row as the result dict that :func:`dgpo.evaluation.evaluate.format_table` prints."""
    out = {"geneval": row["eval_geneval"], "per_category": row["eval_per_category"], "partial": row["eval_partial"]}
    for key in QUALITY_MEASURES:  # where the world measured it
        if row.get(f"eval_{key}") is not None:
            out[key] = row[f"eval_{key}"]
    return out


def gain_against_noise(first: dict, last: dict, metric: str = "shapes-geneval") -> dict:
    """The change of the task metric between two evaluation rows, beside its evaluation noise.

    noise = 2·√(SE_first² + SE_last²), two standard errors of the difference of two independent evaluations
    (each SE from :func:`dgpo.worlds.shapes.geneval_standard_error`); both evaluations use the same seeds, which
    makes the true noise of the difference smaller still, so a gain above ``noise`` is real. Returns
    ``{"gain", "noise", "beyond_noise", "sentence"}``; noise is None when a row has no standard error (a world
    that does not report one, or an older cached evaluation)."""
    gain = last["eval_geneval"] - first["eval_geneval"]
    ses = [first.get("eval_geneval_se"), last.get("eval_geneval_se")]
    if any(se is None for se in ses):
        return {"gain": gain, "noise": None, "beyond_noise": None,
                "sentence": f"{metric} {gain:+.3f} (no evaluation noise known for these evaluations)"}
    noise = 2 * (ses[0] ** 2 + ses[1] ** 2) ** 0.5
    beyond = abs(gain) > noise
    verdict = ("larger than the evaluation noise" if beyond else
               "within the evaluation noise: more images per prompt (eval.per_prompt) would tell")
    return {"gain": gain, "noise": noise, "beyond_noise": beyond,
            "sentence": f"{metric} {gain:+.3f} ± {noise:.3f} (two standard errors of the evaluation noise): {verdict}"}


#: Seed sets of an evaluation-noise measurement: image k of set j has seed ``seed + j·SEED_SET_STRIDE + k``, so
#: sets are disjoint for fewer than 10 million images each (scripts/eval_noise.py and the few-step benchmark).
SEED_SET_STRIDE = 10_000_000


def seed_set_start(seed: int, j: int) -> int:
    """The seed of the first image of seed set ``j``."""
    return seed + j * SEED_SET_STRIDE


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (n − 1) and standard error of the mean of ``values``."""
    a = np.asarray(values, dtype=np.float64)
    std = float(a.std(ddof=1)) if len(a) > 1 else float("nan")
    return {"mean": float(a.mean()), "std": std, "sem": std / math.sqrt(len(a))}


def paired(base: list[float], other: list[float]) -> dict:
    """The paired difference other − base, set by set: spread plus mean / sem (±inf when every set moved by
    the same non-zero amount, 0 when none moved)."""
    d = spread([o - b for o, b in zip(other, base)])
    d["ratio"] = d["mean"] / d["sem"] if d["sem"] > 0 else (0.0 if d["mean"] == 0 else math.copysign(math.inf, d["mean"]))
    return d
