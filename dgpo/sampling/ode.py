"""Deterministic ODE samplers for flow-matching models, through diffusers' schedulers.

The probability-flow ODE of rectified flow is dx/dσ = v_θ(x, σ, c), integrated from σ = 1 (noise) to 0.
``euler`` is diffusers' ``FlowMatchEulerDiscreteScheduler`` (x_{i+1} = x_i + (σ_{i+1} − σ_i)·v), the SD3
pipeline's default; ``dpmpp`` is ``DPMSolverMultistepScheduler`` in flow-prediction mode (2nd-order
DPM-Solver++, multistep). Both use the shifted flow sigmas σ' = s·σ / (1 + (s − 1)·σ) with the
pipeline's shift s. The loop mirrors ``StableDiffusion3Pipeline.__call__`` so the same noise, steps and
CFG give the same latents as the stock pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

from dgpo.models.handle import FlowModel, PromptEmbeds

SOLVERS = ("euler", "dpmpp")


def shift_sigmas(sigmas: torch.Tensor | np.ndarray, shift: float):
    """σ' = s·σ / (1 + (s − 1)·σ): the SD3 resolution shift of the flow schedule."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def make_scheduler(model: FlowModel, solver: str = "euler"):
    """A fresh scheduler of the requested kind, sharing the pipeline's flow shift."""
    base = model.scheduler_config
    if solver == "euler":
        return FlowMatchEulerDiscreteScheduler.from_config(base)
    if solver == "dpmpp":
        return DPMSolverMultistepScheduler(
            num_train_timesteps=base.num_train_timesteps, algorithm_type="dpmsolver++", solver_order=2,
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=base.shift,
            lower_order_final=True, final_sigmas_type="zero")
    raise ValueError(f"unknown ODE solver {solver!r}; choose one of {list(SOLVERS)}")


def scheduled(model: FlowModel, solver: str, steps: int, sigmas: list[float] | None, device):
    """A fresh ``solver`` scheduler set to visit ``sigmas`` — as the stock pipeline's ``sigmas=`` takes them, before
    the shift, one Euler step each (a few-step student's) — or, without them, its own ``steps``-step schedule."""
    scheduler = make_scheduler(model, solver)
    if sigmas:
        if solver != "euler":
            raise ValueError(f"explicit sigmas need the euler solver, not {solver!r}")
        scheduler.set_timesteps(sigmas=list(sigmas), device=device)
    elif steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    else:
        scheduler.set_timesteps(steps, device=device)
    return scheduler


def flow_sigmas(model: FlowModel, steps: int, solver: str = "euler") -> torch.Tensor:
    """The (steps + 1) noise levels σ_0 = ~1 > … > σ_steps = 0 that ``solver`` visits."""
    scheduler = make_scheduler(model, solver)
    scheduler.set_timesteps(steps)
    return scheduler.sigmas.float()


@dataclass
class Trajectory:
    """An ODE solve: ``latents[i]`` is x at ``sigmas[i]`` (len steps + 1; the last is the sample)."""

    latents: list[torch.Tensor]
    sigmas: torch.Tensor

    @property
    def final(self) -> torch.Tensor:
        return self.latents[-1]


@torch.no_grad()
def sample_ode(model: FlowModel, embeds: PromptEmbeds, noise: torch.Tensor, steps: int = 20,
               guidance_scale: float | None = 4.5, solver: str = "euler", return_trajectory: bool = False,
               sigmas: list[float] | None = None):
    """Integrate the ODE from ``noise`` (B, C, h, w) at σ≈1 to a clean latent; deterministic.

    ``guidance_scale``: the model's guided call at that scale; None: its plain call (``velocity_at_timestep``:
    no CFG, and a guidance-distilled model such as FLUX.1-dev at its own embedded default) — a few-step
    student's.

    ``sigmas`` (Euler only): the noise levels to visit as the stock pipeline's ``sigmas=`` takes them — before
    the scheduler's shift, one Euler step each, e.g. a few-step student's (its ``final/sampler.json``);
    ``steps`` is then ignored. Returns the final latents, or a :class:`Trajectory` with every visited state.
    """
    scheduler = scheduled(model, solver, steps, sigmas, noise.device)
    latents = noise.float()  # the state in fp32 whatever the weights' dtype (the handle casts at the transformer)
    states = [latents]
    for t in scheduler.timesteps:
        v = (model.velocity_at_timestep(latents, t, embeds) if guidance_scale is None else
             model.guided_velocity_at_timestep(latents, t, embeds, guidance_scale))
        latents = scheduler.step(v, t, latents, return_dict=False)[0]
        states.append(latents)
    if return_trajectory:
        return Trajectory(states, scheduler.sigmas.float().cpu())
    return latents


def initial_noise(seeds: list[int], shape: tuple[int, int, int]) -> torch.Tensor:
    """One N(0, I) latent per seed, drawn exactly as the pipeline draws it from
    ``torch.Generator().manual_seed(seed)`` for a single image: (len(seeds), C, h, w)."""
    return torch.cat([torch.randn((1, *shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds])
