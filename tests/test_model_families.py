"""The FLUX.1 and Z-Image handles on tiny FLUX.1-dev, FLUX.1-schnell and Z-Image pipelines saved in the published
layout: stock diffusers loads them, our sampler reproduces the stock pipeline's latents, DGPO trains through the
handle against a reward served by `dgpo serve-reward`, and its LoRA loads into the stock pipeline and changes the
image. (The SD3 family: tests/test_pipeline.py, tests/test_reward_serving.py.)"""

import json

import numpy as np
import pytest
import torch

from dgpo.models.flux import FluxModel, pack_latents, unpack_latents
from dgpo.models.families import load_model
from dgpo.models.tiny_pipelines import build_tiny_flux, build_tiny_zimage
from dgpo.models.zimage import ZImageModel


@pytest.fixture(scope="module", params=["flux-dev", "flux-schnell", "zimage"])
def tiny_family(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param) / "pipe"
    if request.param == "zimage":
        return build_tiny_zimage(folder), request.param
    return build_tiny_flux(folder, guidance_embeds=request.param == "flux-dev"), request.param


def stock_pipeline(folder, kind):
    from diffusers import FluxPipeline, ZImagePipeline
    return (ZImagePipeline if kind == "zimage" else FluxPipeline).from_pretrained(str(folder))


#: Guidance per family: (ours, the stock pipeline's guidance_scale). FLUX.1-dev embeds it; Z-Image's g is our
#: w = g + 1; schnell samples without guidance.
GUIDANCE = {"flux-dev": (3.5, 3.5), "flux-schnell": (1.0, 1.0), "zimage": (3.0, 2.0)}


def test_packing_round_trips_and_matches_the_pipeline():
    from diffusers import FluxPipeline
    x = torch.randn(2, 16, 6, 8)
    assert torch.equal(unpack_latents(pack_latents(x), 16, 6, 8), x)
    assert torch.equal(pack_latents(x), FluxPipeline._pack_latents(x, 2, 16, 6, 8))


def test_the_handle_samples_what_the_stock_pipeline_samples(tiny_family):
    folder, kind = tiny_family
    model = load_model(folder, resolution=32)
    assert isinstance(model, ZImageModel if kind == "zimage" else FluxModel)
    assert model.image_size == 32 and model.latent_shape == (16, 16, 16)
    from dgpo.sampling.ode import sample_ode
    steps, (ours_w, theirs_g) = 4, GUIDANCE[kind]
    sigmas = np.linspace(1.0, 1 / steps, steps).tolist()  # the stock pipelines' own schedule
    noise = torch.randn((1, *model.latent_shape), generator=torch.Generator().manual_seed(0))
    ours = sample_ode(model, model.encode_prompts(["a photo of a red circle"]), noise, guidance_scale=ours_w,
                      sigmas=sigmas)
    pipe = stock_pipeline(folder, kind)
    theirs = pipe("a photo of a red circle", height=32, width=32, sigmas=sigmas, guidance_scale=theirs_g,
                  latents=noise if kind == "zimage" else pack_latents(noise),
                  max_sequence_length=model.max_sequence_length, output_type="latent").images
    if kind != "zimage":
        theirs = unpack_latents(theirs, 16, 16, 16)
    torch.testing.assert_close(ours, theirs.to(ours.dtype), atol=1e-5, rtol=1e-4)


def test_dgpo_trains_through_the_handle_and_its_lora_loads_in_stock_diffusers(tiny_family, tmp_path):
    from dgpo.cli import main
    from test_reward_serving import BRIGHTNESS_PLUGIN, served
    folder, kind = tiny_family
    plugin = tmp_path / "brightness.py"
    plugin.write_text(BRIGHTNESS_PLUGIN)
    sets = [f"model.base={folder}", "model.resolution=32", "run.epochs=2", "run.time_budget_min=0",
            "rollout.prompts_per_epoch=2", "rollout.group_size=3", "rollout.steps=2", "eval.per_prompt=1",
            "eval.sampler.steps=2", "eval.fd=false", "eval.every=100", "optim.micro_batch=6", "model.lora_rank=2",
            "model.lora_alpha=2", "optim.lr=0.05", "objective.timesteps_per_sample=1",
            f"rollout.guidance_scale={GUIDANCE[kind][0]}", "eval.sampler.guidance_scale=1.0",
            "reward.name=remote"]
    with served("brightness", "--plugin", str(plugin)) as url:  # `dgpo serve-reward`, as a user starts it
        assert main(["train", "--out", str(tmp_path / "run"), *[a for k in [*sets, f"reward.url={url}"]
                                                                 for a in ("--set", k)]]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward"] for r in rows if "reward" in r]
    assert len(rewards) == 2 and all(0.25 <= r <= 0.2511 for r in rewards)  # the served reward's, over HTTP
    usage = (tmp_path / "run" / "final" / "README.md").read_text()
    pipeline = "ZImagePipeline" if kind == "zimage" else "FluxPipeline"
    assert f"{pipeline}.from_pretrained" in usage and "height=32, width=32" in usage
    pipe = stock_pipeline(folder, kind)
    call = dict(prompt="a photo of a red circle", height=32, width=32, num_inference_steps=2,
                guidance_scale=GUIDANCE[kind][1], max_sequence_length=16, output_type="np")
    before = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    pipe.load_lora_weights(str(tmp_path / "run" / "final" / "lora"))
    after = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    assert np.abs(after - before).max() > 1e-4  # the trained LoRA is on, and it moved the image


def test_tdm_distils_a_student_whose_stock_pipeline_call_reproduces_it(tiny_family, tmp_path):
    """Two TDM iterations on the family's pipeline; the exported student (LoRA + sampler.json) sampled by the stock
    pipeline with the written settings equals our student sampler's latents."""
    from tdm_r1.cli import main as tdm_main
    from tdm_r1.student import read_sampler_file, sample_student
    folder, kind = tiny_family
    sets = [f"teacher.base={folder}", "teacher.resolution=32", f"teacher.guidance_scale={GUIDANCE[kind][0]}",
            "run.iterations=2", "run.time_budget_min=0", "optim.batch_size=4", "eval.per_prompt=1", "eval.fd=false",
            "eval.every=1000", "student.lora_rank=2", "student.lora_alpha=2", "fake.lora_rank=2", "fake.lora_alpha=2",
            "fake.updates_per_generator=1", "optim.generator_lr=0.05", "run.checkpoint_every=1000"]
    if kind == "zimage":  # no pooled prompt embedding to condition the fake score on the step (tau=full's)
        sets.append("objective.tau=disjoint")
    assert tdm_main(["distill", "--out", str(tmp_path / "tdm"), *[a for k in sets for a in ("--set", k)]]) == 0
    lora = tmp_path / "tdm" / "final" / "lora"
    settings = read_sampler_file(lora)
    assert settings["pipeline"] == ("ZImagePipeline" if kind == "zimage" else "FluxPipeline")
    assert settings["height"] == 32 and f"{settings['pipeline']}.from_pretrained" in (lora / "USAGE.md").read_text()
    model = load_model(folder, resolution=32)
    model.fuse_lora(lora)
    noise = torch.randn((1, *model.latent_shape), generator=torch.Generator().manual_seed(0))
    ours = sample_student(model, model.encode_prompts(["a photo of a red circle"]), noise, settings["boundaries"])
    pipe = stock_pipeline(folder, kind)
    pipe.load_lora_weights(str(lora))
    theirs = pipe("a photo of a red circle", height=32, width=32, sigmas=settings["sigmas"],
                  guidance_scale=settings["guidance_scale"], max_sequence_length=settings["max_sequence_length"],
                  latents=noise if kind == "zimage" else pack_latents(noise), output_type="latent").images
    if kind != "zimage":
        theirs = unpack_latents(theirs, 16, 16, 16)
    torch.testing.assert_close(ours, theirs.to(ours.dtype), atol=1e-4, rtol=1e-3)
    # `tdm-r1 sample` samples the student at the size it was trained at (its sampler.json), as the stock call does
    assert tdm_main(["sample", "--model", str(folder), "--lora", str(lora), "--nfe", "4", "--split", "test",
                     "--out", str(tmp_path / "samples")]) == 0
    from PIL import Image
    assert Image.open(next((tmp_path / "samples").glob("*.png"))).size == (32, 32)
    # TDM-R1 from that student: its surrogate and reward directions run through the handle, its LoRA loads too
    r1 = [*sets, "r1.enabled=true", f"r1.init_run={tmp_path / 'tdm'}", "r1.group_size=2", "run.iterations=1",
          "surrogate.lora_rank=2", "surrogate.lora_alpha=2", "reward.name=shapes_soft"]
    assert tdm_main(["train", "--out", str(tmp_path / "r1"), *[a for k in r1 for a in ("--set", k)]]) == 0
    rows = [json.loads(line) for line in (tmp_path / "r1" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss_surrogate" in r and np.isfinite(r["loss_surrogate"]) for r in rows)
    stock_pipeline(folder, kind).load_lora_weights(str(tmp_path / "r1" / "final" / "lora"))
