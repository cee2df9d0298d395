"""Several rewards at once: ``reward.name: ocr+shapes_strict`` with ``reward.weights: [1.0, 0.5]``.

Two ways to combine K rewards r_1 … r_K with weights w_k (``reward.combine``):

- ``sum``: one reward r = Σ_k w_k·r_k, whose group advantages the method uses as usual;
- ``advantages``: each reward gets its own group advantages A_k (normalised within each group on its own
  scale, so a reward with a large spread cannot drown a small one), and the method uses A = Σ_k w_k·A_k.

Either way the logged training reward is the weighted sum. :func:`dgpo.methods.batch.score_groups` asks a
reward for :meth:`RewardMix.columns` when ``combine == "advantages"``.
"""

from __future__ import annotations

import numpy as np

from dgpo.errors import UserError
from dgpo.rewards.protocol import call_reward

COMBINE = ("sum", "advantages")


class RewardMix:
    """K rewards (built by the registry, :func:`dgpo.rewards.registry.reward_of_run`) with weights; calling it
    gives the weighted sum."""

    def __init__(self, names: list[str], rewards: list, weights: list[float], combine: str = "sum"):
        if combine not in COMBINE:
            raise UserError(f"reward.combine must be one of {COMBINE}, got {combine!r}")
        weights = list(weights) or [1.0] * len(names)
        if len(weights) != len(names):
            raise UserError(f"reward.weights has {len(weights)} values for {len(names)} rewards ({'+'.join(names)}); "
                            "give one weight per reward, or none for equal weights")
        self.names, self.weights, self.combine = names, [float(w) for w in weights], combine
        self.rewards = list(rewards)
        self.name = "+".join(names)

    def __repr__(self) -> str:
        return f"RewardMix({self.name!r}, weights={self.weights}, combine={self.combine!r})"

    def columns(self, images: np.ndarray, prompts: list[str], metadata: list[dict] | None = None) -> np.ndarray:
        """(N, K): every reward's scores (each given the prompts' metadata if it takes it)."""
        return np.stack([np.asarray(call_reward(r, images, prompts, metadata), dtype=np.float64)
                         for r in self.rewards], axis=1)

    def __call__(self, images: np.ndarray, prompts: list[str], metadata: list[dict] | None = None) -> np.ndarray:
        return self.columns(images, prompts, metadata) @ np.asarray(self.weights)
