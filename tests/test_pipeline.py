"""The embedded base is a genuine StableDiffusion3Pipeline: stock diffusers reproduces our sampler."""


import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusion3Pipeline

from dgpo.cli import load_model, main
from dgpo.sampling import flow_sigmas, make_scheduler, sample_ode, shift_sigmas
from dgpo.evaluation import SamplerConfig, generate
from dgpo.samples_io import read_samples

PROMPT = "a photo of a red circle and a blue square"


def stock_pipeline(path):
    pipe = StableDiffusion3Pipeline.from_pretrained(str(path), text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_saved_base_loads_with_plain_from_pretrained_and_has_a_usage_note(tiny_base):
    pipe = stock_pipeline(tiny_base)
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    assert pipe.vae_scale_factor == 4 and pipe.default_sample_size * pipe.vae_scale_factor == 32
    note = (tiny_base / "USAGE.md").read_text()
    assert "max_sequence_length=0" in note and str(tiny_base) in note


@pytest.mark.parametrize("cfg", [4.5, 1.0])
def test_dgpo_sample_equals_plain_diffusers(tiny_base, tmp_path, cfg):
    """Same scheduler, steps, CFG and generator seed -> the same image (within 1e-5 in [0, 1])."""
    assert main(["sample", "--model", str(tiny_base), "--prompts", str(_prompt_file(tmp_path)),
                 "--out", str(tmp_path / "s"), "--steps", "6", "--cfg", str(cfg), "--seed", "7"]) == 0
    images, records = read_samples(tmp_path / "s")
    assert records[0]["seed"] == 7 and records[0]["prompt"] == PROMPT

    model = load_model(tiny_base)
    ours, _ = generate(model, [PROMPT], 1, SamplerConfig(steps=6, guidance_scale=cfg), seed=7, progress=False)
    pipe = stock_pipeline(tiny_base)
    ref = pipe(PROMPT, num_inference_steps=6, guidance_scale=cfg, max_sequence_length=0,
               generator=torch.Generator().manual_seed(7), output_type="np").images
    ours_float = _float_images(model, PROMPT, 7, 6, cfg, "euler")
    assert np.abs(ours_float - ref).max() <= 1e-5
    assert np.array_equal(images[0], (ref[0] * 255).round().astype(np.uint8))
    assert np.array_equal(ours[0], images[0])


def test_dpm_solver_equals_plain_diffusers_with_that_scheduler(tiny_base):
    model = load_model(tiny_base)
    pipe = stock_pipeline(tiny_base)
    pipe.scheduler = make_scheduler(model, "dpmpp")
    ref = pipe(PROMPT, num_inference_steps=5, guidance_scale=3.0, max_sequence_length=0,
               generator=torch.Generator().manual_seed(3), output_type="np").images
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    assert np.abs(_float_images(model, PROMPT, 3, 5, 3.0, "dpmpp") - ref).max() <= 1e-5


def test_trajectory_and_sigmas(tiny_base):
    model = load_model(tiny_base)
    embeds = model.encode_prompts([PROMPT, PROMPT])
    noise = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    traj = sample_ode(model, embeds, noise, steps=4, guidance_scale=1.0, return_trajectory=True)
    assert len(traj.latents) == 5 and torch.equal(traj.latents[0], noise)
    assert torch.equal(traj.final, sample_ode(model, embeds, noise, steps=4, guidance_scale=1.0))
    sig = flow_sigmas(model, 4)
    assert sig[-1] == 0 and torch.all(sig[:-1] > sig[1:])
    # The Euler step is x_{i+1} = x_i + (σ_{i+1} − σ_i)·v(x_i, σ_i).
    v = model.velocity(noise, sig[0].expand(2), embeds)
    assert torch.allclose(traj.latents[1], noise + (sig[1] - sig[0]) * v, atol=1e-5)
    # Shifted schedule: σ' = sσ / (1 + (s − 1)σ) of a linear grid from 1 to the scheduler's σ_min.
    lin = torch.linspace(1.0, float(make_scheduler(model).sigma_min), 4)
    assert torch.allclose(sig[:-1], shift_sigmas(lin, model.pipe.scheduler.config.shift), atol=1e-6)


def test_encode_decode_roundtrip_shapes(tiny_base):
    model = load_model(tiny_base)
    from dgpo.worlds import shapes
    images = np.stack([shapes.render(p, 32, 0) for p in shapes.prompts("test")[:4]])
    z = model.encode_images(images)
    assert z.shape == (4, *model.latent_shape)
    out = model.decode_latents(z)
    assert out.shape == images.shape and out.dtype == np.uint8


def _prompt_file(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text(PROMPT + "\n")
    return f


@torch.no_grad()
def _float_images(model, prompt, seed, steps, cfg, solver):
    from dgpo.sampling import initial_noise
    latents = sample_ode(model, model.encode_prompts([prompt]), initial_noise([seed], model.latent_shape),
                         steps, cfg, solver)
    return model.decode_latents(latents, output="np")
