"""Flow-GRPO's ODE-to-SDE sampler with per-step Gaussian log-probabilities (arXiv 2505.05470, §4.2).

The rectified-flow ODE dx = v_θ dσ (σ from 1 to 0) has the same marginals as the reverse-time SDE

    dx = [v_θ(x, σ) + s_σ²/(2σ)·(x + (1 − σ)·v_θ(x, σ))] dσ + s_σ dw,      s_σ = a·sqrt(σ / (1 − σ)),

(x + (1 − σ)·v is the model's noise estimate ε̂, so the extra drift is −(s²/2)·∇log p with the score
−ε̂/σ). Euler–Maruyama with dσ = σ_{i+1} − σ_i < 0 gives one Gaussian transition per step,

    x_{i+1} ~ N(μ_i, (s_i·sqrt(|dσ|))² I),   μ_i = x_i + [v + s_i²/(2σ_i)·(x_i + (1 − σ_i)·v]·dσ,

whose log-density is the per-step policy likelihood of Flow-GRPO. ``a`` is the noise level; a = 0 is the
Euler ODE step. At σ_0 = 1, s is infinite; we evaluate its denominator at the next level (1 − σ_1), which
keeps the first step finite. Log-probabilities are *means* over latent elements (so ratios and their clip
range are per element, the convention of the released configs' clip ranges ~1e-4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dgpo.models.handle import FlowModel, PromptEmbeds
from dgpo.sampling.ode import scheduled

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _b(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-sample (B,) tensor over the trailing axes of ``like``."""
    return x.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def sde_std(sigma: torch.Tensor, sigma_next: torch.Tensor, sigma_1: float, noise_level: float) -> torch.Tensor:
    """Per-step standard deviation s_σ·sqrt(|dσ|) with s_σ = a·sqrt(σ / (1 − σ)) (σ = 1 uses 1 − σ_1)."""
    denom = torch.where(sigma >= 1.0, torch.full_like(sigma, 1.0 - sigma_1), 1.0 - sigma)
    s = noise_level * torch.sqrt(sigma / denom)
    return s * torch.sqrt((sigma - sigma_next).abs())


def sde_mean(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, sigma_1: float,
             noise_level: float) -> torch.Tensor:
    """μ = x + [v + s²/(2σ)·(x + (1 − σ)·v)]·dσ with per-sample σ, σ_next (B,)."""
    denom = torch.where(sigma >= 1.0, torch.full_like(sigma, 1.0 - sigma_1), 1.0 - sigma)
    s2 = noise_level ** 2 * sigma / denom
    dt = _b(sigma_next - sigma, x)
    drift = v + _b(s2 / (2 * sigma), x) * (x + _b(1 - sigma, x) * v) if noise_level > 0 else v
    return x + drift * dt


def gaussian_log_prob(x_next: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x_next; μ, std² I) averaged over elements: (B, ...) → (B,)."""
    std_b = _b(std, mean)
    lp = -((x_next.detach() - mean) ** 2) / (2 * std_b ** 2) - torch.log(std_b) - LOG_SQRT_2PI
    return lp.flatten(1).mean(1)


def gaussian_kl(mean: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, s²I) ‖ N(μ_ref, s²I)) averaged over elements = mean‖μ − μ_ref‖² / (2s²): (B,)."""
    return (((mean - mean_ref) ** 2) / (2 * _b(std, mean) ** 2)).flatten(1).mean(1)


@dataclass
class SDETrajectory:
    """An SDE rollout: ``states`` (B, T+1, C, h, w) (x_0 = noise … x_T = sample), ``log_probs`` (B, T) of
    each transition under the sampling policy, the scheduler's ``timesteps`` (T,) and ``sigmas`` (T+1,)."""

    states: torch.Tensor
    log_probs: torch.Tensor
    timesteps: torch.Tensor
    sigmas: torch.Tensor

    @property
    def final(self) -> torch.Tensor:
        return self.states[:, -1]


@torch.no_grad()
def sample_sde(model: FlowModel, embeds: PromptEmbeds, noise: torch.Tensor, steps: int, guidance_scale: float,
               noise_level: float, gen: torch.Generator, rows: torch.Tensor | None = None,
               total: int | None = None, sigmas: list[float] | None = None) -> SDETrajectory:
    """Sample with the SDE above on the Euler scheduler's schedule (the same σ's and transformer timesteps as
    :func:`dgpo.sampling.ode.sample_ode` with ``solver="euler"``); ``gen`` (CPU) draws the step noises — for a
    global batch of ``total`` samples of which these are ``rows`` when given (:mod:`dgpo.runtime.processes`).
    With ``noise_level = 0`` the result is the ODE sample and the log-probabilities are 0 (undefined).
    ``sigmas``: the levels to visit as :func:`~dgpo.sampling.ode.sample_ode` takes them (a few-step student's,
    before the scheduler's shift); ``steps`` is then ignored."""
    if noise_level < 0:
        raise ValueError(f"noise_level must be >= 0, got {noise_level}")
    scheduler = scheduled(model, "euler", steps, sigmas, noise.device)
    sigmas = scheduler.sigmas.float().to(noise.device)
    sigma_1 = float(sigmas[1]) if len(sigmas) > 2 else 0.0
    x = noise.float()  # the state in fp32 whatever the weights' dtype (the handle casts at the transformer)
    states, log_probs = [x], []
    n = x.shape[0]
    for i, t in enumerate(scheduler.timesteps):
        v = model.guided_velocity_at_timestep(x, t, embeds, guidance_scale)
        sigma, sigma_next = sigmas[i].expand(n), sigmas[i + 1].expand(n)
        mean = sde_mean(x, v, sigma, sigma_next, sigma_1, noise_level)
        if noise_level > 0:
            std = sde_std(sigma, sigma_next, sigma_1, noise_level)
            if rows is None:
                eps = torch.randn(x.shape, generator=gen)
            else:
                eps = torch.randn((total, *x.shape[1:]), generator=gen)[rows]
            eps = eps.to(x.device, x.dtype)
            x = mean + _b(std, mean) * eps
            log_probs.append(gaussian_log_prob(x, mean, std))
        else:
            x = mean
            log_probs.append(torch.zeros(n, device=x.device))
        states.append(x)
    return SDETrajectory(torch.stack(states, 1), torch.stack(log_probs, 1), scheduler.timesteps.float().cpu(),
                         sigmas.cpu())
