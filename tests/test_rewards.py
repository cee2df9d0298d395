"""Rewards: the shapes scorer, the registry, clear errors for bad input (served rewards:
test_reward_serving.py)."""

import numpy as np
import pytest

from dgpo.errors import UserError
from dgpo.rewards import Reward, ShapesReward, available_rewards, make_reward, register_reward
from dgpo.worlds import shapes

PROMPTS = [
    "a photo of a circle",
    "a photo of three squares",
    "a photo of a red triangle",
    "a photo of a square left of a circle",
    "a photo of a blue circle and a yellow triangle",
]


@pytest.fixture(scope="module")
def renders():
    return np.stack([shapes.render(p, 32, seed) for seed, p in enumerate(PROMPTS)])


def test_shapes_reward_renders_and_blanks(renders):
    blank = np.zeros_like(renders)
    for kind in ("partial", "strict", "mixed"):
        reward = ShapesReward(kind)
        assert isinstance(reward, Reward) and reward.name == f"shapes_{kind}"
        ok = reward(renders, PROMPTS)
        assert ok.dtype == np.float64 and ok.shape == (len(PROMPTS),)
        np.testing.assert_array_equal(ok, 1.0)
        np.testing.assert_array_equal(reward(blank, PROMPTS), 0.0)


def test_shapes_strict_vs_partial():
    # A render of "a circle and a square" only half-satisfies "a circle and a triangle".
    image = shapes.render("a photo of a circle and a square", 32, 0)[None]
    prompt = ["a photo of a circle and a triangle"]
    assert ShapesReward("partial")(image, prompt).tolist() == [0.5]
    assert ShapesReward("strict")(image, prompt).tolist() == [0.0]
    assert ShapesReward("mixed")(image, prompt).tolist() == [0.25]


def test_shapes_reward_input_errors(renders):
    reward = ShapesReward()
    with pytest.raises(ValueError, match="'a photo of a dragon' is not in the shapes grammar"):
        reward(renders[:2], ["a photo of a circle", "a photo of a dragon"])
    with pytest.raises(ValueError, match="2 images but 3 prompts"):
        reward(renders[:2], PROMPTS[:3])
    with pytest.raises(ValueError, match="uint8"):
        reward(renders.astype(np.float32), PROMPTS)
    with pytest.raises(UserError, match="kind"):
        ShapesReward("fuzzy")


def test_registry():
    assert {"shapes_partial", "shapes_strict", "shapes_mixed", "shapes_soft", "remote"} <= set(available_rewards())
    assert make_reward("shapes_strict").name == "shapes_strict"
    # the soft reward is the world's soft partial score: a rounded square earns part of "a photo of a square"
    yy, xx = np.mgrid[0:12, 0:12]
    corner_l1 = np.minimum(np.minimum(yy, 11 - yy) + np.minimum(xx, 11 - xx), 99)
    im = np.zeros((1, 32, 32, 3), np.uint8)
    im[0, 4:16, 4:16][corner_l1 >= 3] = shapes.COLORS["red"]   # corners cut by 6 px each: fill 120/144
    soft = make_reward("shapes_soft")(im, ["a photo of a square"])
    assert soft[0] == pytest.approx(shapes.soft_partial_score(im[0], "a photo of a square"))
    assert 0.0 < soft[0] < 0.5 and make_reward("shapes_partial")(im, ["a photo of a square"])[0] == 0.0
    assert make_reward("remote", url="http://127.0.0.1:1/", timeout=1.0).timeout == 1.0
    with pytest.raises(UserError, match="unknown reward 'image_reward'.*shapes_partial.*shapes_strict"):
        make_reward("image_reward")
    with pytest.raises(UserError, match="needs url"):
        make_reward("remote")
    with pytest.raises(UserError, match="bad options"):
        make_reward("shapes_partial", temperature=2)

    class Constant:
        name = "constant"

        def __call__(self, images, prompts):
            return np.ones(len(prompts))

    register_reward("test_constant", Constant, overwrite=True)
    assert make_reward("test_constant")(np.zeros((3, 4, 4, 3), np.uint8), ["a"] * 3).tolist() == [1.0] * 3
    with pytest.raises(UserError, match="already registered"):
        register_reward("test_constant", Constant)
