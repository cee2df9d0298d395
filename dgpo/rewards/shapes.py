"""The shapes world's verifier as a reward: ``shapes_partial``, ``shapes_strict``, ``shapes_mixed``, ``shapes_soft``."""

from __future__ import annotations

import numpy as np

from dgpo.errors import UserError
from dgpo.rewards.protocol import RewardInputError, check_batch
from dgpo.worlds import shapes


class ShapesReward:
    """The shapes-world verifier as a reward (``dgpo.worlds.shapes``).

    ``kind="partial"``: the fraction of the prompt's atomic requirements met, in [0, 1] (dense signal);
    ``kind="strict"``: 1.0 when the whole prompt holds, else 0.0 (the GenEval-style pass/fail);
    ``kind="mixed"``: ½·strict + ½·partial: the dense signal of partial credit, plus a bonus for images that
    pass outright (with partial credit alone, the last missing atom is worth no more than the first, and a
    policy can settle on half-right images);
    ``kind="soft"``: the partial score with near-miss credit (``shapes.soft_partial_score``): an object drawn
    just outside its shape's fill band (a square with rounded corners) earns part of its atom, so samples
    that the partial score ties at 0 are ordered — a shaping of ours, not the spec's reward.
    Every prompt is checked against the grammar before any image is scored.
    """

    KINDS = ("partial", "strict", "mixed", "soft")

    def __init__(self, kind: str = "partial"):
        if kind not in self.KINDS:
            raise UserError(f"ShapesReward: kind={kind!r} is not allowed; choose one of {list(self.KINDS)}")
        self.kind = kind
        self.name = f"shapes_{kind}"

    def __repr__(self) -> str:
        return f"ShapesReward(kind={self.kind!r})"

    def __call__(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        images, prompts = check_batch(images, prompts, self.name)
        for i, p in enumerate(prompts):
            try:
                shapes.parse(p)
            except ValueError as e:
                raise RewardInputError(f"{self.name}: prompts[{i}]: {e}") from None
        if images.shape[1] != images.shape[2]:
            raise RewardInputError(f"{self.name}: the shapes verifier needs square images, got "
                                   f"{images.shape[1]}x{images.shape[2]}")
        if len(images) == 0:
            return np.zeros(0, dtype=np.float64)
        if self.kind == "mixed":
            return 0.5 * shapes.score_batch(images, prompts) + 0.5 * shapes.partial_score_batch(images, prompts)
        batch = {"partial": shapes.partial_score_batch, "strict": shapes.score_batch,
                 "soft": shapes.soft_partial_score_batch}[self.kind]
        return np.asarray(batch(images, prompts), dtype=np.float64)
