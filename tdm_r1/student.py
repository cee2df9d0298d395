"""The K-NFE student sampler: K deterministic Euler (= DDIM for rectified flow) steps at fixed boundaries.

The student visits the noise levels σ_0 = 1 > σ_1 > … > σ_{K−1} > σ_K = 0 (the *boundaries*) and takes one
Euler step per level with no CFG:

    x_{σ_{k+1}} = x_{σ_k} + (σ_{k+1} − σ_k) · v_θ(x_{σ_k}, σ_k, c).

For rectified flow (x_σ = (1 − σ)·x₀ + σ·ε) this is exactly the deterministic DDIM step: it keeps the
predicted x̂₀ = x_σ − σ·v and ε̂ = x_σ + (1 − σ)·v and re-noises x̂₀ with ε̂ to σ_{k+1}.

The sampler *is* diffusers' ``FlowMatchEulerDiscreteScheduler`` driven with custom ``sigmas``: the scheduler
applies its shift s to whatever ``sigmas`` it receives (σ' = s·σ / (1 + (s − 1)·σ)), so we hand it the
un-shifted values u_k = σ_k / (s − (s − 1)·σ_k) and it lands on our boundaries. The same ``sigmas`` with
``guidance_scale=1`` in ``StableDiffusion3Pipeline.__call__`` reproduce the student exactly; they are
written next to the exported LoRA (``sampler.json`` and ``USAGE.md``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from dgpo.runtime.processes import SINGLE, Processes
from dgpo.errors import UserError
from dgpo.models.handle import FlowModel, PromptEmbeds
from dgpo.sampling.generation import generate_images
from dgpo.sampling.ode import sample_ode, shift_sigmas

SAMPLER_FILE = "sampler.json"


def default_boundaries(model: FlowModel, nfe: int) -> list[float]:
    """σ_0 … σ_{K−1} of the pipeline scheduler's own K-step schedule (shifted, σ_0 = 1; for the shapes base
    and K = 4: [1.0, 0.80, 0.50, 0.004]). Measured on shapes, this beat K levels evenly spaced before the
    shift ([1.0, 0.857, 0.667, 0.4]) in 5-minute distillations (``evenly_spaced_boundaries``)."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(model.scheduler_config)
    scheduler.set_timesteps(nfe)
    return [float(s) for s in scheduler.sigmas[:-1]]


def shifted_levels(nfe: int, shift: float) -> list[float]:
    """K levels u_j = 1 − j/K evenly spaced before a shift s, then shifted: σ_j = s·u_j / (1 + (s − 1)·u_j).
    At s = 3 these are the released TDM-R1 code's sampler levels (its DPM-Solver++ at flow shift 3, 4 steps:
    [1.0, 0.90, 0.75, 0.50]; K = 2: [1.0, 0.75]; K = 1: [1.0])."""
    u = 1.0 - np.arange(nfe) / nfe
    return [float(x) for x in shift_sigmas(u, float(shift))]


def evenly_spaced_boundaries(model: FlowModel, nfe: int) -> list[float]:
    """K levels evenly spaced *before* the scheduler's own shift (``shifted_levels`` at the pipeline's shift);
    the stock call then gets ``sigmas=[1, 1 − 1/K, …, 1/K]``. Pass them as ``student.boundaries``."""
    return shifted_levels(nfe, float(model.scheduler_config.shift))


def student_levels(model: FlowModel, nfe: int, level_shift: float) -> list[float]:
    """The student's levels when none are given: ``shifted_levels(K, level_shift)``, or the pipeline scheduler's
    own K-step schedule when ``level_shift`` is 0 (``student.level_shift``)."""
    return shifted_levels(nfe, level_shift) if level_shift > 0 else default_boundaries(model, nfe)


def check_boundaries(boundaries: list[float]) -> list[float]:
    """Boundaries must start at 1 and decrease strictly inside (0, 1]; raises a UserError naming the fix."""
    b = [float(x) for x in boundaries]
    if not b:
        raise UserError("student boundaries are empty: give K noise levels, e.g. [1.0, 0.8, 0.5, 0.2]")
    if abs(b[0] - 1.0) > 1e-6:
        raise UserError(f"student boundaries must start at 1.0 (pure noise), got {b}")
    if any(not 0.0 < x <= 1.0 for x in b) or any(x <= y for x, y in zip(b, b[1:])):
        raise UserError(f"student boundaries must decrease strictly inside (0, 1], got {b}")
    return b


def unshift(sigmas, shift: float):
    """Inverse of the scheduler shift: u = σ / (s − (s − 1)·σ), so that s·u / (1 + (s − 1)·u) = σ."""
    sigmas = np.asarray(sigmas, dtype=np.float64)
    return sigmas / (shift - (shift - 1.0) * sigmas)


def pipeline_sigmas(model: FlowModel, boundaries: list[float]) -> list[float]:
    """The ``sigmas=`` to pass to the stock pipeline so that its scheduler visits ``boundaries``."""
    cfg = model.scheduler_config
    if cfg.get("use_dynamic_shifting"):
        raise UserError("the base scheduler uses dynamic shifting; the student sampler needs a fixed shift")
    return [float(u) for u in unshift(boundaries, float(cfg.shift))]


def student_scheduler(model: FlowModel, boundaries: list[float], device=None) -> FlowMatchEulerDiscreteScheduler:
    """A fresh Euler scheduler set to the student's boundaries (what the stock pipeline builds)."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(model.scheduler_config)
    scheduler.set_timesteps(sigmas=pipeline_sigmas(model, boundaries), device=device)
    return scheduler


def boundary_sigmas(model: FlowModel, boundaries: list[float]) -> torch.Tensor:
    """The K + 1 levels σ_0 … σ_K = 0 as the scheduler stores them (float32; training uses exactly these)."""
    return student_scheduler(model, boundaries).sigmas.float().cpu()


def sample_student(model: FlowModel, embeds: PromptEmbeds, noise: torch.Tensor, boundaries: list[float],
                   return_trajectory: bool = False):
    """K Euler steps at the boundaries with the model's plain call (no CFG; FLUX.1-dev at its embedded
    default): the one ODE loop (:func:`dgpo.sampling.ode.sample_ode`) at the ``sigmas=`` that make the stock
    pipeline's scheduler visit them. Returns the final latents, or a :class:`dgpo.sampling.ode.Trajectory`
    (K + 1 states) when asked."""
    return sample_ode(model, embeds, noise, guidance_scale=None, solver="euler",
                      sigmas=pipeline_sigmas(model, boundaries), return_trajectory=return_trajectory)


@torch.no_grad()
def generate_student(model: FlowModel, prompts: list[str], boundaries: list[float], per_prompt: int = 1,
                     seed: int = 0, batch_size: int = 128, progress: bool = True,
                     processes: Processes = SINGLE) -> tuple[np.ndarray, list[dict]]:
    """Like :func:`dgpo.evaluation.evaluate.generate` (image k uses seed ``seed + k``) with the student sampler."""
    return generate_images(model, prompts, lambda e, n: sample_student(model, e, n, boundaries), per_prompt, seed,
                           batch_size, progress, processes=processes)


# ------------------------------------------------------------------------------------------- export

def diffusers_settings(model: FlowModel, boundaries: list[float]) -> dict:
    """Everything a stock pipeline call needs to reproduce the student: its ``sigmas``, the guidance argument
    that means "the plain conditional velocity" to that pipeline (1.0 for SD3; FLUX.1-dev's embedded default;
    0 for Z-Image, whose g = 0 turns CFG off), the image size and the text length."""
    sigmas = pipeline_sigmas(model, boundaries)
    return {
        "pipeline": type(getattr(model, "pipe", model)).__name__,
        "scheduler": "FlowMatchEulerDiscreteScheduler",
        "scheduler_config": {k: v for k, v in dict(model.scheduler_config).items() if not k.startswith("_")},
        "num_inference_steps": len(sigmas),
        "sigmas": sigmas,
        "boundaries": [float(b) for b in boundaries],
        "guidance_scale": float(getattr(model, "unguided_pipeline_scale", 1.0)),
        "height": model.image_size,
        "width": model.image_size,
        "max_sequence_length": model.max_sequence_length,
    }


def write_sampler_files(folder: str | Path, model: FlowModel, boundaries: list[float], base: str | Path,
                        lora: str | Path | None) -> dict:
    """Write ``sampler.json`` (the stock call's settings) and ``USAGE.md`` (the call itself) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    settings = diffusers_settings(model, boundaries)
    (folder / SAMPLER_FILE).write_text(json.dumps(settings, indent=2))
    pipeline = settings["pipeline"]
    loading = ', text_encoder_3=None, tokenizer_3=None' if pipeline == "StableDiffusion3Pipeline" else ""
    lora_line = (f'pipe.load_lora_weights("{lora}")\n'
                 f'pipe.fuse_lora()  # only sampling: fold the adapters into the weights (the same function, faster)\n'
                 if lora else "")
    (folder / "USAGE.md").write_text(f"""# {len(boundaries)}-NFE TDM student

Stock diffusers reproduces the student (the settings are also in `{SAMPLER_FILE}`): the base's Euler
scheduler with these `sigmas` (the scheduler shifts them onto the student's boundaries
{[round(b, 6) for b in boundaries]}), no CFG.

```python
import torch
from diffusers import {pipeline}
pipe = {pipeline}.from_pretrained("{base}"{loading})
{lora_line}image = pipe("a photo of a red circle", sigmas={settings['sigmas']}, height={settings['height']},
             width={settings['width']}, guidance_scale={settings['guidance_scale']},
             max_sequence_length={settings['max_sequence_length']},
             generator=torch.Generator().manual_seed(0)).images[0]
```
""")
    return settings


def read_sampler_file(folder: str | Path) -> dict | None:
    """The settings written by :func:`write_sampler_files` in ``folder`` or its parent (None if absent)."""
    for f in (Path(folder) / SAMPLER_FILE, Path(folder).parent / SAMPLER_FILE):
        if f.is_file():
            return json.loads(f.read_text())
    return None


def subset_boundaries(boundaries: list[float], nfe: int) -> list[float]:
    """Fewer steps with the same student: ``nfe`` of its K levels, evenly spaced and starting at σ_0 = 1
    (K = 4 → 2 steps: σ_0, σ_2; 1 step: σ_0). With nfe ≥ K the boundaries are returned unchanged."""
    k = len(boundaries)
    if nfe >= k:
        return list(boundaries)
    idx = np.round(np.linspace(0, k, nfe + 1)[:-1]).astype(int)
    return [boundaries[i] for i in idx]
