"""What every method's update works on: one epoch's rollouts as a :class:`RolloutBatch`, and the group
bookkeeping the updates share (noise levels and noise shared within a group, whole-group micro-batches,
per-sample errors).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from einops import reduce

from dgpo.models.handle import PromptEmbeds
from dgpo.sampling import shift_sigmas


@dataclass
class RolloutBatch:
    """One epoch's rollouts: clean latents (N, C, h, w), prompts' embeddings, advantages and group ids (N,);
    ``extras`` holds what an objective's sampler recorded per sample (batch-first tensors, e.g. the SDE
    states and log-probabilities of Flow-GRPO)."""

    latents: torch.Tensor
    embeds: PromptEmbeds
    advantages: torch.Tensor
    group_ids: torch.Tensor
    extras: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.latents)

    def select(self, idx: torch.Tensor) -> "RolloutBatch":
        return RolloutBatch(self.latents[idx], self.embeds.index(idx), self.advantages[idx], self.group_ids[idx],
                            {k: v[idx.to(v.device)] for k, v in self.extras.items()})


def group_noise_levels(group_ids: torch.Tensor, t_min: float, shift: float, gen: torch.Generator) -> torch.Tensor:
    """σ per sample, shared within a group: σ = shift(u), u ~ U[t_min, 1] ("timestep clip")."""
    groups, inverse = torch.unique(group_ids, return_inverse=True)
    u = t_min + (1.0 - t_min) * torch.rand(len(groups), generator=gen)
    return shift_sigmas(u, shift)[inverse]


def group_shared_noise(group_ids: torch.Tensor, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """ε per sample, shared within a group: (N, *shape)."""
    groups, inverse = torch.unique(group_ids, return_inverse=True)
    return torch.randn((len(groups), *shape), generator=gen)[inverse]


def per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mean over all but the batch axis of (a − b)²: (N, ...) → (N,)."""
    return reduce((a - b) ** 2, "n ... -> n", "mean")


def micro_batches(group_ids: torch.Tensor, max_size: int) -> list[torch.Tensor]:
    """Index sets of whole groups, each up to ``max_size`` samples (a single larger group stays whole)."""
    batches, current, size = [], [], 0
    for g in torch.unique(group_ids):
        idx = torch.nonzero(group_ids == g).flatten()
        if current and size + len(idx) > max_size:
            batches.append(torch.cat(current))
            current, size = [], 0
        current.append(idx)
        size += len(idx)
    if current:
        batches.append(torch.cat(current))
    return batches


@dataclass
class ScoredGroups:
    """Rollouts scored and turned into group advantages: rewards, group ids and advantages, each (N,)."""

    rewards: torch.Tensor
    group_ids: torch.Tensor
    advantages: torch.Tensor


def checked_rewards(reward, images, prompts: list[str], name: str) -> torch.Tensor:
    """``reward(images, prompts)`` as a float tensor (N,); a reward that answers the wrong number of scores or
    a non-finite one is a UserError naming it (the run's last checkpoint stays intact)."""
    import numpy as np
    from dgpo.errors import UserError
    scores = np.asarray(reward(images, prompts), dtype=np.float64)
    if scores.shape != (len(prompts),) or not np.all(np.isfinite(scores)):
        raise UserError(f"reward {name!r} returned {scores.shape} values "
                        f"(finite: {bool(np.all(np.isfinite(scores)))}) for {len(prompts)} images")
    return torch.from_numpy(scores).float()


def score_groups(reward, images, prompts: list[str], group_size: int, advantage, name: str) -> ScoredGroups:
    """Rollout → reward → group advantages, for ``prompts`` made of consecutive groups of ``group_size``
    samples of one prompt each: A = (r − mean_g) / (std + eps) per :func:`dgpo.objectives.group_advantages`
    with the ``advantage`` settings (std per group / batch / none, eps, clip). Every recipe that learns from
    groups of its own samples — DGPO and its baselines, a stepwise surrogate reward — starts here."""
    from dgpo.objectives import group_advantages
    rewards = checked_rewards(reward, images, prompts, name)
    group_ids = torch.arange(len(prompts) // group_size).repeat_interleave(group_size)
    adv = group_advantages(rewards, group_ids, std=advantage.std, eps=advantage.eps, clip=advantage.clip or None)
    return ScoredGroups(rewards, group_ids, adv)
