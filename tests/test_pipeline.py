"""The embedded base is a genuine StableDiffusion3Pipeline: stock diffusers reproduces our sampler."""


import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusion3Pipeline

from dgpo.cli import load_model, main
from dgpo.sampling.ode import flow_sigmas, make_scheduler, sample_ode, shift_sigmas
from dgpo.evaluation.evaluate import SamplerConfig, generate
from dgpo.sampling.samples_io import read_samples

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
    from dgpo.sampling.ode import initial_noise
    latents = sample_ode(model, model.encode_prompts([prompt]), initial_noise([seed], model.latent_shape),
                         steps, cfg, solver)
    return model.decode_latents(latents, output="np")


def test_damaged_pipelines_and_loras_are_one_clear_error(tiny_base, tmp_path):
    """A half-copied pipeline, truncated weights, a prompt the tokenizer cannot hold, and LoRAs that are not
    safetensors, do not fit, or match no layer (which diffusers alone skips without a word)."""
    import shutil

    import torch
    from safetensors.torch import save_file

    from dgpo.errors import UserError
    from dgpo.models.families import load_model
    from dgpo.models.lora_io import load_lora_into_pipeline
    half = tmp_path / "half"
    shutil.copytree(tiny_base, half, ignore=lambda d, names: ["vae"] if "vae" in names else [])
    with pytest.raises(UserError, match="is incomplete: no vae folder"):
        load_model(half)
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_base, truncated)
    weights = truncated / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(UserError, match="could not be loaded .* missing, truncated or damaged"):
        load_model(truncated)
    model = load_model(tiny_base)
    with pytest.raises(UserError, match="tokens; the text encoder reads at most"):
        model.encode_prompts(["a red circle " * 50])
    q = "transformer.transformer_blocks.0.attn.to_q"
    width = model.transformer.transformer_blocks[0].attn.to_q.in_features
    cases = {"garbage": None, "misfit": {f"{q}.lora_A.weight": (2, width + 3), f"{q}.lora_B.weight": (width, 2)},
             "unet": {"unet.mid.to_q.lora_A.weight": (2, 8), "unet.mid.to_q.lora_B.weight": (8, 2)}}
    messages = {"garbage": "is not readable safetensors", "misfit": "does not fit this StableDiffusion3Pipeline",
                "unet": "its keys match none of its layers"}
    for name, shapes in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        if shapes is None:
            (folder / "pytorch_lora_weights.safetensors").write_bytes(b"\x00garbage" * 100)
        else:
            save_file({k: torch.zeros(s) for k, s in shapes.items()}, str(folder / "pytorch_lora_weights.safetensors"))
        with pytest.raises(UserError, match=messages[name]):
            load_lora_into_pipeline(load_model(tiny_base).pipe, folder)
