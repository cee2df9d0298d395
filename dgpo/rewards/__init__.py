"""Rewards: one protocol (:mod:`.protocol`), a registry (:mod:`.registry`), the shapes verifier's rewards
(:mod:`.shapes`), rewards read from published models (:mod:`.clip`, :mod:`.image_reward`, :mod:`.ocr`,
:mod:`.geneval`), judged by a served model (:mod:`.vlm_judge`), mixed (:mod:`.mix`), and served over HTTP
(:mod:`.server`, :mod:`.client`).

    reward = make_reward("shapes_partial")
    scores = reward(images, prompts)        # images: uint8 (N, H, W, 3); prompts: N strings → float64 (N,)
"""

from dgpo.rewards.protocol import (Reward, RewardInputError, RewardServerError, call_reward, check_scores,
                                   decode_png, encode_png, metadata_of)
from dgpo.rewards.registry import available_rewards, make_reward, register_reward, reward_of_run
from dgpo.rewards.shapes import ShapesReward

__all__ = ["Reward", "RewardInputError", "RewardServerError", "ShapesReward", "available_rewards", "call_reward",
           "check_scores", "decode_png", "encode_png", "make_reward", "metadata_of", "register_reward",
           "reward_of_run"]
