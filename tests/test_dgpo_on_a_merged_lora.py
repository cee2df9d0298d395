"""DGPO on a model that is the base plus a LoRA (e.g. a few-step student), sampled on explicit sigmas:
``model.merge_lora`` fuses the LoRA before the run's own adapter, so the run starts from (and its reference is)
the merged model; ``rollout.sigmas`` / ``eval.sampler.sigmas`` sample exactly as the stock pipeline's ``sigmas=``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from test_train import tiny_cfg

from dgpo.cli import load_model
from dgpo.config import ConfigError
from dgpo.errors import UserError
from dgpo.evaluation.evaluate import SamplerConfig, generate
from dgpo.models.lora import adapters_disabled
from dgpo.sampling.ode import initial_noise
from dgpo.trainer import Trainer, load_train_config, nfe_per_epoch, prepare_run_dir

SIGMAS = [1.0, 0.75, 0.5, 0.25]  # as the stock pipeline's sigmas= takes them (before the shift)


@pytest.fixture(scope="module")
def a_lora(tiny_base, tmp_path_factory):
    """A LoRA that changes the tiny base: two DGPO epochs at a large learning rate."""
    out = tmp_path_factory.mktemp("lora") / "run"
    trainer = Trainer(prepare_run_dir(tiny_cfg(tiny_base, out, "run.epochs=2", "optim.lr=0.5"), False),
                      log=lambda *a: None)
    trainer.run()
    return out / "final" / "lora"


def test_explicit_sigmas_sample_as_the_stock_pipeline(tiny_base):
    model = load_model(tiny_base)
    images, records = generate(model, ["a photo of a red circle"], 1, SamplerConfig(guidance_scale=1.0, sigmas=SIGMAS),
                               seed=3, progress=False)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_base), text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    stock = pipe("a photo of a red circle", sigmas=SIGMAS, guidance_scale=1.0, max_sequence_length=0, output_type="np",
                 generator=torch.Generator().manual_seed(3)).images[0]
    diff = np.abs(images[0].astype(int) - (stock * 255).round().astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    other, _ = generate(model, ["a photo of a red circle"], 1, SamplerConfig(guidance_scale=1.0, steps=4), seed=3,
                        progress=False)
    assert np.abs(other.astype(int) - images.astype(int)).max() > 0  # the sigmas are used, not the 4-step schedule


def test_a_run_on_a_merged_lora_starts_from_it_and_its_reference_is_it(tiny_base, a_lora, tmp_path):
    cfg = tiny_cfg(tiny_base, tmp_path / "run", "run.epochs=1", f"model.merge_lora={a_lora}",
                   f"rollout.sigmas={json.dumps(SIGMAS)}", "rollout.guidance_scale=1.0",
                   f"eval.sampler.sigmas={json.dumps(SIGMAS)}", "eval.sampler.guidance_scale=1.0")
    trainer = Trainer(prepare_run_dir(cfg, False), log=lambda *a: None)
    merged, plain = load_model(tiny_base, str(a_lora)), load_model(tiny_base)
    x = initial_noise([0, 1], merged.latent_shape)
    embeds = merged.encode_prompts(["a photo of a red circle"] * 2)
    sigma = torch.full((2,), 0.6)
    with torch.no_grad():
        want = merged.velocity(x, sigma, embeds)
        assert not torch.allclose(want, plain.velocity(x, sigma, plain.encode_prompts(["a photo of a red circle"] * 2)),
                                  atol=1e-4)
        ours = trainer.model.velocity(x, sigma, trainer.model.encode_prompts(["a photo of a red circle"] * 2))
        with adapters_disabled(trainer.model.transformer):
            reference = trainer.model.velocity(x, sigma, trainer.model.encode_prompts(["a photo of a red circle"] * 2))
    assert torch.allclose(ours, want, atol=1e-5) and torch.allclose(reference, want, atol=1e-5)
    trainer.run()
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["nfe"] == nfe_per_epoch(trainer.cfg)  # 4 rollout levels, no CFG
    usage = (tmp_path / "run" / "final" / "README.md").read_text()
    assert str(a_lora.resolve()) in usage and f"sigmas={SIGMAS}" in usage


@pytest.mark.parametrize("extra,error", [
    (["model.merge_lora=/nonexistent/lora"], UserError),
    ([f"rollout.sigmas={json.dumps(SIGMAS)}", "rollout.solver=dpmpp"], ConfigError),
    (["rollout.sigmas=[1.0, 0.5, 0.7]"], ConfigError),
    ([f"eval.sampler.sigmas={json.dumps(SIGMAS)}", "eval.sampler.solver=dpmpp"], ConfigError),
])
def test_bad_merge_or_sigmas_fail_before_any_model_loads(tiny_base, tmp_path, extra, error):
    with pytest.raises(error):
        tiny_cfg(tiny_base, tmp_path / "run", *extra)


def test_flow_grpo_rolls_out_at_explicit_sigmas(tiny_base, tmp_path):
    """Flow-GRPO on a few-step student: its SDE rollouts and their log-probabilities walk rollout.sigmas."""
    from test_train import TINY_RUN
    cfg = load_train_config("configs/flow_grpo/shapes.yaml", [
        f"model.base={tiny_base}", f"run.out_dir={tmp_path / 'run'}", "run.time_budget_min=0", *TINY_RUN,
        "run.epochs=1", f"rollout.sigmas={json.dumps(SIGMAS)}", "rollout.guidance_scale=1.0"])
    trainer = Trainer(prepare_run_dir(cfg, False), log=lambda *a: None)
    trainer.run()
    assert len(trainer.objective.sigmas) == len(SIGMAS) + 1 and trainer.objective.sigmas[0] == 1.0
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("reward" in r and np.isfinite(r["reward"]) for r in rows)
