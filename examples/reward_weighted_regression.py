"""A method plug-in with its own config section: reward-weighted regression (RWR) on group advantages.

Flow matching on each group's better-than-average samples, weighted by how much better they are:

    L = w · mean_i max(A_i, 0) · ‖(ε − x₀,i) − v_θ(x_σ,i, σ, c)‖²,   σ and ε shared by the group,

a supervised baseline between "train on the best samples" (RAFT) and the preference losses. Its keys live
in its own section, ``rwr:`` (``rwr.weight``, ``rwr.t_min``):

    dgpo train --plugin examples/reward_weighted_regression.py --set objective.name=rwr --set rwr.weight=0.5
"""

from __future__ import annotations

from dataclasses import dataclass

from dgpo.config import option
from dgpo.methods import Objective, register_objective
from dgpo.methods.batch import group_noise_levels, group_shared_noise, per_sample_mse
from dgpo.models.handle import flow_interpolate


@dataclass
class RWRConfig:
    weight: float = option(1.0, "w: scale of the loss", min=0.0)
    t_min: float = option(0.0, "u ~ U[t_min, 1] before the schedule shift", min=0.0, max=1.0)


@register_objective
class RewardWeightedRegression(Objective):
    name = "rwr"
    label = "RWR"
    config_section = RWRConfig

    def backward(self, batch, gen, backward) -> dict:
        c = self.cfg.rwr
        sigma = group_noise_levels(batch, c.t_min, self.shift, gen).to(batch.latents.device)
        noise = group_shared_noise(batch, tuple(batch.latents.shape[1:]), gen).to(batch.latents.device)
        v = self.model.velocity(flow_interpolate(batch.latents, noise, sigma), sigma, batch.embeds)
        per_sample = per_sample_mse(noise - batch.latents, v)
        loss = c.weight * (batch.advantages.clamp(min=0) * per_sample).mean()
        backward(loss * batch.share())  # on several processes: this process's share of the global mean
        return {"loss": loss.item(), "weighted_fraction": (batch.advantages > 0).float().mean().item()}
