"""DiffusionNFT (Zheng et al., arXiv 2509.16117) as an objective of the shared trainer.

Forward-process RL: the "old" policy θ_old (a soft-updated copy of the LoRA weights) draws ODE rollouts —
any solver, CFG-free by default (``configs/nft/shapes.yaml`` sets ``rollout.guidance_scale: 1``); no
trajectories, no likelihoods are kept, only the clean samples and their advantages. Each sample gets an
optimality probability r = 1/2 + 1/2·clip(A/adv_clip, −1, 1) and is noised with the forward process at a
random noise level; the loss (:func:`dgpo.methods.losses.nft_loss`) fits the implicit positive policy
v⁺ = (1 − β)·v_old + β·v_θ to positives and the implicit negative policy v⁻ = (1 + β)·v_old − β·v_θ to
negatives. After each epoch θ_old ← η·θ_old + (1 − η)·θ with η = min(old_decay, old_decay_ramp·epoch).
Adaptive weighting divides each sample's loss by its detached mean |x̂₀ − x₀| (x̂₀ = x_t − σ·v_θ).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dgpo.config import option
from dgpo.methods.batch import RolloutBatch, lockstep_chunks, micro_batches
from dgpo.runtime.ema import EMA
from dgpo.methods.objective import Objective
from dgpo.models.handle import flow_interpolate
from dgpo.methods.losses import nft_loss, nft_optimality
from dgpo.sampling.ode import shift_sigmas


@dataclass
class NFTConfig:
    """DiffusionNFT (arXiv 2509.16117): forward-process RL with implicit positive/negative policies."""
    beta: float = option(1.0, "β: strength of the implicit policies v± = v_old ± β(v_θ − v_old)", min=0.0)
    adv_clip: float = option(5.0, "r = 1/2 + 1/2·clip(A / adv_clip, −1, 1)", min=0.0)
    timesteps_per_sample: int = option(1, "noise levels per sample per epoch", min=1)
    t_min: float = option(0.0, "u ~ U[t_min, 1] before the schedule shift", min=0.0, max=1.0)
    old_decay: float = option(0.5, "max decay η of the soft update θ_old ← η·θ_old + (1 − η)·θ", min=0.0, max=1.0)
    old_decay_ramp: float = option(0.001, "η at epoch i = min(old_decay, ramp·i) (0 at the start: θ_old = θ)",
                                   min=0.0)
    adaptive_weight: bool = option(True, "divide each sample's loss by its (detached) mean |x̂₀ − x₀| error")


class NFT(Objective):
    name = "nft"
    label = "DiffusionNFT"
    config_section = NFTConfig

    def __init__(self, cfg, model, params, shift):
        super().__init__(cfg, model, params, shift)
        self.old = EMA(params, 0.0, warmup=False)

    def emas(self) -> dict[str, EMA]:
        return {"nft_old": self.old}

    def rollout_context(self):
        return self.old.swapped_in()

    def after_epoch(self, step: int) -> None:
        c = self.cfg.nft
        self.old.decay = min(c.old_decay, c.old_decay_ramp * step)
        self.old.update(step)

    def backward(self, batch: RolloutBatch, gen, backward) -> dict:
        c = self.cfg.nft
        n = len(batch)
        device = batch.latents.device
        r_all = nft_optimality(batch.advantages, c.adv_clip)
        stats = {"loss": 0.0, "r_pos_frac": (r_all > 0.5).float().mean().item(), "weight": 0.0}
        parts = micro_batches(batch.group_ids.cpu(), self.cfg.optim.micro_batch)
        for _ in range(c.timesteps_per_sample):
            u = c.t_min + (1.0 - c.t_min) * batch.rand(gen)
            sigma_all = shift_sigmas(u, self.shift).to(device)
            noise_all = batch.randn(tuple(batch.latents.shape[1:]), gen).to(device)
            for idx, kept in lockstep_chunks(parts, batch.processes):  # kept 0: a stand-in (sharded model)
                idx = idx.to(device)
                x0, sigma, noise = batch.latents[idx], sigma_all[idx], noise_all[idx]
                embeds = batch.embeds.index(idx)
                x_t = flow_interpolate(x0, noise, sigma)
                target = noise - x0
                with torch.no_grad(), self.old.swapped_in():
                    v_old = self.model.velocity(x_t, sigma, embeds)
                v_theta = self.model.velocity(x_t, sigma, embeds)
                weight = None
                if c.adaptive_weight:
                    with torch.no_grad():
                        x0_hat = x_t - sigma.view(-1, *([1] * (x0.ndim - 1))) * v_theta
                        weight = 1.0 / (x0_hat - x0).abs().flatten(1).mean(1).clamp_min(1e-5)
                loss = nft_loss(v_theta, v_old, target, r_all[idx], c.beta, weight)
                scale = len(idx) / n / c.timesteps_per_sample * kept
                backward(loss * scale * batch.share())  # this process's share of the global mean
                if not kept:
                    continue
                stats["loss"] += loss.item() * scale
                if weight is not None:
                    stats["weight"] += weight.sum().item() / n / c.timesteps_per_sample
        return stats
