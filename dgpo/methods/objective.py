"""The base class of a training method: what a method supplies to the DGPO recipe's epoch (see
:mod:`dgpo.methods`)."""


from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Callable

import torch

from dgpo.methods.batch import RolloutBatch
from dgpo.runtime.ema import EMA
from dgpo.models.handle import FlowModel, PromptEmbeds
from dgpo.sampling.ode import sample_ode


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
