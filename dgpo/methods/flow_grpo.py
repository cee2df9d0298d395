"""Flow-GRPO (Liu et al., arXiv 2505.05470) as an objective of the shared trainer.

Rollouts: the ODE-to-SDE sampler of :mod:`dgpo.sampling.sde` (noise level a, ``rollout.steps`` Euler–Maruyama steps
with the rollout CFG), recording every state x_i and the log-probability of each transition under the
sampling policy. Advantages: the trainer's group advantages (per prompt; ``advantage.std=batch`` is the
released GenEval config's global std). Update, for each of ``updates_per_epoch`` disjoint parts of the batch:
for each sample, a random subset of ⌊T·timestep_fraction⌋ of its T steps; per step the policy's log-prob of
the recorded transition, the clipped-ratio loss and the Gaussian KL to the base
(:func:`dgpo.methods.losses.flow_grpo_loss`), gradients accumulated over steps and samples into one optimiser
step. The first part is on-policy (ratio 1); later parts see the policy moved by the earlier steps, which is
where the clip acts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dgpo.config import ConfigError, option
from dgpo.methods.batch import RolloutBatch, lockstep_chunks, random_parts
from dgpo.methods.objective import Objective
from dgpo.models.lora import adapters_disabled
from dgpo.methods.losses import flow_grpo_loss
from dgpo.sampling.sde import gaussian_kl, gaussian_log_prob, sample_sde, sde_mean, sde_std


@dataclass
class FlowGRPOConfig:
    """Flow-GRPO (arXiv 2505.05470); defaults from the paper and its released GenEval config for SD3.5-M."""
    noise_level: float = option(0.7, "a: SDE noise level, s_t = a·sqrt(t / (1 − t)); must be > 0", min=0.0)
    clip_range: float = option(1e-4, "ε of the clipped per-step likelihood ratio (ratios of per-element log-probs)",
                               min=0.0)
    kl_weight: float = option(0.04, "β_KL: weight of the per-step Gaussian KL to the reference", min=0.0)
    timestep_fraction: float = option(0.99, "fraction of each trajectory's steps trained on (random per sample)",
                                      min=0.0, max=1.0)
    updates_per_epoch: int = option(2, "optimiser steps per rollout batch, each on a disjoint part of it "
                                    "(the 2nd onward are off-policy, where the clip acts)", min=1)
    reference: str = option("base", "π_ref of the KL: the frozen base (adapters off)", choices=("base",))


class FlowGRPO(Objective):
    name = "flow_grpo"
    label = "Flow-GRPO"
    config_section = FlowGRPOConfig

    @staticmethod
    def validate(cfg) -> None:
        if cfg.flow_grpo.noise_level <= 0:
            raise ConfigError("flow_grpo.noise_level: must be > 0 (a = 0 is the deterministic ODE, which has no "
                              "likelihood ratio); the paper uses 0.7")
        if cfg.rollout.solver != "euler":
            raise ConfigError("rollout.solver: flow_grpo samples with the SDE on the Euler schedule; set "
                              "rollout.solver=euler")
        if cfg.rollout.policy != "current":
            raise ConfigError("rollout.policy: flow_grpo's ratios need rollouts from the current weights; set "
                              "rollout.policy=current")

    @torch.no_grad()
    def rollout(self, embeds, noise, gen, rows=None, total=None):
        r, f = self.cfg.rollout, self.cfg.flow_grpo
        traj = sample_sde(self.model, embeds, noise, r.steps, r.guidance_scale, f.noise_level, gen, rows, total,
                          sigmas=r.sigmas)
        self.timesteps, self.sigmas = traj.timesteps, traj.sigmas
        return traj.final, {"states": traj.states, "log_probs": traj.log_probs}

    def minibatches(self, batch: RolloutBatch, gen: torch.Generator) -> list[RolloutBatch]:
        return random_parts(batch, self.cfg.flow_grpo.updates_per_epoch, gen)

    def step_log_probs(self, x, x_next, step, embeds, grad: bool = True):
        """Mean (B, C, h, w), std (B,) and log-prob (B,) of the transitions x → x_next at step indices (B,)."""
        f, r = self.cfg.flow_grpo, self.cfg.rollout
        sigmas = self.sigmas.to(x.device)
        sigma, sigma_next = sigmas[step], sigmas[step + 1]
        sigma_1 = float(sigmas[1]) if len(sigmas) > 2 else 0.0
        with torch.set_grad_enabled(grad):
            v = self.model.guided_velocity_at_timestep(x, self.timesteps.to(x.device)[step], embeds, r.guidance_scale)
            mean = sde_mean(x, v, sigma, sigma_next, sigma_1, f.noise_level)
        std = sde_std(sigma, sigma_next, sigma_1, f.noise_level)
        return mean, std, gaussian_log_prob(x_next, mean, std)

    def backward(self, batch: RolloutBatch, gen, backward) -> dict:
        f = self.cfg.flow_grpo
        n = len(batch)
        states, old_lp = batch.extras["states"], batch.extras["log_probs"]
        t_total = old_lp.shape[1]
        k = max(1, int(t_total * f.timestep_fraction))
        # k of the T steps per row, drawn for every row of the epoch's global batch (the same on every process)
        order = torch.stack([torch.randperm(t_total, generator=gen)
                             for _ in range(len(batch.all_group_ids))])[batch.global_rows, :k]  # (n, k)
        stats = {"loss": 0.0, "policy_loss": 0.0, "kl": 0.0, "ratio": 0.0, "ratio_dev": 0.0, "clip_frac": 0.0,
                 "approx_kl_old": 0.0}
        mb_size = self.cfg.optim.micro_batch
        parts = [torch.arange(start, min(start + mb_size, n)) for start in range(0, n, mb_size)]
        for idx, kept in lockstep_chunks(parts, batch.processes, batch.stand_in):  # kept 0: a stand-in
            dev_idx = idx.to(states.device)
            embeds = batch.embeds.index(dev_idx)
            for j in range(k):
                step = order[idx, j].to(states.device)
                x, x_next = states[dev_idx, step], states[dev_idx, step + 1]
                mean, std, lp = self.step_log_probs(x, x_next, step, embeds)
                kl = None
                if f.kl_weight > 0:
                    with torch.no_grad(), adapters_disabled(self.model.transformer):
                        mean_ref, _, _ = self.step_log_probs(x, x_next, step, embeds, grad=False)
                    kl = gaussian_kl(mean, mean_ref, std)
                loss, s = flow_grpo_loss(lp, old_lp[dev_idx, step], batch.advantages[dev_idx], f.clip_range, kl,
                                         f.kl_weight)
                w = len(idx) / n / k * kept
                backward(loss * w * batch.share())  # this process's share of the part's mean
                if not kept or batch.stand_in:
                    continue
                s.update(loss=loss.item(), kl=kl.mean().item() if kl is not None else 0.0)
                s["policy_loss"] = s["loss"] - f.kl_weight * s["kl"]
                for key in stats:
                    stats[key] = max(stats[key], s[key]) if key == "ratio_dev" else stats[key] + s[key] * w
        return stats
