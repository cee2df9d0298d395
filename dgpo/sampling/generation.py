"""The one generation loop: prompts in, images out, for any sampler.

Every place that makes images for a set of prompts — evaluation (:func:`dgpo.evaluation.evaluate.generate`), the
few-step student's sampler, the speed benchmarks (:mod:`dgpo.sampling.speed`) — runs this loop with its own
sampling function, so the images are the same wherever they are made:

    records: image k = (prompt of k, seed + k), prompts repeated ``per_prompt`` times in order
    encode each distinct prompt once
    per batch: initial noise from the seeds (as the stock pipeline draws it), ``sample(embeds, noise)``,
               decode

With ``times`` the three pieces are timed (device synchronised around each) and their seconds added to
``times["text_s"]``, ``times["loop_s"]`` and ``times["decode_s"]``.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from dgpo.models.handle import FlowModel, PromptEmbeds
from dgpo.runtime.processes import SINGLE, Processes
from dgpo.sampling.ode import initial_noise

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


@torch.no_grad()
def generate_images(model: FlowModel, prompts: list[str], sample: SampleFn, per_prompt: int = 1, seed: int = 0,
                    batch_size: int = 128, progress: bool = True,
                    times: dict | None = None, processes: Processes = SINGLE) -> tuple[np.ndarray, list[dict]]:
    """uint8 images (len(prompts)·per_prompt, S, S, 3) and one {"prompt", "seed"} record per image. On several
    processes each makes every world-th image and all of them get every image (an image depends only on its
    prompt and seed, so the images do not depend on the number of processes)."""
    everyone = [{"prompt": p, "seed": seed + k} for k, p in enumerate(p for p in prompts for _ in range(per_prompt))]
    records = processes.stride(everyone)

    def piece(name: str, fn: Callable):
        if times is None:
            return fn()
        out, seconds = timed(fn, model.device)
        times[name] = times.get(name, 0.0) + seconds
        return out

    unique = sorted(set(prompts))
    all_embeds = piece("text_s", lambda: model.encode_prompts(unique))
    embeds_of = {p: all_embeds.index(slice(i, i + 1)) for i, p in enumerate(unique)}
    images = []
    most = math.ceil(len(everyone) / processes.world)  # the most images one process makes: all run as many batches
    for i in tqdm(range(0, most, batch_size), desc="sampling", disable=not progress, leave=False):
        chunk = records[i:i + batch_size]
        # a process with no image left still samples one and drops it: a sharded model needs every process in
        # each of its calls (dgpo.runtime.sharding)
        sampled = chunk or everyone[:1]
        embeds = PromptEmbeds.cat([embeds_of[r["prompt"]] for r in sampled])
        noise = initial_noise([r["seed"] for r in sampled], model.latent_shape).to(model.device)
        latents = piece("loop_s", lambda: sample(embeds, noise))
        if chunk:
            images.append(piece("decode_s", lambda: model.decode_latents(latents)))
    if not processes.distributed:
        return np.concatenate(images), records
    mine = list(np.concatenate(images)) if images else []
    return np.stack(processes.gather_objects(mine)), everyone
