"""A reward plug-in: one file, one registry line.

``object_count``: the fraction of the objects a shapes prompt names that are drawn, whatever their colour,
shape quality or placement — e.g. for "a photo of three circles", min(#objects, 3) / 3 minus a penalty
for extra objects. It scores presence alone, the first thing DGPO learns on this world.

    dgpo train --plugin examples/object_count_reward.py --set reward.name=object_count
"""

from __future__ import annotations

import numpy as np

from dgpo.rewards import register_reward
from dgpo.worlds import shapes


def wanted_objects(prompt: str) -> int:
    """How many objects the prompt asks for: ``count`` of each shape it names."""
    meaning = shapes.parse(prompt)
    return meaning.count * len(meaning.shapes)


class ObjectCountReward:
    """r = clip(min(n, N)/N − 0.5·max(n − N, 0)/N, 0, 1) with n the objects detected, N those asked for."""

    name = "object_count"

    def __call__(self, images, prompts) -> np.ndarray:
        scores = []
        for image, prompt in zip(images, prompts):
            n, want = len(shapes.detect(image)), wanted_objects(prompt)
            scores.append(min(max(min(n, want) / want - 0.5 * max(n - want, 0) / want, 0.0), 1.0))
        return np.asarray(scores, dtype=np.float64)


register_reward("object_count", ObjectCountReward)
