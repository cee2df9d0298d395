"""Sampling speed, piece by piece: where the time of one batch of images goes.

A few-step student needs K transformer evaluations per image where a guided teacher needs 2·N, but both
pay the same fixed costs — text encoding and the VAE decode — so the end-to-end speed-up is

    speed-up = (text + loop_teacher + decode) / (text + loop_student + decode)  <  loop_teacher / loop_student,

and it stays below the NFE ratio 2N / K whenever the fixed costs are not negligible. ``timed_generation``
runs exactly what :func:`dgpo.evaluation.evaluate.generate` and the TDM student's ``generate_student`` run for one
batch (encode the unique prompts once, initial noise ``seed + k`` for image k, the sampling loop, the
decode) and times the three pieces separately, synchronising the device between them, so a benchmark can
report the loop speed-up next to the end-to-end one.
"""

from __future__ import annotations

import time

import numpy as np

from dgpo.sampling.generation import SampleFn, generate_images
from dgpo.models.handle import FlowModel


def timed_generation(model: FlowModel, prompts: list[str], seed: int, sample: SampleFn) -> tuple[np.ndarray, dict]:
    """One batch (image k: ``prompts[k]``, seed ``seed + k``), made by the one generation loop.

    Returns the uint8 images and ``{"text_s", "loop_s", "decode_s", "total_s"}``; ``total_s`` also covers
    the glue between the pieces (embedding lookup, initial noise).
    """
    times: dict = {}
    t0 = time.perf_counter()
    images, _ = generate_images(model, prompts, sample, 1, seed, batch_size=len(prompts), progress=False, times=times)
    return images, {**times, "total_s": time.perf_counter() - t0}


def median_breakdown(runs: list[dict]) -> dict:
    """Per-key median of several ``timed_generation`` breakdowns."""
    return {k: float(np.median([r[k] for r in runs])) for k in runs[0]}
