"""The reward registry: every reward by name, built from a run's ``reward:`` section.

``make_reward("shapes_partial")`` builds a registered reward; ``register_reward(name, factory)`` adds one (a
plug-in's). Rewards that need a model or a server are imported only when built: ``remote`` scores on HTTP reward
servers (:mod:`dgpo.rewards.client`, over httpx), and :mod:`dgpo.rewards.server` serves any registered reward
(``dgpo serve-reward NAME``); images cross the wire as PNG, scores as JSON: no pickles.
"""

from __future__ import annotations

import inspect
from typing import Callable

from dgpo.errors import UserError
from dgpo.rewards.protocol import Reward
from dgpo.rewards.shapes import ShapesReward


def _remote_reward(url, timeout: float = 30.0, retries: int = 2, backoff: float = 0.5, batch_size: int = 0,
                   name: str = "remote", score_range=()) -> Reward:
    """``reward.name: remote``: :class:`dgpo.rewards.client.RemoteReward` (imported when used)."""
    from dgpo.rewards.client import RemoteReward
    return RemoteReward(url, timeout=timeout, retries=retries, backoff=backoff, batch_size=batch_size, name=name,
                        score_range=score_range)


def _ocr_reward(threads: int = 0) -> Reward:
    """``reward.name: ocr``: :class:`dgpo.rewards.ocr.OCRReward` (PP-OCR; imported when used)."""
    from dgpo.rewards.ocr import OCRReward
    return OCRReward(threads=threads)


def _clip_reward(kind: str):
    """``reward.name: clip_score | pickscore | aesthetic | hpsv2``: :class:`dgpo.rewards.clip.CLIPReward` on
    ``reward.model`` (imported when used)."""
    def factory(model: str = "") -> Reward:
        from dgpo.rewards.clip import CLIPReward
        return CLIPReward(kind, model)
    return factory


def _image_reward(model: str = "") -> Reward:
    """``reward.name: imagereward``: :class:`dgpo.rewards.image_reward.ImageReward` on ``reward.model``
    (``IMAGEREWARD_PT,BERT_TOKENIZER_DIR``; imported when used)."""
    from dgpo.rewards.image_reward import ImageReward
    return ImageReward(model)


def _geneval(partial: bool):
    """``reward.name: geneval | geneval_partial``: GenEval's rules (:mod:`dgpo.rewards.geneval`) with the detector named by
    ``reward.model`` (``shapes``, or GenEval's Mask2Former: ``CONFIG.py,CHECKPOINT.pth,CLIP_DIR``)."""
    def factory(model: str = "") -> Reward:
        from dgpo.rewards.geneval import make_geneval_reward
        return make_geneval_reward(model, partial)
    return factory


def _vlm_judge(url: str = "", model: str = "", timeout: float = 60.0, retries: int = 2) -> Reward:
    """``reward.name: vlm_judge``: :class:`dgpo.rewards.vlm_judge.VLMJudge` at ``reward.url`` (an OpenAI-compatible API
    base) judging with the served ``reward.model``."""
    from dgpo.rewards.vlm_judge import VLMJudge
    return VLMJudge(url, model, timeout=timeout, retries=retries)


# ------------------------------------------------------------------------------------------------ registry

_REGISTRY: dict[str, Callable[..., Reward]] = {
    "shapes_partial": lambda: ShapesReward(kind="partial"),
    "shapes_strict": lambda: ShapesReward(kind="strict"),
    "shapes_mixed": lambda: ShapesReward(kind="mixed"),
    "shapes_soft": lambda: ShapesReward(kind="soft"),
    "remote": _remote_reward,
    "ocr": _ocr_reward,
    "clip_score": _clip_reward("clip_score"),
    "pickscore": _clip_reward("pickscore"),
    "aesthetic": _clip_reward("aesthetic"),
    "hpsv2": _clip_reward("hpsv2"),
    "imagereward": _image_reward,
    "vlm_judge": _vlm_judge,
    "geneval": _geneval(partial=False),
    "geneval_partial": _geneval(partial=True),
}


def available_rewards() -> list[str]:
    """The registered reward names, sorted."""
    return sorted(_REGISTRY)


def register_reward(name: str, factory: Callable[..., Reward], overwrite: bool = False) -> None:
    """Register ``factory(**kwargs) -> Reward`` under ``name`` so that configs can say ``reward.name: NAME``.

    Raises ``UserError`` if the name is taken (unless ``overwrite``) or the factory is not callable.
    """
    if not isinstance(name, str) or not name:
        raise UserError(f"register_reward: name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise UserError(f"register_reward: factory for {name!r} must be callable, got {type(factory).__name__}")
    if name in _REGISTRY and not overwrite:
        raise UserError(f"register_reward: a reward named {name!r} is already registered; "
                        "pick another name or pass overwrite=True")
    _REGISTRY[name] = factory


#: The ``reward:`` settings a reward reached over HTTP is built with.
SERVED_SETTINGS = {"remote": ("url", "timeout", "retries", "batch_size", "score_range"),
                   "vlm_judge": ("url", "timeout", "retries")}


def check_reward_weights(reward_cfg) -> None:
    """``reward.weights``: none, or one per reward of ``reward.name`` (``a+b`` names two; a single reward takes
    none but [1]): a list that does not fit is a UserError, not a silent no-op."""
    weights = list(getattr(reward_cfg, "weights", []) or [])
    count = len(reward_cfg.name.split("+")) if reward_cfg.name else 1
    if weights and len(weights) != count:
        named = reward_cfg.name or "the world's own"
        raise UserError(f"reward.weights has {len(weights)} values for {count} reward{'s' if count > 1 else ''} "
                        f"({named}): give one weight per reward of reward.name=a+b, or none")


def reward_of_run(reward_cfg, world) -> tuple[str, Reward]:
    """The reward a training run's ``reward:`` section names (:class:`dgpo.train_config.RewardConfig`): its
    ``name``, or the world's own when empty, built with the section's server settings for a served reward
    (:data:`SERVED_SETTINGS`) and its ``model`` for a reward that reads one."""
    name = reward_cfg.name or world.reward
    if "+" in name:  # several rewards (dgpo.rewards.mix)
        from dgpo.rewards.mix import RewardMix
        names = name.split("+")
        return name, RewardMix(names, [make_reward(n) for n in names], getattr(reward_cfg, "weights", []),
                               getattr(reward_cfg, "combine", "sum"))
    check_reward_weights(reward_cfg)
    options = {key: getattr(reward_cfg, key) for key in SERVED_SETTINGS.get(name, ())}
    if getattr(reward_cfg, "model", "") and name in _REGISTRY and "model" in inspect.signature(_REGISTRY[name]).parameters:
        options["model"] = reward_cfg.model
    reward = make_reward(name, **options)
    adopt = getattr(world, "use_reward", None)
    if callable(adopt):  # a prompt file without a reward of its own evaluates with the run's
        adopt(name, reward)
    return name, reward


def make_reward(name: str, **kwargs) -> Reward:
    """Build a registered reward: ``"shapes_partial"``, ``"shapes_strict"``, ``"shapes_mixed"``,
    ``"shapes_soft"``, ``"remote"`` (needs ``url=``)
    or any name added with :func:`register_reward`. Unknown names and options are ``UserError``s."""
    if name not in _REGISTRY:
        raise UserError(f"unknown reward {name!r}; allowed names: {available_rewards()} "
                        "(add your own with dgpo.rewards.register_reward)")
    factory = _REGISTRY[name]
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as e:
        hint = " (the remote reward needs url=http://HOST:PORT/...)" if name == "remote" else ""
        raise UserError(f"reward {name!r}: bad options {sorted(kwargs)}: {e}{hint}") from None
    except ValueError:  # a builtin without a signature: let the call itself complain
        pass
    return factory(**kwargs)
