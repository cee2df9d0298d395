"""Which train prompts an epoch rolls out: uniformly, or weighted towards the prompts that still fail.

Uniform sampling spreads the optimiser's few steps evenly over the train prompts, so a failure that only a
few prompts exercise (e.g. the square drawn alone, 4 of 93 shapes train prompts) gets a small share of the
signal. ``rollout.prompt_weighting=failure`` keeps, per train prompt p, an exponential moving average r̄_p
of its groups' mean training reward (updated each time p is rolled out) and draws the epoch's P prompts
without replacement with probability proportional to

    w_p = max(1 − r̄_p, floor) ** power,

where a prompt not rolled out yet counts as r̄_p = 0 (weight 1: every prompt is visited early). ``floor``
keeps solved prompts in the mix (no forgetting), ``power`` sets how sharply the sampler prefers failures.
The state (r̄ and the visited mask) is part of the checkpoint, so a resumed run draws the same prompts.
"""

from __future__ import annotations

import torch

from dgpo.errors import UserError


class PromptSampler:
    """Draws P distinct train prompts per epoch (with repeats only when P exceeds the number of prompts)."""

    def __init__(self, prompts: list[str], per_epoch: int, weighting: str = "uniform", power: float = 2.0,
                 floor: float = 0.05, decay: float = 0.5):
        if weighting not in ("uniform", "failure"):
            raise UserError(f"rollout.prompt_weighting: {weighting!r} is not one of 'uniform', 'failure'")
        self.prompts, self.per_epoch, self.weighting = list(prompts), per_epoch, weighting
        self.power, self.floor, self.decay = power, floor, decay
        self.index = {p: i for i, p in enumerate(self.prompts)}
        self.mean_reward = torch.zeros(len(self.prompts), dtype=torch.float64)
        self.visited = torch.zeros(len(self.prompts), dtype=torch.bool)

    def weights(self) -> torch.Tensor:
        """w_p = max(1 − r̄_p, floor) ** power (uniform: all ones)."""
        if self.weighting == "uniform":
            return torch.ones(len(self.prompts), dtype=torch.float64)
        return (1.0 - self.mean_reward).clamp(min=self.floor) ** self.power

    def sample(self, gen: torch.Generator) -> list[str]:
        n, k = len(self.prompts), self.per_epoch
        if self.weighting == "uniform":  # the original draw, kept bit-identical for reproducibility
            idx = torch.randperm(n, generator=gen)[:k]
            if len(idx) < k:  # more prompts per epoch than train prompts: repeat
                idx = torch.randint(n, (k,), generator=gen)
        else:
            idx = torch.multinomial(self.weights(), k, replacement=k > n, generator=gen)
        return [self.prompts[i] for i in idx.tolist()]

    def observe(self, prompts: list[str], group_mean_rewards: torch.Tensor) -> None:
        """Fold each rolled-out prompt's group mean reward into its r̄ (EMA; the first visit sets it)."""
        for p, r in zip(prompts, group_mean_rewards.tolist()):
            i = self.index[p]
            self.mean_reward[i] = r if not self.visited[i] else self.decay * self.mean_reward[i] + (1 - self.decay) * r
            self.visited[i] = True

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"prompts.mean_reward": self.mean_reward.clone(), "prompts.visited": self.visited.clone()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if "prompts.mean_reward" in tensors:  # checkpoints written before this sampler existed have none
            self.mean_reward.copy_(tensors["prompts.mean_reward"])
            self.visited.copy_(tensors["prompts.visited"])
