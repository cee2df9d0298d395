"""Training objectives that plug into the one online loop of :mod:`dgpo.trainer`.

The trainer owns everything the methods share — prompts, rollout noise, rewards, group advantages, the
optimiser step, gradient clipping, EMAs of the policy, evaluation, checkpoints and the run folder — and asks
the objective (``objective.name`` in the config) only for what differs between methods:

* ``rollout(embeds, noise, gen, rows, total)`` — how samples are drawn (ODE, or SDE with per-step
  log-probabilities), returning clean latents and per-sample extras the update needs; ``rows`` of a global
  batch of ``total`` are this process's (random numbers are drawn for the global batch, see
  :mod:`dgpo.processes`); ``rollout_context()`` — whose weights sample (``None``: the trainer's policy /
  policy-EMA choice);
* ``minibatches(batch, gen)`` — how one epoch's batch is split into optimiser steps;
* ``backward(batch, gen, backward)`` — accumulate the gradient of its loss on a :class:`RolloutBatch` and
  return diagnostics (``loss`` first). On several processes the batch is this process's share: draw random
  numbers with the batch's ``rand``/``randn`` and scale a mean over its rows by ``batch.share()``; the trainer
  sums the gradients over processes. A method that cannot (its loss joins rows that may sit on two
  processes) sets ``multi_process = False``;
* ``emas()`` — extra parameter EMAs it keeps (checkpointed under these names), ``after_epoch(step)`` —
  their update;
* ``validate(cfg)`` — cross-key checks, raising :class:`ConfigError` that names the key;
* ``config_section`` — a dataclass of the method's own keys (typed :func:`dgpo.config.option` fields): it
  becomes the section ``<name>:`` of the training config (:func:`dgpo.train_config.train_config_class`).

NFE are counted by the trainer from the transformer calls themselves (every method alike).

Register a new method with :func:`register_objective`.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Callable

import torch

from dgpo.config import ConfigError
from dgpo.methods.batch import RolloutBatch
from dgpo.ema import EMA
from dgpo.models.handle import FlowModel, PromptEmbeds
from dgpo.sampling import sample_ode


class Objective:
    """Base class: ODE rollouts with the rollout config, one optimiser step per epoch on the whole batch."""

    name = "base"
    label = "base"
    config_section: type | None = None  # a dataclass of the method's own keys, loaded as the section ``name:``
    multi_process = True  # False: the trainer refuses to run it on several processes, saying why
    multi_process_note = ""

    def __init__(self, cfg, model: FlowModel, params: list[torch.nn.Parameter], shift: float):
        self.cfg, self.model, self.params, self.shift = cfg, model, params, shift

    @staticmethod
    def validate(cfg) -> None:
        """Raise ConfigError for settings this objective cannot use."""

    def emas(self) -> dict[str, EMA]:
        return {}

    def rollout_context(self) -> AbstractContextManager | None:
        return None

    @torch.no_grad()
    def rollout(self, embeds: PromptEmbeds, noise: torch.Tensor, gen: torch.Generator,
                rows: torch.Tensor | None = None, total: int | None = None) -> tuple[torch.Tensor, dict]:
        r = self.cfg.rollout
        return sample_ode(self.model, embeds, noise, r.steps, r.guidance_scale, r.solver, sigmas=r.sigmas), {}

    def minibatches(self, batch: RolloutBatch, gen: torch.Generator) -> list[RolloutBatch]:
        return [batch]

    def backward(self, batch: RolloutBatch, gen: torch.Generator, backward: Callable) -> dict:
        raise NotImplementedError

    def after_epoch(self, step: int) -> None:
        for ema in self.emas().values():
            ema.update(step)


_REGISTRY: dict[str, type[Objective]] = {}


def register_objective(cls: type[Objective]) -> type[Objective]:
    """Add a method (usable as ``objective.name``; its ``config_section``, if any, becomes the config section
    ``<name>:`` of every training run)."""
    from dgpo.train_config import TrainConfig
    import dataclasses
    if cls.config_section is not None and cls.name in {f.name for f in dataclasses.fields(TrainConfig)}:
        raise ValueError(f"method {cls.name!r}: its config section would replace the shared section {cls.name!r}")
    _REGISTRY[cls.name] = cls
    return cls


def method_sections() -> dict[str, tuple[type, str]]:
    """Every registered method's own config section: ``{name: (dataclass, label)}``, sorted by name."""
    _load_builtin()
    return {name: (cls.config_section, cls.label) for name, cls in sorted(_REGISTRY.items())
            if cls.config_section is not None}


def objective_class(name: str) -> type[Objective]:
    _load_builtin()
    if name not in _REGISTRY:
        raise ConfigError(f"objective.name: {name!r} is not a registered objective; choose one of {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def make_objective(cfg, model: FlowModel, params: list[torch.nn.Parameter], shift: float) -> Objective:
    cls = objective_class(cfg.objective.name)
    cls.validate(cfg)
    return cls(cfg, model, params, shift)


def objective_names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def _load_builtin() -> None:
    from dgpo.methods import diffusion_dpo, dgpo, flow_grpo, nft  # noqa: F401  (registration side effect)
