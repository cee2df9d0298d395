"""The embedded shapes world as a :class:`dgpo.worlds.World`: its 126 prompts and split, the verifier's
shapes-geneval (per category) and partial score, and the quality FD (:mod:`dgpo.worlds.shapes`,
:mod:`dgpo.worlds.quality`; the rules in docs/shapes.md)."""

from __future__ import annotations

import numpy as np

from dgpo.errors import UserError
from dgpo.worlds import quality, register_world, shapes


class ShapesWorld:
    name = "shapes"
    metric = "shapes-geneval"

    def prompts(self, split: str) -> list[str]:
        return shapes.prompts(split)

    def check_prompts(self, prompts: list[str]) -> None:
        for p in prompts:
            try:
                shapes.parse(p)
            except ValueError as e:
                raise UserError(str(e)) from None

    def score(self, images: np.ndarray, prompts: list[str], fd: bool = True) -> dict:
        """shapes-geneval: the mean over categories of the mean strict score per prompt."""
        strict = shapes.score_batch(images, prompts)
        by_prompt: dict[str, list[float]] = {}
        for p, s in zip(prompts, strict):
            by_prompt.setdefault(p, []).append(float(s))
        result = shapes.geneval(by_prompt)
        out = {"geneval": result["overall"], "per_category": result["per_category"],
               "partial": float(np.mean(shapes.partial_score_batch(images, prompts))),
               "n_images": len(images), "n_prompts": len(by_prompt)}
        if fd:
            out["fd"] = quality.quality_fd(images, prompts)
        return out


register_world("shapes", ShapesWorld)
