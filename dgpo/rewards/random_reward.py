"""Uniform random scores: the reward of throughput checks on random-weight models.

A model with random weights draws images that every verifier scores the same, so their group advantages would
all be zero; uniform random scores give an epoch the advantages, and so the update, of a learning run. The GPU
checks (``scripts/gpu_scale_check.py``, ``scripts/gpu_speed_check.py``) pass it to
:class:`dgpo.trainer.Trainer` as ``reward=``. It measures nothing about the images: not for learning.
"""

from __future__ import annotations

import numpy as np


class RandomReward:
    """``(images, prompts) -> scores``: one uniform draw in [0, 1) per image, from a generator seeded ``seed``."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)

    def __call__(self, images, prompts) -> np.ndarray:
        return self.rng.random(len(images))
