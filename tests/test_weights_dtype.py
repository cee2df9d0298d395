"""Frozen weights in bf16 (`model.weights_dtype`, `teacher.weights_dtype`): the frozen model takes half the
memory, the adapters and their optimiser state stay fp32, the sampler's state stays fp32 whatever the weights'
and autocast's dtype, and a step matches the step of fp32 weights under the same bf16 autocast (autocast rounds
the fp32 weights of every matrix product to bf16 anyway)."""

import math

import pytest
import torch
from conftest import assert_margin

from dgpo.config import ConfigError
from dgpo.trainer import Trainer, prepare_run_dir
from tdm_r1.config import load_distill_config
from tdm_r1.distill import Distiller
from test_methods import learnable_base, make_trainer  # noqa: F401 (a fixture)


def frozen_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for n, p in module.named_parameters() if "lora_" not in n)


def lora_update(trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.params]


@pytest.mark.parametrize("method", ["dgpo", "flow_grpo"])
def test_bf16_weights_step_as_fp32_weights_under_the_same_autocast(method, learnable_base, tmp_path, outcome_seed):
    """One SGD epoch on bf16 frozen weights steps as on fp32 weights under the same bf16 autocast: the same
    rollouts (to bf16 rounding) and LoRA steps of about the same direction and size. On the base whose
    decoder responds to the latents (``learnable_base``): the 4-step VAE of ``tiny_base`` decodes every
    rollout of a group to nearly the same brightness, so bf16 rounding reorders the group's rewards and the
    two steps differ by their advantages, not by their arithmetic (cosine down to 0.96 there).

    Margin framing, each band against the measured deviation: latents atol 0.1 / max |Δlatent|; cosine
    (1 − 0.9) / (1 − cos); norm ratio log 1.25 / |log(|d16| / |d32|)| (the band 0.8-1.25 is symmetric in log).
    Measured margin (seeds 0-2, 1 and 2 threads): latents 3.2-3.7x, cosine 225-989x, norm ratio 33x and up."""
    runs = {}
    for dtype in ("fp32", "bf16"):
        tr = make_trainer(learnable_base, tmp_path / dtype, method, f"run.seed={outcome_seed}",
                          "model.mixed_precision=bf16", f"model.weights_dtype={dtype}", "optim.name=sgd",
                          "optim.lr=1.0")  # first SGD step ∝ the gradient (Adam's is its sign)
        states = []
        real_rollout = tr.rollout
        tr.rollout = lambda prompts, real=real_rollout: (lambda out: (states.append(out[0]), out)[1])(real(prompts))
        before = lora_update(tr)
        tr.epoch()
        runs[dtype] = dict(trainer=tr, before=before, after=lora_update(tr), latents=states[0])
    fp32, bf16 = runs["fp32"], runs["bf16"]
    model = bf16["trainer"].model
    for part in [*model.frozen_modules().values(), model.pipe.vae]:  # the backbone, every text encoder, the VAE
        assert {p.dtype for n, p in part.named_parameters() if "lora_" not in n} == {torch.bfloat16}
    assert frozen_bytes(model.transformer) * 2 == frozen_bytes(fp32["trainer"].model.transformer)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in bf16["trainer"].params)
    state = bf16["trainer"].optimizer.state_dict()["state"]
    assert state and all(v.dtype == torch.float32 for s in state.values() for v in s.values() if v.dim())
    for run in (fp32, bf16):  # the rollout's final state in fp32: bf16 autocast does not round the sampler's state
        assert run["latents"].dtype == torch.float32
    # the same rollouts (to bf16 rounding) and about the same step: LoRA deltas agree in direction and size
    latent_dev = float((fp32["latents"] - bf16["latents"]).abs().max())
    assert_margin(0.1, latent_dev, f"{method} rollout latents: atol 0.1 vs max |fp32 - bf16|", deviation=latent_dev)
    d32 = torch.cat([(a - b).flatten() for a, b in zip(fp32["after"], fp32["before"])])
    d16 = torch.cat([(a - b).flatten() for a, b in zip(bf16["after"], bf16["before"])])
    assert d32.norm() > 0
    cos = float(torch.nn.functional.cosine_similarity(d32, d16, dim=0))
    assert_margin(1 - 0.9, max(1 - cos, 1e-7), f"{method} LoRA step direction: 1 - 0.9 vs 1 - cosine", cosine=cos)
    ratio = float(d16.norm() / d32.norm())
    assert_margin(math.log(1.25), max(abs(math.log(ratio)), 1e-7),
                  f"{method} LoRA step size: log 1.25 vs |log norm ratio|", ratio=ratio)
    row = bf16["trainer"].evaluate()  # evaluation runs on the bf16 weights without autocast
    assert 0.0 <= row["eval_geneval"] <= 1.0


def test_bf16_weights_need_bf16_autocast(tiny_base, tmp_path):
    from dgpo.errors import UserError
    from dgpo.models.families import load_model
    from test_train import tiny_cfg
    cfg = prepare_run_dir(tiny_cfg(tiny_base, tmp_path / "mem"), False)
    with pytest.raises(UserError, match="frozen weights are torch.bfloat16: train it with model.mixed_precision=bf16"):
        Trainer(cfg, model=load_model(tiny_base, torch.bfloat16), log=lambda *a: None)  # an in-memory model too
    with pytest.raises(ConfigError, match="model.weights_dtype=bf16 needs model.mixed_precision=bf16"):
        make_trainer(tiny_base, tmp_path / "r", "dgpo", "model.weights_dtype=bf16")
    assert not (tmp_path / "r").exists()
    with pytest.raises(ConfigError, match="teacher.weights_dtype=bf16 needs teacher.mixed_precision=bf16"):
        load_distill_config("configs/tdm/shapes.yaml", ["teacher.weights_dtype=bf16"])
    with pytest.raises(ConfigError, match="student.mode=lora"):
        load_distill_config("configs/tdm/shapes.yaml", ["teacher.weights_dtype=bf16", "teacher.mixed_precision=bf16",
                                                         "student.mode=full"])


def test_tdm_on_a_bf16_teacher_keeps_fp32_adapters_and_finite_steps(tiny_base, tmp_path):
    """Distilling from a bf16 teacher keeps the student's and fake score's adapters fp32 and every step finite,
    and the student moves (measured on seed 0: by up to 2.4e-4 on weights of size ≤ 1, ~2000 float32 ulps)."""
    from test_tdm_distill import tiny_cfg
    cfg = tiny_cfg(tiny_base, tmp_path / "run", "teacher.mixed_precision=bf16", "teacher.weights_dtype=bf16",
                   "run.iterations=2")
    d = Distiller(cfg, log=lambda *a: None)
    assert {p.dtype for n, p in d.teacher.transformer.named_parameters() if "lora_" not in n} == {torch.bfloat16}
    before = [p.detach().clone() for p in d.student_params]
    assert all(p.dtype == torch.float32 for p in d.student_params + d.fake_params)
    for _ in range(2):
        row = d.train_step()
        assert all(torch.isfinite(torch.tensor(v)) for k, v in row.items() if isinstance(v, float))
    assert any(not torch.equal(a, b) for a, b in zip(before, d.student_params))
    assert all(torch.isfinite(p).all() for p in d.student_params + d.fake_params)
    assert 0.0 <= d.evaluate()["eval_geneval"] <= 1.0  # the student evaluated on the bf16 teacher, no autocast


@pytest.mark.parametrize("family", ["sd3", "flux-dev", "zimage"])
def test_every_family_on_bf16_weights_keeps_fp32_latents(family, tiny_base, tmp_path):
    """Each handle loaded in bf16 takes fp32 latents with or without autocast, returns an fp32 velocity close
    to the fp32 weights' one, decodes fp32 latents and samples with an fp32 state."""
    from dgpo.models.families import load_model
    from dgpo.models.tiny_pipelines import build_tiny_flux, build_tiny_zimage
    from dgpo.sampling.ode import sample_ode
    folder, resolution = (tiny_base, 0) if family == "sd3" else (
        (build_tiny_zimage if family == "zimage" else build_tiny_flux)(tmp_path / "pipe"), 32)
    models = {dt: load_model(folder, dt, resolution) for dt in (torch.float32, torch.bfloat16)}
    x = torch.randn(2, *models[torch.float32].latent_shape, generator=torch.Generator().manual_seed(1))
    v = {}
    for dt, model in models.items():
        embeds = model.encode_prompts(["a photo of a red circle", "a photo of two blue squares"])
        with torch.no_grad():
            v[dt] = model.guided_velocity(x, torch.tensor([0.7, 0.3]), embeds, 3.0)
            with torch.autocast("cpu", torch.bfloat16):
                assert model.guided_velocity(x, torch.tensor([0.7, 0.3]), embeds, 3.0).dtype == torch.float32
            final = sample_ode(model, embeds, x, steps=2, guidance_scale=1.0)
            images = model.decode_latents(final)
            encoded = model.encode_images(images)
        assert v[dt].dtype == final.dtype == encoded.dtype == torch.float32 and images.dtype == "uint8"
    scale = v[torch.float32].abs().mean()
    assert (v[torch.bfloat16] - v[torch.float32]).abs().mean() < 0.05 * scale


def test_a_merged_lora_on_bf16_weights_is_fused_in_fp32_and_rounded_once(tiny_base, tmp_path):
    """model.merge_lora with model.weights_dtype=bf16: the trained model's backbone is the fp32 fusion rounded
    once to bf16 (fusing into weights already rounded to bf16 would round twice)."""
    from dgpo.models.adapters import AdapterRoles
    from dgpo.models.families import load_model
    from dgpo.models.lora import save_lora_diffusers
    model = load_model(tiny_base)
    for p in AdapterRoles(model.transformer).add("default", 2, 2, model.lora_targets("attention"), seed=0):
        p.data.normal_(0.0, 0.02)
    lora = save_lora_diffusers(model.transformer, tmp_path / "lora")
    reference = load_model(tiny_base)
    reference.fuse_lora(lora)
    expected = {n: p.to(torch.bfloat16) for n, p in reference.transformer.named_parameters()}
    tr = make_trainer(tiny_base, tmp_path / "run", "dgpo", "model.mixed_precision=bf16", "model.weights_dtype=bf16",
                      f"model.merge_lora={lora}")
    got = {n.replace(".base_layer", ""): p for n, p in tr.model.transformer.named_parameters() if "lora_" not in n}
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[n], expected[n]) for n in got)
    rounded_twice = load_model(tiny_base, torch.bfloat16)
    rounded_twice.fuse_lora(lora)
    assert any(not torch.equal(p, expected[n]) for n, p in rounded_twice.transformer.named_parameters())
