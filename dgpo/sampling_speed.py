"""Sampling speed, piece by piece: where the time of one batch of images goes.

A few-step student needs K transformer evaluations per image where a guided teacher needs 2·N, but both
pay the same fixed costs — text encoding and the VAE decode — so the end-to-end speed-up is

    speed-up = (text + loop_teacher + decode) / (text + loop_student + decode)  <  loop_teacher / loop_student,

and it stays below the NFE ratio 2N / K whenever the fixed costs are not negligible. ``timed_generation``
runs exactly what :func:`dgpo.evaluation.generate` and the TDM student's ``generate_student`` run for one
batch (encode the unique prompts once, initial noise ``seed + k`` for image k, the sampling loop, the
decode) and times the three pieces separately, synchronising the device between them, so a benchmark can
report the loop speed-up next to the end-to-end one.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from dgpo.models.handle import FlowModel, PromptEmbeds
from dgpo.sampling import initial_noise

#: ``sample(embeds, noise) -> latents``: a sampling loop, e.g. ``lambda e, n: sample_ode(model, e, n, 20, 1.5)``.
SampleFn = Callable[[PromptEmbeds, torch.Tensor], torch.Tensor]


def synchronize(device) -> None:
    """Wait for queued GPU work (a no-op on the CPU), so wall-clock times mean what they say."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable, device="cpu"):
    """``(fn(), seconds)`` with the device synchronised before and after."""
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - t0


def timed_generation(model: FlowModel, prompts: list[str], seed: int, sample: SampleFn) -> tuple[np.ndarray, dict]:
    """One batch (image k: ``prompts[k]``, seed ``seed + k``), as the generation helpers make it.

    Returns the uint8 images and ``{"text_s", "loop_s", "decode_s", "total_s"}``; ``total_s`` also covers
    the glue between the pieces (embedding lookup, initial noise).
    """
    t0 = time.perf_counter()
    unique = sorted(set(prompts))
    all_embeds, text_s = timed(lambda: model.encode_prompts(unique), model.device)
    embeds_of = {p: all_embeds.index(slice(i, i + 1)) for i, p in enumerate(unique)}
    embeds = PromptEmbeds.cat([embeds_of[p] for p in prompts])
    noise = initial_noise([seed + k for k in range(len(prompts))], model.latent_shape).to(model.device)
    latents, loop_s = timed(lambda: sample(embeds, noise), model.device)
    images, decode_s = timed(lambda: model.decode_latents(latents), model.device)
    total_s = time.perf_counter() - t0
    return images, {"text_s": text_s, "loop_s": loop_s, "decode_s": decode_s, "total_s": total_s}


def median_breakdown(runs: list[dict]) -> dict:
    """Per-key median of several ``timed_generation`` breakdowns."""
    return {k: float(np.median([r[k] for r in runs])) for k in runs[0]}
