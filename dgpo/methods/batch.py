"""What every method's update works on: one epoch's rollouts as a :class:`RolloutBatch`, and the group
bookkeeping the updates share (noise levels and noise shared within a group, whole-group micro-batches,
per-sample errors).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from einops import reduce

from dgpo.models.handle import PromptEmbeds
from dgpo.runtime.nonfinite import NonFiniteRewards
from dgpo.runtime.processes import SINGLE, Processes
from dgpo.sampling.ode import shift_sigmas


@dataclass
class RolloutBatch:
    """One epoch's rollouts: clean latents (N, C, h, w), prompts' embeddings, advantages and group ids (N,);
    ``extras`` holds what an objective's sampler recorded per sample (batch-first tensors, e.g. the SDE
    states and log-probabilities of Flow-GRPO).

    On several processes (:mod:`dgpo.runtime.processes`) a batch holds this process's share of a global batch:
    ``rows`` are its rows' places in the epoch's global batch, ``epoch_group_ids`` the group of every global
    row, ``total`` the size of the global batch it is a share of (a part of the epoch's batch for a method
    that splits it). One process: all three default to the whole batch. Methods draw per-sample random
    numbers with :meth:`rand` / :meth:`randn` and per-group ones with :func:`group_noise_levels` /
    :func:`group_shared_noise` (drawn for the epoch's global batch, so every process draws alike), and scale
    a mean over their rows by :meth:`share`.
    """

    latents: torch.Tensor
    embeds: PromptEmbeds
    advantages: torch.Tensor
    group_ids: torch.Tensor
    extras: dict = field(default_factory=dict)
    rows: torch.Tensor | None = None
    epoch_group_ids: torch.Tensor | None = None
    total: int | None = None
    processes: Processes = SINGLE
    stand_in: bool = False  # a row that only keeps this process in a sharded model's calls: its loss counts 0

    def __len__(self) -> int:
        return len(self.latents)

    @property
    def global_rows(self) -> torch.Tensor:
        return self.rows if self.rows is not None else torch.arange(len(self))

    @property
    def all_group_ids(self) -> torch.Tensor:
        """The group id of every row of the epoch's global batch."""
        return self.epoch_group_ids if self.epoch_group_ids is not None else self.group_ids.cpu()

    @property
    def global_size(self) -> int:
        return self.total if self.total is not None else len(self)

    def share(self) -> float:
        """This process's share of the global batch: a mean over its rows times this is its part of the
        global mean (gradients are then summed over processes); 0 for a stand-in."""
        return 0.0 if self.stand_in else len(self) / self.global_size

    def rand(self, gen: torch.Generator) -> torch.Tensor:
        """U[0, 1) per row, drawn for the epoch's global batch: (n,)."""
        return torch.rand(len(self.all_group_ids), generator=gen)[self.global_rows]

    def randn(self, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
        """N(0, I) of ``shape`` per row, drawn for the epoch's global batch: (n, *shape)."""
        return torch.randn((len(self.all_group_ids), *shape), generator=gen)[self.global_rows]

    def select(self, idx: torch.Tensor, total: int | None = None, stand_in: bool = False) -> "RolloutBatch":
        """The rows ``idx`` (local positions); ``total`` is the global size of the part they are a share of
        (default: the same as this batch's); ``stand_in``: rows whose loss counts zero (:meth:`share`)."""
        cpu_idx = idx.cpu()
        return RolloutBatch(self.latents[idx], self.embeds.index(idx), self.advantages[idx], self.group_ids[idx],
                            {k: v[idx.to(v.device)] for k, v in self.extras.items()}, self.global_rows[cpu_idx],
                            self.all_group_ids, total if total is not None else self.total, self.processes, stand_in)


def _group_of_rows(batch: RolloutBatch) -> tuple[int, torch.Tensor]:
    """The number of groups of the epoch's global batch and each row's group among them."""
    groups, inverse = torch.unique(batch.all_group_ids, return_inverse=True)
    return len(groups), inverse[batch.global_rows]


def group_noise_levels(batch: RolloutBatch, t_min: float, shift: float, gen: torch.Generator) -> torch.Tensor:
    """σ per row, shared within a group: σ = shift(u), u ~ U[t_min, 1] ("timestep clip")."""
    n_groups, group = _group_of_rows(batch)
    u = t_min + (1.0 - t_min) * torch.rand(n_groups, generator=gen)
    return shift_sigmas(u, shift)[group]


def group_shared_noise(batch: RolloutBatch, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """ε per row, shared within a group: (n, *shape)."""
    n_groups, group = _group_of_rows(batch)
    return torch.randn((n_groups, *shape), generator=gen)[group]


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


def local_micro_batches(batch: RolloutBatch, max_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Micro-batches of whole groups of the *global* batch (each up to ``max_size`` rows per process): per
    part, this process's local positions in it and the part's group ids (sorted, the same on every process).
    Every process gets the same parts (a part may hold none of its rows), so a collective inside the loop
    over parts (DGPO's group sums) stays in step."""
    all_ids = batch.all_group_ids
    parts = micro_batches(all_ids, max_size * batch.processes.world)
    position = {int(r): i for i, r in enumerate(batch.global_rows.tolist())}
    return [(torch.tensor([position[r] for r in part.tolist() if r in position], dtype=torch.long),
             torch.unique(all_ids[part])) for part in parts]


def random_parts(batch: RolloutBatch, k: int, gen: torch.Generator) -> list[RolloutBatch]:
    """A random split of the global batch into ``k`` parts (one optimiser step each); each process keeps its
    rows of each part, which knows its global size (the size its loss is a share of). Under a sharded model a
    process with no row in a part gets its first row as a stand-in (its loss counts zero), so that it still
    makes the part's model calls."""
    perm = torch.randperm(batch.global_size, generator=gen)
    position = {r: i for i, r in enumerate(batch.global_rows.tolist())}
    parts = []
    for chunk in perm.chunk(min(k, batch.global_size)):
        local = torch.tensor([position[r] for r in chunk.tolist() if r in position], dtype=torch.long)
        stand_in = len(local) == 0 and batch.processes.lockstep
        if stand_in:
            local = torch.zeros(1, dtype=torch.long)
        parts.append(batch.select(local.to(batch.latents.device), total=len(chunk), stand_in=stand_in))
    return parts


def lockstep_chunks(parts: list[torch.Tensor], processes: Processes, stand_in: bool = False):
    """Yield ``(local positions, weight)`` for each of this process's micro-batches ``parts`` (weight 1). Under a
    sharded model (``processes.lockstep``) every process makes as many micro-batches as the busiest one: the extra
    ones are row 0 again with weight 0, so every process calls each sharded block the same number of times. While
    a stand-in's calls run (the extra ones, or all of a ``stand_in`` part's) ``processes.standing_in`` is set:
    they are not counted as the method's transformer evaluations."""
    count = processes.calls(len(parts))
    try:
        for i in range(count):
            real = i < len(parts)
            processes.standing_in = stand_in or not real
            yield (parts[i], 1.0) if real else (torch.zeros(1, dtype=torch.long), 0.0)
    finally:
        processes.standing_in = False


@dataclass
class ScoredGroups:
    """Rollouts scored and turned into group advantages: rewards, group ids and advantages, each (N,)."""

    rewards: torch.Tensor
    group_ids: torch.Tensor
    advantages: torch.Tensor


def checked_rewards(reward, images, prompts: list[str], name: str, columns: bool = False,
                    metadata: list[dict] | None = None) -> torch.Tensor:
    """``reward(images, prompts)`` as a float tensor (N,) — with ``columns``, ``reward.columns(images, prompts)``
    (N, K) of a :class:`dgpo.rewards.mix.RewardMix`; a reward that answers the wrong number of scores is a
    UserError naming it (the run's last checkpoint stays intact). Non-finite scores pass through:
    :func:`finite_rewards` judges them once every process's rows are gathered."""
    import numpy as np
    from dgpo.errors import UserError
    from dgpo.rewards import call_reward
    scores = np.asarray(call_reward(reward.columns if columns else reward, images, prompts, metadata),
                        dtype=np.float64)
    if scores.shape[:1] != (len(prompts),) or scores.ndim != (2 if columns else 1):
        raise UserError(f"reward {name!r} returned {scores.shape} values for {len(prompts)} images")
    return torch.from_numpy(scores).float()


def finite_rewards(rewards: torch.Tensor, name: str) -> torch.Tensor:
    """``rewards`` if every one is finite; else :class:`NonFiniteRewards` saying how many are not."""
    bad = int((~torch.isfinite(rewards)).sum())
    if bad:
        raise NonFiniteRewards(f"reward {name!r} answered {bad} non-finite (NaN/inf) scores of {rewards.numel()}")
    return rewards


def score_groups(reward, images, prompts: list[str], group_size: int, advantage, name: str,
                 processes: Processes = SINGLE, metadata: list[dict] | None = None) -> ScoredGroups:
    """Rollout → reward → group advantages, for a global batch made of consecutive groups of ``group_size``
    samples of one prompt each: A = (r − mean_g) / (std + eps) per :func:`dgpo.methods.losses.group_advantages`
    with the ``advantage`` settings (std per group / batch / none, eps, clip). ``images`` and ``prompts`` are
    this process's rows (:mod:`dgpo.runtime.processes`); the rewards of every process are gathered first, so the
    returned rewards, group ids and advantages are the global batch's, the same on every process. Every recipe
    that learns from groups of its own samples — DGPO and its baselines, a stepwise surrogate reward — starts
    here. A non-finite reward raises :class:`NonFiniteRewards` on every process. ``metadata``: one dict per
    prompt, for a reward that takes it (:func:`dgpo.rewards.call_reward`)."""
    from dgpo.methods.losses import group_advantages

    def advantages_of(r: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
        return group_advantages(r, group_ids, std=advantage.std, eps=advantage.eps, clip=advantage.clip or None)

    if getattr(reward, "combine", "sum") == "advantages":  # several rewards: A = Σ_k w_k·A_k (dgpo.rewards.mix)
        columns = finite_rewards(processes.gather_rows(checked_rewards(reward, images, prompts, name, columns=True,
                                                                       metadata=metadata)), name)
        group_ids = torch.arange(len(columns) // group_size).repeat_interleave(group_size)
        weights = torch.tensor(reward.weights)
        adv = sum(w * advantages_of(columns[:, k], group_ids) for k, w in enumerate(weights.tolist()))
        return ScoredGroups(columns @ weights, group_ids, adv)
    rewards = finite_rewards(processes.gather_rows(checked_rewards(reward, images, prompts, name, metadata=metadata)),
                             name)
    group_ids = torch.arange(len(rewards) // group_size).repeat_interleave(group_size)
    return ScoredGroups(rewards, group_ids, advantages_of(rewards, group_ids))
