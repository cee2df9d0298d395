"""Diffusion-DPO (Wallace et al., arXiv 2311.12908) as an objective of the shared trainer.

Pairs: in each group (one prompt, G rollouts) the sample with the highest advantage (= highest reward) is
the winner and the one with the lowest the loser; groups whose rewards are all equal give no pair. Online:
the pairs come from the policy's ODE rollouts each epoch. Offline: from the frozen base's rollouts (LoRA
adapters off), i.e. a stream of base-model pairs that never follows the policy — the paper's offline
setting with an unlimited preference set drawn from the base. Each pair shares a noise level and a noise;
the loss is :func:`dgpo.methods.losses.diffusion_dpo_loss` against the frozen base as π_ref.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dgpo.config import option
from dgpo.methods.batch import RolloutBatch, per_sample_mse
from dgpo.methods.objective import Objective
from dgpo.models.handle import PromptEmbeds, flow_interpolate
from dgpo.models.lora import adapters_disabled
from dgpo.methods.losses import diffusion_dpo_loss
from dgpo.sampling.ode import shift_sigmas


def best_worst_pairs(advantages: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (winners, losers), one pair per group whose advantages are not all equal: argmax / argmin."""
    wins, losses = [], []
    for g in torch.unique(group_ids):
        idx = torch.nonzero(group_ids == g).flatten()
        a = advantages[idx]
        if a.max() > a.min():
            wins.append(idx[a.argmax()])
            losses.append(idx[a.argmin()])
    empty = torch.zeros(0, dtype=torch.long)
    return (torch.stack(wins) if wins else empty), (torch.stack(losses) if losses else empty)


@dataclass
class DiffusionDPOConfig:
    """Diffusion-DPO (arXiv 2311.12908): pairs of the best and worst sample of each group."""
    beta: float = option(5000.0, "β of the DPO loss (the paper's default for SD1.5)", min=0.0)
    data: str = option("online", "online: pairs from the policy's rollouts; offline: pairs from the frozen base's",
                       choices=("online", "offline"))
    timesteps_per_sample: int = option(1, "noise levels per pair per epoch (shared by the pair)", min=1)
    t_min: float = option(0.0, "u ~ U[t_min, 1] before the schedule shift", min=0.0, max=1.0)


class DiffusionDPO(Objective):
    name = "diffusion_dpo"
    label = "Diffusion-DPO"
    config_section = DiffusionDPOConfig
    multi_process = False
    multi_process_note = "a pair joins the best and the worst sample of a group, which may sit on two processes"

    def rollout_context(self):
        return adapters_disabled(self.model.transformer) if self.cfg.diffusion_dpo.data == "offline" else None

    def backward(self, batch: RolloutBatch, gen, backward) -> dict:
        d = self.cfg.diffusion_dpo
        win, lose = best_worst_pairs(batch.advantages.cpu(), batch.group_ids.cpu())
        n = len(win)
        stats = {"loss": 0.0, "pairs": float(n), "accuracy": 0.0, "margin": 0.0}
        if n == 0:
            return stats
        device = batch.latents.device
        per_mb = max(1, self.cfg.optim.micro_batch // 2)
        for _ in range(d.timesteps_per_sample):
            u = d.t_min + (1.0 - d.t_min) * torch.rand(n, generator=gen)
            sigma_all = shift_sigmas(u, self.shift).to(device)
            noise_all = torch.randn((n, *batch.latents.shape[1:]), generator=gen).to(device)
            for start in range(0, n, per_mb):
                sl = slice(start, min(start + per_mb, n))
                w, l = win[sl].to(device), lose[sl].to(device)
                m = len(w)
                x0 = torch.cat([batch.latents[w], batch.latents[l]])
                sigma = sigma_all[sl].repeat(2)
                noise = noise_all[sl].repeat(2, *([1] * (x0.ndim - 1)))
                embeds = PromptEmbeds.cat([batch.embeds.index(w), batch.embeds.index(l)])
                x_sigma = flow_interpolate(x0, noise, sigma)
                target = noise - x0
                with torch.no_grad(), adapters_disabled(self.model.transformer):
                    loss_ref = per_sample_mse(target, self.model.velocity(x_sigma, sigma, embeds))
                loss_pol = per_sample_mse(target, self.model.velocity(x_sigma, sigma, embeds))
                loss = diffusion_dpo_loss(loss_pol[:m], loss_ref[:m], loss_pol[m:], loss_ref[m:], d.beta)
                scale = m / n / d.timesteps_per_sample
                backward(loss * scale)
                with torch.no_grad():
                    inside = (loss_pol[:m] - loss_ref[:m]) - (loss_pol[m:] - loss_ref[m:])
                    stats["loss"] += loss.item() * scale
                    stats["accuracy"] += (inside < 0).float().sum().item() / n / d.timesteps_per_sample
                    stats["margin"] += -inside.sum().item() / n / d.timesteps_per_sample
        return stats
