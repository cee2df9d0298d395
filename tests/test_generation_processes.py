"""Image generation on several processes: each process makes every world-th image, and every process runs as many
sampler batches as the busiest one (a sharded model needs every process in each of its calls: dgpo.runtime.sharding)."""

import numpy as np
import torch

from dgpo.sampling.generation import generate_images
from dgpo.models.handle import PromptEmbeds
from dgpo.runtime.processes import Processes


class OneOfTwo(Processes):
    """Process ``rank`` of two, its collectives replaced by what it would receive from itself."""

    def gather_objects(self, local: list) -> list:
        return list(local)


class FlatModel:
    """Just enough of a handle for generate_images: 1-token prompts, 1×2×2 latents, 2-pixel images."""

    latent_shape = (1, 2, 2)
    device = torch.device("cpu")

    def encode_prompts(self, prompts):
        return PromptEmbeds(torch.zeros(len(prompts), 1, 1), torch.zeros(len(prompts), 1))

    def decode_latents(self, latents):
        return np.zeros((len(latents), 2, 2, 3), np.uint8)


def test_every_process_runs_as_many_sampler_batches():
    """5 images over 2 processes in batches of 2: process 0 makes 3 (two batches), process 1 makes 2 (one batch,
    then one it drops); each keeps exactly its own images."""
    calls, kept = {}, {}
    for rank in (0, 1):
        sizes = []
        images, _ = generate_images(FlatModel(), ["a", "b", "c", "d", "e"], lambda e, x: sizes.append(len(x)) or x,
                                    batch_size=2, progress=False, processes=OneOfTwo(rank, 2))
        calls[rank], kept[rank] = sizes, len(images)
    assert len(calls[0]) == len(calls[1]) == 2
    assert (kept[0], kept[1]) == (3, 2)
