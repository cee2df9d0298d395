"""The FLUX.1 handle on tiny FLUX.1-dev and -schnell pipelines saved in the published layout: stock diffusers
loads them, our sampler reproduces ``FluxPipeline``'s latents, DGPO trains through the handle against a reward
served over HTTP, and its LoRA loads into a stock ``FluxPipeline`` and changes the image."""

import json

import numpy as np
import pytest
import torch

from dgpo.models.flux import FluxModel, pack_latents, unpack_latents
from dgpo.models.handle import load_model
from dgpo.models.tiny_pipelines import build_tiny_flux


@pytest.fixture(scope="module", params=["dev", "schnell"])
def tiny_flux(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"flux-{request.param}") / "pipe"
    return build_tiny_flux(folder, guidance_embeds=request.param == "dev"), request.param


def test_packing_round_trips_and_matches_the_pipeline():
    from diffusers import FluxPipeline
    x = torch.randn(2, 16, 6, 8)
    assert torch.equal(unpack_latents(pack_latents(x), 16, 6, 8), x)
    assert torch.equal(pack_latents(x), FluxPipeline._pack_latents(x, 2, 16, 6, 8))


def test_the_handle_samples_what_the_stock_pipeline_samples(tiny_flux):
    from diffusers import FluxPipeline
    folder, kind = tiny_flux
    model = load_model(folder, resolution=32)
    assert isinstance(model, FluxModel) and model.image_size == 32 and model.latent_shape == (16, 16, 16)
    assert model.distilled_guidance == (kind == "dev")
    from dgpo.sampling import sample_ode
    steps, guidance = 4, 3.5 if kind == "dev" else 1.0
    sigmas = np.linspace(1.0, 1 / steps, steps).tolist()  # FluxPipeline's own schedule
    noise = torch.randn((1, *model.latent_shape), generator=torch.Generator().manual_seed(0))
    ours = sample_ode(model, model.encode_prompts(["a photo of a red circle"]), noise, guidance_scale=guidance,
                      sigmas=sigmas)
    pipe = FluxPipeline.from_pretrained(str(folder))
    theirs = pipe("a photo of a red circle", height=32, width=32, sigmas=sigmas, guidance_scale=guidance,
                  latents=pack_latents(noise), max_sequence_length=model.max_sequence_length, output_type="latent").images
    torch.testing.assert_close(ours, unpack_latents(theirs, 16, 16, 16), atol=1e-5, rtol=1e-4)


def test_dgpo_trains_through_the_handle_and_its_lora_loads_in_stock_diffusers(tiny_flux, tmp_path):
    from diffusers import FluxPipeline

    from dgpo.cli import main
    from test_reward_serving import BRIGHTNESS_PLUGIN, _serve
    folder, kind = tiny_flux
    plugin = tmp_path / "brightness.py"
    plugin.write_text(BRIGHTNESS_PLUGIN)
    server, url = _serve("brightness", "--plugin", str(plugin))  # `dgpo serve-reward`, as a user starts it
    sets = [f"model.base={folder}", "model.resolution=32", "run.epochs=2", "run.time_budget_min=0",
            "rollout.prompts_per_epoch=2", "rollout.group_size=3", "rollout.steps=2", "eval.per_prompt=1",
            "eval.sampler.steps=2", "eval.fd=false", "eval.every=100", "optim.micro_batch=6", "model.lora_rank=2",
            "model.lora_alpha=2", "optim.lr=0.05", "objective.timesteps_per_sample=1",
            f"rollout.guidance_scale={3.5 if kind == 'dev' else 1.0}", "eval.sampler.guidance_scale=1.0",
            "reward.name=remote", f"reward.url={url}"]
    try:
        assert main(["train", "--out", str(tmp_path / "run"), *[a for k in sets for a in ("--set", k)]]) == 0
    finally:
        server.terminate()
        server.wait(timeout=10)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward"] for r in rows if "reward" in r]
    assert len(rewards) == 2 and all(0.25 <= r <= 0.2511 for r in rewards)  # the served reward's, over HTTP
    usage = (tmp_path / "run" / "final" / "README.md").read_text()
    assert "FluxPipeline.from_pretrained" in usage and "height=32, width=32" in usage
    pipe = FluxPipeline.from_pretrained(str(folder))
    call = dict(prompt="a photo of a red circle", height=32, width=32, num_inference_steps=2, guidance_scale=3.5,
                max_sequence_length=16, output_type="np")
    before = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    pipe.load_lora_weights(str(tmp_path / "run" / "final" / "lora"))
    after = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    assert np.abs(after - before).max() > 1e-4  # the trained LoRA is on, and it moved the image
