"""The embedded shapes world as a :class:`dgpo.worlds.registry.World`: its 126 prompts and split, the verifier's
shapes-geneval (per category) and partial score, the quality FD and the sharpness beside it
(:mod:`dgpo.worlds.shapes`, :mod:`dgpo.worlds.quality`, :mod:`dgpo.worlds.sharpness`; the rules in
docs/shapes.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dgpo.errors import UserError
from dgpo.worlds import quality, shapes, sharpness

class ShapesWorld:
    name = "shapes"
    metric = "shapes-geneval"
    reward = "shapes_partial"

    def embedded_base(self, base_config: str, log=print) -> Path:
        """The tiny SD3 base pretrained on the world's renders (:mod:`dgpo.worlds.shapes_base`) by the recipe
        ``base_config`` (a path, or a shipped recipe as ``configs/base/…``: :func:`dgpo.recipes.resolve_config_path`),
        pretrained now if it is not cached."""
        from dgpo.worlds.shapes_base.pretrain import ensure_base, load_pretrain_config
        return ensure_base(load_pretrain_config(base_config), log=log)

    def prompts(self, split: str) -> list[str]:
        return shapes.prompts(split)

    def category(self, prompt: str) -> str:
        """The prompt's benchmark category (single_object, two_object, counting, colors, position,
        color_attr)."""
        return shapes.category(prompt)

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
        out = {"geneval": result["overall"], "geneval_se": shapes.geneval_standard_error(by_prompt),
               "per_category": result["per_category"],
               "partial": float(np.mean(shapes.partial_score_batch(images, prompts))),
               "n_images": len(images), "n_prompts": len(by_prompt)}
        if fd:  # image quality apart from the task: the FD, and beside it the sharpness (cheap)
            out["fd"] = quality.quality_fd(images, prompts)
            out["sharpness"] = sharpness.high_frequency_ratio(images, prompts)
            out["edge_width"] = sharpness.edge_width(images, prompts)
        return out

