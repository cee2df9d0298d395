"""A world's task metric from per-image scores: the mean by category, and its standard error over fresh images
(shared by the shapes world and prompt-file worlds)."""

from __future__ import annotations

import numpy as np


def mean_by_category(scores_by_prompt: dict[str, list[float]], category_of) -> dict:
    """``{"overall", "per_category", "se"}``: per category the mean over its prompts of each prompt's mean
    score, overall the mean over categories, se its standard error over fresh images
    (√Σ_p w_p²·s_p²/n_p with w_p = 1/(C·P_c), as :func:`dgpo.worlds.shapes.geneval_standard_error`)."""
    by_cat: dict[str, list[np.ndarray]] = {}
    for prompt, values in scores_by_prompt.items():
        values = np.asarray(values, dtype=np.float64)
        if values.size:
            by_cat.setdefault(category_of(prompt), []).append(values)
    per_category = {c: float(np.mean([v.mean() for v in vs])) for c, vs in by_cat.items()}
    overall = float(np.mean(list(per_category.values()))) if per_category else float("nan")
    variance = sum((1.0 / (len(by_cat) * len(vs))) ** 2 * (v.var(ddof=1) if v.size > 1 else 0.0) / v.size
                   for vs in by_cat.values() for v in vs)
    return {"overall": overall, "per_category": per_category, "se": float(np.sqrt(variance)) if by_cat else float("nan")}
