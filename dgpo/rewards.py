"""Rewards: one protocol, a registry, in-process scorers and a remote (HTTP) scorer.

A reward maps a batch of generated images and their prompts to one float per image::

    reward = make_reward("shapes_partial")
    scores = reward(images, prompts)        # images: uint8 (N, H, W, 3); prompts: N strings → float64 (N,)

Remote scoring: ``reward.name: remote`` scores on HTTP reward servers (:mod:`dgpo.reward_client`, over
httpx); :mod:`dgpo.reward_server` serves any registered reward (``dgpo serve-reward NAME``). Images cross the
wire as PNG, scores as JSON: no pickles.
"""

from __future__ import annotations

import base64
import binascii
import inspect
import io
import math
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np
from PIL import Image

from dgpo.errors import UserError
from dgpo.worlds import shapes

__all__ = [
    "Reward",
    "RewardInputError",
    "RewardServerError",
    "ShapesReward",
    "make_reward",
    "register_reward",
    "available_rewards",
    "check_scores",
    "encode_png",
    "decode_png",
]

class RewardInputError(UserError, ValueError):
    """Images or prompts handed to a reward are malformed (wrong shape/dtype, prompt outside a grammar)."""


class RewardServerError(UserError):
    """A remote reward server is unreachable, too slow, or answered something that is not scores."""


@runtime_checkable
class Reward(Protocol):
    """A reward function over a batch of images.

    Attributes:
        name: short identifier used in logs and metric names (e.g. ``"shapes_partial"``).

    ``reward(images, prompts)``: ``images`` is a uint8 array (N, H, W, 3), ``prompts`` a list of N strings;
    returns a float64 array (N,) of finite scores (higher is better).
    """

    name: str

    def __call__(self, images: np.ndarray, prompts: list[str]) -> np.ndarray: ...


# ------------------------------------------------------------------------------------------------ checks

def _check_batch(images, prompts, who: str) -> tuple[np.ndarray, list[str]]:
    """Validate a batch: uint8 images (N, H, W, 3) (a list of (H, W, 3) arrays is stacked) and N prompts."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise RewardInputError(f"{who}: prompts must be a list of strings, got {type(prompts).__name__}")
    prompts = list(prompts)
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise RewardInputError(f"{who}: prompts[{i}] must be a str, got {type(p).__name__}")
    if isinstance(images, (list, tuple)):
        try:
            images = np.stack([np.asarray(im) for im in images]) if images else np.zeros((0, 1, 1, 3), np.uint8)
        except ValueError as e:
            raise RewardInputError(f"{who}: images of different shapes cannot form a batch: {e}") from None
    if not isinstance(images, np.ndarray):
        raise RewardInputError(f"{who}: images must be a uint8 numpy array (N, H, W, 3), "
                               f"got {type(images).__name__}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise RewardInputError(f"{who}: images must have shape (N, H, W, 3) (RGB), got {images.shape}")
    if images.dtype != np.uint8:
        raise RewardInputError(f"{who}: images must be uint8 in [0, 255], got dtype {images.dtype}")
    if len(images) != len(prompts):
        raise RewardInputError(f"{who}: got {len(images)} images but {len(prompts)} prompts; "
                               "pass one prompt per image")
    return images, prompts


def check_scores(scores: Any, n: int, who: str) -> np.ndarray:
    """Scores as a float64 array (n,) of finite numbers, or a :class:`RewardServerError` saying what is wrong.

    Accepts a list or array of real numbers (bools are rejected: they are almost always a bug).
    """
    if isinstance(scores, np.ndarray):
        items = scores.tolist() if scores.ndim == 1 else None
    elif isinstance(scores, (list, tuple)):
        items = list(scores)
    else:
        items = None
    if items is None:
        raise RewardServerError(f"{who} answered garbage: scores must be a list of {n} numbers, "
                                f"got {_short(scores)}")
    if len(items) != n:
        raise RewardServerError(f"{who} answered garbage: {len(items)} scores for {n} images")
    for i, s in enumerate(items):
        if isinstance(s, bool) or not isinstance(s, (int, float)):
            raise RewardServerError(f"{who} answered garbage: scores[{i}] = {_short(s)} is not a number")
        if not math.isfinite(s):
            raise RewardServerError(f"{who} answered garbage: scores[{i}] = {s} is not finite (NaN/inf)")
    return np.asarray(items, dtype=np.float64).reshape(n)


def _short(x: Any, limit: int = 200) -> str:
    text = x if isinstance(x, str) else repr(x)
    return text if len(text) <= limit else text[:limit] + "..."


# ------------------------------------------------------------------------------------------------ in-process

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
        images, prompts = _check_batch(images, prompts, self.name)
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


# ------------------------------------------------------------------------------------------------ PNG codec

def encode_png(image: np.ndarray) -> str:
    """One uint8 (H, W, 3) image as a base64 (ASCII) PNG string."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_png(data: str) -> np.ndarray:
    """A base64 PNG string → uint8 (H, W, 3) array; ``ValueError`` for anything that is not a PNG."""
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise ValueError("not valid base64") from None
    try:
        with Image.open(io.BytesIO(raw), formats=["PNG"]) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Exception as e:  # PIL raises several types for corrupt/unsupported data
        raise ValueError(f"not a readable PNG ({type(e).__name__})") from None


# ------------------------------------------------------------------------------------------------ metadata

def takes_metadata(reward) -> bool:
    """Whether ``reward`` is called with the prompts' metadata: its ``__call__`` has a ``metadata`` parameter."""
    try:
        return "metadata" in inspect.signature(reward).parameters
    except (TypeError, ValueError):
        return False


def call_reward(reward, images, prompts: list[str], metadata: list[dict] | None = None):
    """``reward(images, prompts)``, with ``metadata=`` (one dict per prompt: what a prompt file says about it,
    e.g. GenEval's tag and object list) for a reward that takes it."""
    if metadata is not None and takes_metadata(reward):
        return reward(images, prompts, metadata=metadata)
    return reward(images, prompts)


def metadata_of(world, prompts: list[str]) -> list[dict] | None:
    """Each prompt's metadata from a world that keeps it (a prompt file), else None."""
    lookup = getattr(world, "metadata", None)
    return [lookup(p) for p in prompts] if callable(lookup) else None


# ------------------------------------------------------------------------------------------------ remote

def _remote_reward(url, timeout: float = 30.0, retries: int = 2, backoff: float = 0.5, batch_size: int = 0,
                   name: str = "remote", score_range=()) -> Reward:
    """``reward.name: remote``: :class:`dgpo.reward_client.RemoteReward` (imported when used)."""
    from dgpo.reward_client import RemoteReward
    return RemoteReward(url, timeout=timeout, retries=retries, backoff=backoff, batch_size=batch_size, name=name,
                        score_range=score_range)


def _ocr_reward(threads: int = 0) -> Reward:
    """``reward.name: ocr``: :class:`dgpo.ocr_reward.OCRReward` (PP-OCR; imported when used)."""
    from dgpo.ocr_reward import OCRReward
    return OCRReward(threads=threads)


def _clip_reward(kind: str):
    """``reward.name: clip_score | pickscore | aesthetic | hpsv2``: :class:`dgpo.clip_rewards.CLIPReward` on
    ``reward.model`` (imported when used)."""
    def factory(model: str = "") -> Reward:
        from dgpo.clip_rewards import CLIPReward
        return CLIPReward(kind, model)
    return factory


def _image_reward(model: str = "") -> Reward:
    """``reward.name: imagereward``: :class:`dgpo.image_reward.ImageReward` on ``reward.model``
    (``IMAGEREWARD_PT,BERT_TOKENIZER_DIR``; imported when used)."""
    from dgpo.image_reward import ImageReward
    return ImageReward(model)


def _geneval(partial: bool):
    """``reward.name: geneval | geneval_partial``: GenEval's rules (:mod:`dgpo.geneval`) with the detector named by
    ``reward.model`` (``shapes``, or GenEval's Mask2Former: ``CONFIG.py,CHECKPOINT.pth,CLIP_DIR``)."""
    def factory(model: str = "") -> Reward:
        from dgpo.geneval import make_geneval_reward
        return make_geneval_reward(model, partial)
    return factory


def _vlm_judge(url: str = "", model: str = "", timeout: float = 60.0, retries: int = 2) -> Reward:
    """``reward.name: vlm_judge``: :class:`dgpo.vlm_judge.VLMJudge` at ``reward.url`` (an OpenAI-compatible API
    base) judging with the served ``reward.model``."""
    from dgpo.vlm_judge import VLMJudge
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


def reward_of_run(reward_cfg, world) -> tuple[str, Reward]:
    """The reward a training run's ``reward:`` section names (:class:`dgpo.train_config.RewardConfig`): its
    ``name``, or the world's own when empty, built with the section's server settings for a served reward
    (:data:`SERVED_SETTINGS`) and its ``model`` for a reward that reads one."""
    name = reward_cfg.name or world.reward
    if "+" in name:  # several rewards (dgpo.reward_mix)
        from dgpo.reward_mix import RewardMix
        return name, RewardMix(name.split("+"), getattr(reward_cfg, "weights", []), getattr(reward_cfg, "combine", "sum"))
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
