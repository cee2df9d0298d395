"""The registry of worlds: the :class:`World` protocol, ``register_world``, ``make_world`` and ``world_names``.

A world provides its prompts and their fixed split, a check that a prompt belongs to it, the reward RL
trains on by default, the score of a set of generated images — its task metric (overall, under the key
``geneval``, and per category) and a quality metric beside it (``fd``) — and, if it has one, its own
embedded base model; so the recipes and the evaluation never name a world. The embedded shapes
world (:mod:`dgpo.worlds.shapes_world`) is built in; ``register_world`` adds another, e.g. from a
``--plugin`` file, and ``world: NAME`` in a training config (or ``--world NAME``) selects it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class World(Protocol):
    name: str        # registry name
    metric: str      # display name of the task metric, e.g. "shapes-geneval"
    reward: str      # the registered reward a training run uses when reward.name is empty

    def prompts(self, split: str) -> list[str]:
        """The prompts of ``split`` ("train", "test" or "all"), in a fixed order."""

    def check_prompts(self, prompts: list[str]) -> None:
        """Raise a UserError naming the first prompt that is not of this world."""

    def score(self, images: np.ndarray, prompts: list[str], fd: bool = True) -> dict:
        """``{"geneval": task metric, "per_category": {...}, "partial": a dense score in [0, 1], "fd": quality
        (with ``fd``), "n_images", "n_prompts"}`` of uint8 images (N, S, S, 3) made for ``prompts``; optionally
        ``"sharpness"`` and ``"edge_width"`` beside the FD (relative to the world's references, 1.0 = as sharp:
        :mod:`dgpo.worlds.sharpness`) and ``"geneval_se"``, the task metric's standard error over fresh images
        (its seed noise), which runs use to say whether a gain is larger than the evaluation noise."""

    def embedded_base(self, base_config: str, log=print) -> Path:
        """The pipeline folder of this world's own base model, built from ``base_config`` if not cached (a
        world without one raises a UserError asking for ``model.base``)."""


_WORLDS: dict[str, Callable[[], World]] = {}


def register_world(name: str, factory: Callable[[], World]) -> None:
    """Make ``factory()`` the world called ``name`` (replacing an earlier registration of that name)."""
    _WORLDS[name] = factory


def world_names() -> list[str]:
    _load_builtin()
    return sorted(_WORLDS)


def make_world(name: str = "shapes") -> World:
    """The registered world ``name``, or the world of a JSON-lines prompt file when ``name`` is its path
    (``….jsonl``, :mod:`dgpo.worlds.prompt_file`); an unknown name is a UserError listing the registered ones."""
    from dgpo.errors import UserError
    from dgpo.worlds.prompt_file import PromptFileWorld, is_prompt_file
    if is_prompt_file(name):
        return PromptFileWorld(name)
    _load_builtin()
    if name not in _WORLDS:
        raise UserError(f"world {name!r} is not registered; choose one of {sorted(_WORLDS)}, a prompt file "
                        f"(PATH.jsonl), or register yours with dgpo.worlds.registry.register_world")
    return _WORLDS[name]()


def _shapes_world() -> World:
    from dgpo.worlds.shapes_world import ShapesWorld
    return ShapesWorld()


def _load_builtin() -> None:
    _WORLDS.setdefault("shapes", _shapes_world)
