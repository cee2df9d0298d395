"""What every reward is: the protocol, its input and output checks, its errors, and the PNG codec of served
rewards.

A reward maps a batch of generated images and their prompts to one float per image::

    scores = reward(images, prompts)        # images: uint8 (N, H, W, 3); prompts: N strings → float64 (N,)

A reward that takes ``metadata=`` (one dict per prompt, from a prompt file) is given it (:func:`call_reward`).
"""

from __future__ import annotations

import base64
import binascii
import inspect
import io
import math
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np
from PIL import Image

from dgpo.errors import UserError


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

def check_batch(images, prompts, who: str) -> tuple[np.ndarray, list[str]]:
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
                                f"got {shortened(scores)}")
    if len(items) != n:
        raise RewardServerError(f"{who} answered garbage: {len(items)} scores for {n} images")
    for i, s in enumerate(items):
        if isinstance(s, bool) or not isinstance(s, (int, float)):
            raise RewardServerError(f"{who} answered garbage: scores[{i}] = {shortened(s)} is not a number")
        if not math.isfinite(s):
            raise RewardServerError(f"{who} answered garbage: scores[{i}] = {s} is not finite (NaN/inf)")
    return np.asarray(items, dtype=np.float64).reshape(n)


def shortened(x: Any, limit: int = 200) -> str:
    text = x if isinstance(x, str) else repr(x)
    return text if len(text) <= limit else text[:limit] + "..."


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
