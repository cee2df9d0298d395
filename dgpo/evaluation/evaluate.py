"""Generate images for a set of prompts and score them on a world (default: the shapes world).

``generate`` draws ``per_prompt`` images per prompt with a deterministic ODE sampler; image k gets seed
``seed + k`` (k the running index), drawn as the stock pipeline draws it, so any image can be reproduced
with plain diffusers. ``evaluate_images`` gives the world's task metric (for shapes, shapes-geneval: the
mean over categories of the mean strict score, per-category numbers beside it) and its quality metric (FD, and
for shapes the sharpness beside it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dgpo.config import option
from dgpo.models.handle import FlowModel
from dgpo.sampling.generation import generate_images
from dgpo.runtime.metrics import QUALITY_MEASURES
from dgpo.runtime.processes import SINGLE, Processes
from dgpo.sampling.ode import SOLVERS, sample_ode
from dgpo.worlds.registry import World, make_world


@dataclass
class SamplerConfig:
    steps: int = option(20, "ODE steps", min=1)
    guidance_scale: float = option(1.5, "classifier-free guidance scale (<= 1: no CFG)", min=0.0)
    solver: str = option("euler", "ODE solver", choices=SOLVERS)
    sigmas: list[float] = option([], "explicit noise levels as the stock pipeline's sigmas= takes them (Euler, one "
                                 "step each; e.g. a student's final/sampler.json); empty: `steps` of the schedule")


@dataclass
class EvalConfig:
    split: str = option("test", "prompts to evaluate on", choices=("train", "test", "all"))
    per_prompt: int = option(16, "images per prompt (more = less evaluation noise)", min=1)
    seed: int = option(1000, "seed of the first image (image k uses seed + k)", min=0)
    batch_size: int = option(128, "images per sampler batch", min=1)
    fd: bool = option(True, "also compute the quality FD")


def generate(model: FlowModel, prompts: list[str], per_prompt: int = 1, sampler: SamplerConfig = SamplerConfig(),
             seed: int = 0, batch_size: int = 128, progress: bool = True,
             processes: Processes = SINGLE) -> tuple[np.ndarray, list[dict]]:
    """uint8 images (len(prompts)·per_prompt, S, S, 3) and one {"prompt", "seed"} record per image, drawn
    with the ODE sampler ``sampler`` through the one generation loop (:func:`dgpo.sampling.generation.generate_images`)."""
    def sample(embeds, noise):
        return sample_ode(model, embeds, noise, sampler.steps, sampler.guidance_scale, sampler.solver,
                          sigmas=sampler.sigmas)
    return generate_images(model, prompts, sample, per_prompt, seed, batch_size, progress, processes=processes)


def evaluate_images(images: np.ndarray, prompts: list[str], fd: bool = True, world: World | None = None,
                    processes: Processes = SINGLE, rewards: dict | None = None) -> dict:
    """The world's task metric (overall + per category), dense score and quality FD of generated images, and
    under ``"rewards"`` the mean of each of ``rewards`` ({name: reward}, evaluation-only rewards) on them (on
    several processes, each holding all the images: scored by the main process, the result shared)."""
    result = None
    if processes.is_main:
        result = (world or make_world()).score(images, prompts, fd=fd)
        if rewards:
            result["rewards"] = {n: float(np.mean(r(images, prompts))) for n, r in rewards.items()}
    return processes.broadcast(result)


def evaluate_model(model: FlowModel, cfg: EvalConfig = EvalConfig(), sampler: SamplerConfig = SamplerConfig(),
                   prompts: list[str] | None = None, progress: bool = True, world: World | None = None,
                   processes: Processes = SINGLE, rewards: dict | None = None) -> tuple[dict, np.ndarray, list[dict]]:
    """Sample ``cfg.per_prompt`` images for each prompt of the split and score them (on several processes: the
    images made by all of them, see :func:`evaluate_images`)."""
    world = world or make_world()
    prompts = prompts if prompts is not None else world.prompts(cfg.split)
    images, records = generate(model, prompts, cfg.per_prompt, sampler, cfg.seed, cfg.batch_size, progress, processes)
    return evaluate_images(images, [r["prompt"] for r in records], cfg.fd, world, processes, rewards), images, records


def format_table(results: dict[str, dict], metric: str = "shapes-geneval") -> str:
    """A markdown table: one row per model, columns the task metric overall, each category, partial, FD, and the
    sharpness beside the FD (high-frequency ratio and edge width, :mod:`dgpo.worlds.sharpness`) when some
    result has it."""
    cats = list(dict.fromkeys(c for r in results.values() for c in r["per_category"]))
    quality = [k for k in QUALITY_MEASURES if k == "fd" or any(k in r for r in results.values())]
    head = ["model", metric, *cats, "partial", *(QUALITY_MEASURES[k] for k in quality)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        row = [name, f"{r['geneval']:.3f}", *(f"{r['per_category'].get(c, float('nan')):.3f}" for c in cats),
               f"{r.get('partial', float('nan')):.3f}", *(f"{r[k]:.2f}" if k in r else "-" for k in quality)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
