"""TDM-R1 on a tiny base: the bridge target, the surrogate's group loss, what reaches the student, resume."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dgpo.rewards import register_reward
from tdm_r1 import distill as distill_module
from tdm_r1 import surrogate as surrogate_module
from tdm_r1.cli import main
from tdm_r1.config import load_distill_config
from tdm_r1.distill import Distiller
from tdm_r1.reinforce import Reinforcer, recipe_of
from tdm_r1.objectives import (bridge_velocity, flow_velocity_target, level_above, transition_coefficients,
                               transition_sample)

from conftest import assert_margin


class Brightness:
    """Mean pixel value in [0, 1]: dense, so every group has a preference."""

    name = "r1_brightness"

    def __call__(self, images, prompts):
        return images.reshape(len(images), -1).mean(axis=1) / 255.0


register_reward("r1_brightness", Brightness, overwrite=True)

TINY_R1 = ["run.time_budget_min=0", "optim.batch_size=4", "eval.per_prompt=1", "eval.fd=false", "eval.every=1000",
           "student.lora_rank=4", "student.lora_alpha=4", "fake.lora_rank=4", "fake.lora_alpha=4",
           "fake.updates_per_generator=1", "surrogate.lora_rank=4", "surrogate.lora_alpha=4",
           "run.checkpoint_every=1000", "r1.enabled=true", "r1.group_size=2", "r1.init_run=",
           "reward.name=r1_brightness", "student.ema_decay=0"]


#: The recipe the outcome tests' margins were measured on (the default's TDM keys changed after).
MEASURED_RECIPE = "configs/tdm_r1/shapes_scheduler_levels.yaml"


def tiny_cfg(tiny_base, out, *extra, recipe="configs/tdm_r1/shapes.yaml"):
    return load_distill_config(recipe, [f"teacher.base={tiny_base}", f"run.out_dir={out}", *TINY_R1, *extra])


def test_bridge_target_closed_form():
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn((3, 4, 2, 2), generator=gen), torch.randn((3, 4, 2, 2), generator=gen)
    tau = torch.tensor([0.3, 0.6, 0.9])
    # at t = 0 the bridge is the flow-matching target ε − x₀
    x_tau = (1 - tau.view(-1, 1, 1, 1)) * x0 + tau.view(-1, 1, 1, 1) * eps
    assert torch.allclose(bridge_velocity(x0, torch.zeros(3), x_tau, tau), eps - x0, atol=1e-6)
    # at t > 0: the straight path through (t, x_t) and (τ, x_τ): x_t + (τ − t)·v* = x_τ, and x_t = x_τ − (τ − t)·v*
    t = torch.tensor([0.1, 0.5, 0.2])
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    z = torch.randn((3, 4, 2, 2), generator=gen)
    x_tau = transition_sample(x_t, t, tau, z)
    v = bridge_velocity(x_t, t, x_tau, tau)
    assert torch.allclose(x_t + (tau - t).view(-1, 1, 1, 1) * v, x_tau, atol=1e-6)



def test_flow_velocity_target_has_the_flows_velocity_as_its_mean(outcome_seed):
    """The surrogate's default target: over x_t of Gaussian data x₀ ~ N(0, s²) diffused to x_τ ~ q(x_τ | x_t), the
    least-squares slope of v* on x_τ is the flow's velocity slope Cov(ε − x₀, x_τ) / Var(x_τ) =
    (τ − (1 − τ)s²) / ((1 − τ)²s² + τ²) — the base is the Bayes-optimal predictor of it. The straight-line bridge's
    slope is 3.5× off. At t = 0 both are ε − x₀.
    Margin framing: tolerance 0.02 vs |slope − exact| (2·10⁶ draws; ~0.003 standard error).
    Measured margin (seeds 0-2, 1 and 2 threads): 5.0-66x."""
    g = torch.Generator().manual_seed(outcome_seed)
    n, s, t, tau = 2_000_000, 0.7, torch.full((2_000_000,), 0.5, dtype=torch.float64), torch.full((2_000_000,), 0.6,
                                                                                                  dtype=torch.float64)
    x0, eps, z = (torch.randn(n, 1, generator=g, dtype=torch.float64) for _ in range(3))
    x_t = (1 - 0.5) * s * x0 + 0.5 * eps
    x_tau = transition_sample(x_t, t, tau, z)
    exact = (0.6 - 0.4 * s ** 2) / (0.16 * s ** 2 + 0.36)
    slope = lambda v: ((v * x_tau).mean() / x_tau.square().mean()).item()  # noqa: E731
    assert_margin(0.02, abs(slope(flow_velocity_target(x_t, t, x_tau, tau)) - exact), "velocity target: tolerance "
                  "vs |slope − exact|")
    assert slope(bridge_velocity(x_t, t, x_tau, tau)) > 3 * exact
    x_tau0 = (1 - tau[:5, None]) * x0[:5] + tau[:5, None] * eps[:5]
    torch.testing.assert_close(flow_velocity_target(x0[:5], torch.zeros(5, dtype=torch.float64), x_tau0, tau[:5]),
                               eps[:5] - x0[:5])


def test_the_tau_floor_bounds_the_targets_noise():
    """With the released floor (τ uniform before a shift of 3, 0.02 above the point's level in the unshifted levels)
    the velocity target's noise coefficient (τ + a·t²/(1 − t)) / b stays ≤ 12.1 for points at t ≤ 0.8; the bridge
    with τ only 1e-3 above t reaches 89 there (what clipped the surrogate's gradients)."""
    t = torch.tensor([0.0, 0.25, 0.5, 0.75, 0.8], dtype=torch.float64)
    lowest = level_above(t, torch.zeros_like(t), shift=3.0, margin=0.02)
    a, b = transition_coefficients(t, lowest)
    assert ((lowest - t) > 0.01).all() and ((lowest + a * t ** 2 / (1 - t)) / b).max().item() <= 12.1
    near = level_above(t, torch.zeros_like(t))
    a, b = transition_coefficients(t, near)
    assert (b / (near - t)).max().item() > 85
    u = torch.rand(10_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    draws = level_above(torch.full_like(u, 0.5), u, t_min=0.55, shift=3.0, margin=0.02)
    assert draws.min().item() >= level_above(torch.tensor([0.55]), torch.zeros(1), shift=3.0, margin=0.02).item() - 1e-9
    assert draws.max().item() <= 1.0 and (draws > 0.9).float().mean().item() > 0.3  # shifted towards noise

@pytest.fixture
def r1(tiny_base, tmp_path):
    return Reinforcer(tiny_cfg(tiny_base, tmp_path / "run"), log=lambda *a: None)


def _batch(d: Distiller):
    prompts = d.sample_prompts(d.cfg.optim.batch_size)
    r = d.rollout(prompts)
    groups = torch.arange(len(prompts)) // d.cfg.r1.group_size
    adv = torch.tensor([1.0, -1.0] * (len(prompts) // 2))
    return prompts, r, groups, adv


def test_untrained_surrogate_has_zero_implicit_reward_and_its_loss_is_dgpo_loss(r1, monkeypatch):
    prompts, r, groups, adv = _batch(r1)
    for k in range(1, len(r1.boundaries) + 1):
        reward = r1.surrogate.implicit_reward(r.states, r1.sigmas, k, r.embeds, torch.Generator().manual_seed(k))
        assert torch.equal(reward, torch.zeros_like(reward))  # LoRA B = 0: the surrogate is the reference
    calls = []
    real = surrogate_module.dgpo_loss

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(out)
        return out

    monkeypatch.setattr(surrogate_module, "dgpo_loss", spy)
    loss, stats = r1.surrogate.loss(r.states, r1.sigmas, adv, groups, r.embeds, torch.Generator().manual_seed(0))
    assert len(calls) == 2  # one DGPO group loss per group (k_weight=group)
    # at φ = ref every group's loss is softplus(0) = log 2, times its k/K
    k = stats["surrogate_k"]
    assert all(abs(c.item() - math.log(2)) < 1e-6 for c in calls)
    assert loss.item() == pytest.approx(math.log(2) * k / len(r1.boundaries), rel=1e-5)


def test_no_gradient_of_the_surrogate_loss_reaches_the_student_or_the_fake(r1):
    prompts, r, groups, adv = _batch(r1)
    loss, _ = r1.surrogate.loss(r.states, r1.sigmas, adv, groups, r.embeds, torch.Generator().manual_seed(0))
    into_student = torch.autograd.grad(loss, r1.student_params + r1.fake_params, allow_unused=True,
                                       retain_graph=True)
    assert all(g is None for g in into_student)
    into_surrogate = torch.autograd.grad(loss, r1.surrogate.params, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in into_surrogate)


@pytest.mark.slow
def test_the_released_recipe_trains_its_surrogate_with_the_clip_against_its_old_ema(tiny_base, tmp_path):
    """configs/tdm_r1/shapes_released.yaml's surrogate (PPO-style clip against an EMA 'old' copy, KL term, batch
    std): updates run and move it (the old copy was once swapped in over the live weights inside the graph)."""
    d = Reinforcer(tiny_cfg(tiny_base, tmp_path / "run", "r1.group_size=2", "surrogate.lora_alpha=4",
                            recipe="configs/tdm_r1/shapes_released.yaml"), log=lambda *a: None)
    assert d.cfg.surrogate.clip_range > 0 and d.cfg.surrogate.kl_weight > 0
    prompts, r, _, _ = _batch(d)
    before = [p.detach().clone() for p in d.surrogate.params]
    for _ in range(2):
        stats = d.reward_update(r, d.score(r, prompts))
        assert np.isfinite(stats["loss_surrogate"])
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, d.surrogate.params))


def test_m_draws_per_update_step_on_the_mean_of_m_single_draw_gradients(tiny_base, tmp_path, monkeypatch):
    """surrogate.draws_per_update = M: one step on the mean of the gradients of M consecutive single-draw losses
    (fresh k, τ and z each), as if each were its own update's."""
    d = Reinforcer(tiny_cfg(tiny_base, tmp_path / "run", "surrogate.draws_per_update=3"), log=lambda *a: None)
    prompts, r, groups, adv = _batch(d)
    with torch.no_grad():  # a surrogate that differs from the base, so every draw has a gradient of its own
        for p in d.surrogate.params:
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    singles = []
    gen = torch.Generator().manual_seed(7)
    for _ in range(3):
        loss, _ = d.surrogate.loss(r.states, d.sigmas, adv, groups, r.embeds, gen)
        singles.append(torch.autograd.grad(loss, d.surrogate.params, allow_unused=True))
    expected = [sum(g[i] if g[i] is not None else 0 for g in singles) / 3 for i in range(len(d.surrogate.params))]
    assert not all(torch.allclose(a, b) for a, b in zip(singles[0], singles[1]) if a is not None)  # draws differ
    seen = {}
    monkeypatch.setattr(d.runtime, "optimizer_step", lambda opt, params, loss, clip, who: seen.setdefault(
        "grads", [p.grad.clone() if p.grad is not None else 0 for p in params]) and 0.0)
    d.surrogate.update(r.states, d.sigmas, adv, groups, r.embeds, torch.Generator().manual_seed(7), step=0)
    for got, want in zip(seen["grads"], expected):
        assert torch.allclose(torch.as_tensor(got), torch.as_tensor(want), atol=1e-7, rtol=1e-5)


def test_replay_steps_on_the_mean_over_the_fresh_batch_and_the_r_before_it(tiny_base, tmp_path, monkeypatch):
    """surrogate.replay = R: an update's gradient is the mean of the single-draw gradients on the fresh batch and on
    each of the R batches before it (oldest first after the fresh one: the order their draws are taken in)."""
    d = Reinforcer(tiny_cfg(tiny_base, tmp_path / "run", "surrogate.replay=2"), log=lambda *a: None)
    batches = [_batch(d) for _ in range(4)]
    with torch.no_grad():
        for p in d.surrogate.params:
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    for _, r, groups, adv in batches[:3]:
        d.surrogate.update(r.states, d.sigmas, adv, groups, r.embeds, torch.Generator().manual_seed(1), step=0)
    assert [b[0] is r.states for b, (_, r, _, _) in zip(d.surrogate.replayed, batches[1:3])] == [True, True]
    gen = torch.Generator().manual_seed(7)
    grads = []
    for _, r, groups, adv in (batches[3], batches[1], batches[2]):
        loss, _ = d.surrogate.loss(r.states, d.sigmas, adv, groups, r.embeds, gen)
        grads.append(torch.autograd.grad(loss, d.surrogate.params, allow_unused=True))
    expected = [sum(g[i] if g[i] is not None else 0 for g in grads) / 3 for i in range(len(d.surrogate.params))]
    seen = {}
    monkeypatch.setattr(d.runtime, "optimizer_step", lambda opt, params, loss, clip, who: seen.setdefault(
        "grads", [p.grad.clone() if p.grad is not None else 0 for p in params]) and 0.0)
    _, r, groups, adv = batches[3]
    d.surrogate.update(r.states, d.sigmas, adv, groups, r.embeds, torch.Generator().manual_seed(7), step=0)
    for got, want in zip(seen["grads"], expected):
        assert torch.allclose(torch.as_tensor(got), torch.as_tensor(want), atol=1e-7, rtol=1e-5)
    assert len(d.surrogate.replayed) == 2 and d.surrogate.replayed[-1][0] is r.states


def test_replay_resumes_exactly(tiny_base, tmp_path):
    """The replayed batches are part of a checkpoint: a resumed run's second update replays the first's batch."""
    keys = [f"teacher.base={tiny_base}", *TINY_R1, "surrogate.replay=1", "run.checkpoint_every=1"]
    whole = two_iterations_whole_and_resumed(tmp_path, keys)
    assert any(k.startswith("surrogate_replay.0.") for k in whole)


def test_the_student_only_moves_along_the_regression_direction(r1, monkeypatch):
    """The student's gradient is exactly that of −⟨d, x̂₀⟩/(B·D) for the combined direction d: a regression
    of its clean prediction, with no denoising-score-matching term (checked on the computation)."""
    prompts, r, groups, adv = _batch(r1)
    r1.reward_update(r, r1.score(r, prompts))
    seen = {}
    real = distill_module.regression_loss

    def spy(x0_student, direction, *args, **kwargs):
        b, d = len(x0_student), x0_student[0].numel()
        seen["expected"] = torch.autograd.grad((-(direction.detach() * x0_student).sum() / (b * d)),
                                               r1.student_params, retain_graph=True, allow_unused=True)
        seen["direction"] = direction
        return real(x0_student, direction, *args, **kwargs)

    def step(opt, params, loss, who):
        loss.backward()
        seen[who] = [p.grad.clone() if p.grad is not None else None for p in params]
        opt.zero_grad(set_to_none=True)
        return 0.0

    monkeypatch.setattr(distill_module, "regression_loss", spy)
    monkeypatch.setattr(r1, "_step", step)
    stats = r1.generator_update(r)
    assert stats["reward_gap"] >= 0 and seen["direction"].abs().sum() > 0
    for got, want in zip(seen["generator"], seen["expected"]):
        if want is None:
            assert got is None or got.abs().sum() == 0
        else:
            assert torch.allclose(got, want, atol=1e-7, rtol=1e-5)


def test_direct_rl_is_dgpos_loss_on_the_student_against_its_start(tiny_base, tmp_path, monkeypatch):
    """r1.reward_source=direct (the TDM + RL baseline): no surrogate adapter; DGPO's group loss is taken by the
    student's own LoRA against the starting student — log 2 per group at the start, its gradient into the student
    alone — and after steps the reference is still the start; the generator update carries no reward direction."""
    d = Reinforcer(tiny_cfg(tiny_base, tmp_path / "run", "r1.reward_source=direct", "surrogate.k_draw=last"),
                   log=lambda *a: None)
    assert d.surrogate is None and "surrogate" not in d.adapters.names
    start = [p.detach().clone() for p in d.student_params]
    prompts, r, groups, adv = _batch(d)
    calls = []
    real = surrogate_module.dgpo_loss

    def spy(*args, **kwargs):
        calls.append(real(*args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(surrogate_module, "dgpo_loss", spy)
    loss, stats = d.learner.loss(r.states, d.sigmas, adv, groups, r.embeds, torch.Generator().manual_seed(0))
    assert stats["surrogate_k"] == len(d.boundaries)  # k_draw=last: DGPO's own points, the clean samples
    assert len(calls) == 2 and all(abs(c.item() - math.log(2)) < 1e-6 for c in calls)
    grads = torch.autograd.grad(loss, d.student_params + d.fake_params, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads[:len(d.student_params)])
    assert all(g is None for g in grads[len(d.student_params):])
    monkeypatch.setattr(surrogate_module, "dgpo_loss", real)
    for _ in range(2):
        out = d.reward_update(r, d.score(r, prompts))
        assert np.isfinite(out["loss_direct_rl"])
    assert any(not torch.equal(a, p.detach()) for a, p in zip(start, d.student_params))
    assert all(torch.equal(a, s) for a, s in zip(start, d.learner.start.shadow))  # the reference stays the start
    stats = d.generator_update(r)
    assert "reward_gap" not in stats and np.isfinite(stats["loss_gen"])


def sets(*keys: str) -> list[str]:
    return [a for k in keys for a in ("--set", k)]


def two_iterations_whole_and_resumed(tmp_path, keys: list[str]) -> dict:
    """Checkpoint tensors after 2 iterations of `tdm-r1 train` in one go ("whole") and as 1 + a resumed 1
    ("pieces"), asserted bit for bit equal; returns the whole run's."""
    assert main(["train", "--out", str(tmp_path / "whole"), *sets(*keys, "run.iterations=2")]) == 0
    assert main(["train", "--out", str(tmp_path / "pieces"), *sets(*keys, "run.iterations=1")]) == 0
    assert main(["train", "--resume", str(tmp_path / "pieces"), "--set", "run.iterations=2"]) == 0
    whole, pieces = (load_file(str(tmp_path / r / "checkpoints" / "step-2" / "tensors.safetensors"))
                     for r in ("whole", "pieces"))
    assert whole.keys() == pieces.keys()
    for k in whole:
        assert torch.equal(whole[k], pieces[k]), k
    return whole


def test_direct_rl_resumes_exactly(tiny_base, tmp_path):
    keys = [f"teacher.base={tiny_base}", *TINY_R1, "r1.reward_source=direct", "run.checkpoint_every=1"]
    whole = two_iterations_whole_and_resumed(tmp_path, keys)
    assert any(k.startswith("direct_rl_opt.") for k in whole)
    assert not any(k.startswith("surrogate") for k in whole)
    assert main(["surrogate", "--out", str(tmp_path / "s"), *sets(*keys)]) == 2  # it has no surrogate to train


@pytest.mark.parametrize("reference", ["conditional", "guided"])
def test_the_reward_direction_of_an_untrained_surrogate(reference, tiny_base, tmp_path):
    """With the base read at the surrogate's own CFG (reward_reference=guided) the reward direction is the
    surrogate's learned shift alone: exactly 0 before it learns (LoRA B = 0); read against the base's conditional
    x̂₀ (the released code) it is the CFG push at rl_cfg even then."""
    d = Reinforcer(tiny_cfg(tiny_base, tmp_path / "run", f"r1.reward_reference={reference}", "r1.rl_cfg=3.0"),
                  log=lambda *a: None)
    prompts, r, _, _ = _batch(d)
    stats = d.generator_update(r)
    assert (stats["reward_gap"] == 0.0) == (reference == "guided")


def test_r1_runs_resumes_exactly_and_starts_from_a_tdm_run(tiny_base, tmp_path, capsys):
    base = [f"teacher.base={tiny_base}", *TINY_R1[:-5], "student.ema_decay=0"]
    # a TDM run to start from
    tdm_keys = [k for k in base if not k.startswith("surrogate.")]  # a TDM run has no surrogate section
    assert main(["distill", "configs/tdm/shapes.yaml", "--out", str(tmp_path / "tdm"),
                 *sets(*tdm_keys, "run.iterations=1")]) == 0
    r1_sets = [*base, f"r1.init_run={tmp_path / 'tdm'}", "r1.group_size=2", "reward.name=r1_brightness",
               "run.checkpoint_every=1"]
    whole = two_iterations_whole_and_resumed(tmp_path, r1_sets)
    assert any(k.startswith("surrogate.") for k in whole)
    rows = [json.loads(l) for l in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if "loss_surrogate" in r]
    assert len(trained) == 2 and all(np.isfinite(r["reward"]) for r in trained)
    assert "TDM-R1 student" in (tmp_path / "whole" / "summary.md").read_text()
    # the starting student is the TDM run's
    tdm = load_file(str(tmp_path / "tdm" / "checkpoints" / "step-1" / "tensors.safetensors"))
    d = Reinforcer(tiny_cfg(tiny_base, tmp_path / "check", f"r1.init_run={tmp_path / 'tdm'}",
                           *[k for k in base if k.startswith(("student.", "fake."))]), log=lambda *a: None)
    for k, p in d.named_trainables():
        assert torch.equal(p.detach(), tdm[k]), k
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path / "other"),
                 *sets(*r1_sets, "run.iterations=1", "student.lora_rank=8")]) == 2
    assert "trained another student (student.lora_rank: 4 there, 8 here" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "other"),
                 *sets(*r1_sets, "run.iterations=1", "student.level_shift=0")]) == 2
    assert "student.level_shift: 3.0 there, 0.0 here" in capsys.readouterr().err
    # a run folder saved before student.level_shift existed trained at the scheduler's levels
    import yaml
    saved = yaml.safe_load((tmp_path / "tdm" / "config.yaml").read_text())
    del saved["student"]["level_shift"]
    (tmp_path / "tdm" / "config.yaml").write_text(yaml.safe_dump(saved))
    assert main(["train", "--out", str(tmp_path / "other"), *sets(*r1_sets, "run.iterations=1")]) == 2
    assert "student.level_shift: 0.0 there, 3.0 here" in capsys.readouterr().err


@pytest.mark.slow
def test_r1_starts_from_the_student_a_tdm_run_exports(tiny_base, tmp_path):
    """A TDM run with an EMA exports (and evaluates) the EMA: TDM-R1 starts from that student, not the live
    weights, so its gain is measured from the student a benchmark scores as its start."""
    keys = [f"teacher.base={tiny_base}", *[k for k in TINY_R1[:-5] if not k.startswith("surrogate.")],
            "student.ema_decay=0.5", "run.iterations=3", "optim.generator_lr=1e-2"]
    assert main(["distill", "configs/tdm/shapes.yaml", "--out", str(tmp_path / "tdm"),
                 *[a for k in keys for a in ("--set", k)]]) == 0
    saved = load_file(str(tmp_path / "tdm" / "checkpoints" / "step-3" / "tensors.safetensors"))
    d = Reinforcer(tiny_cfg(tiny_base, tmp_path / "check", f"r1.init_run={tmp_path / 'tdm'}",
                           *[k for k in keys if k.startswith(("student.", "fake."))]), log=lambda *a: None)
    for i, p in enumerate(d.student_params):
        assert torch.equal(p.detach(), saved[f"student_ema.{i}"]), i
    assert any(not torch.equal(p.detach(), saved[k]) for k, p in d.named_trainables() if k.startswith("student."))
    for k, p in d.named_trainables():
        if k.startswith("fake."):
            assert torch.equal(p.detach(), saved[k]), k


REQUIRED_TAU = 0.05
REQUIRED_R1_EXCESS = 0.005


@pytest.fixture(scope="module")
def briefly_pretrained_base():
    """A tiny base with 300 flow steps: its images differ enough between noises for a reward to order them
    (the 4-step test base draws nearly the same image for every noise)."""
    from conftest import TINY_BASE, TINY_BASE_CONFIG
    from dgpo.cli import load_base_config
    from dgpo.worlds.shapes_base.pretrain import ensure_base
    keys = [k for k in TINY_BASE if not k.startswith(("flow.steps", "vae.steps", "data.renders"))]
    torch.manual_seed(0)
    return ensure_base(load_base_config(TINY_BASE_CONFIG, [*keys, "flow.steps=300", "vae.steps=100",
                                              "data.renders_per_prompt=8"]), log=lambda *a: None)


@pytest.mark.slow
def test_trained_surrogate_ranks_fresh_trajectory_points(briefly_pretrained_base, tmp_path, outcome_seed):
    """100 surrogate updates on rollouts of two prompts (4 per group); then on *fresh* rollouts of those prompts
    (16 per prompt), the implicit reward at the last two steps orders the points like their true rewards:
    mean Kendall τ over three evaluation seeds at least REQUIRED_TAU (chance 0). Measured margin, seeds 0-2 at
    1 and 2 threads: 4.3-5.1× (mean τ 0.22-0.26)."""
    seed = outcome_seed
    d = Reinforcer(tiny_cfg(briefly_pretrained_base, tmp_path / "run", "optim.batch_size=8", "r1.group_size=4",
                           "surrogate.lr=3e-3", f"run.seed={seed}", recipe=MEASURED_RECIPE), log=lambda *a: None)
    d.train_prompts = d.train_prompts[:2]

    def rollouts(n, g):
        d.cfg.r1.group_size = g
        prompts = d.sample_prompts(n)
        r = d.rollout(prompts)
        return r, d.score(r, prompts)

    for i in range(100):
        r, scored = rollouts(8, 4)
        d.surrogate.update(r.states, d.sigmas, scored.advantages, scored.group_ids, r.embeds, d.gen, i)
    k_max = len(d.boundaries)
    taus = []
    for eval_seed in range(3):
        r, scored = rollouts(32, 16)
        ranking = d.surrogate.ranking(r.states, d.sigmas, scored.rewards, scored.group_ids, r.embeds,
                                      torch.Generator().manual_seed(eval_seed))
        taus += [ranking[k_max - 1], ranking[k_max]]
    assert_margin(float(np.mean(taus)), REQUIRED_TAU, "mean Kendall τ of the surrogate on fresh points",
                  taus=str(np.round(taus, 3).tolist()))


@pytest.mark.slow
def test_r1_raises_the_training_reward_more_than_tdm_alone(briefly_pretrained_base, tmp_path, outcome_seed):
    """60 iterations from the same student on the same seeds: TDM-R1 with the brightness reward raises the mean
    brightness of 32 fixed rollouts by at least REQUIRED_R1_EXCESS more than TDM alone does (the reward
    direction weighted 3; at the default 0.7 the tiny model's gain is within TDM's on one seed of three).
    Measured margin, seeds 0-2 at 1 and 2 threads: 3.9-4.4× (R1 gains 0.027-0.030, TDM
    0.006-0.008)."""
    seed = outcome_seed
    def brightness_after(r1: bool) -> tuple[float, float]:
        cfg = tiny_cfg(briefly_pretrained_base, tmp_path / f"r1-{r1}", "optim.batch_size=8", "r1.group_size=4",
                       "optim.generator_lr=1e-3", "surrogate.lr=3e-3", "r1.reward_weight=3", f"run.seed={seed}",
                       f"r1.enabled={str(r1).lower()}", recipe=MEASURED_RECIPE)
        d = recipe_of(cfg)(cfg, log=lambda *a: None)

        def measure() -> float:
            g = torch.Generator().manual_seed(999)
            prompts = [d.train_prompts[i] for i in torch.randint(len(d.train_prompts), (32,), generator=g).tolist()]
            state = d.gen.get_state()
            d.gen.manual_seed(12345)  # the same 32 noises before and after, for both recipes
            with torch.no_grad():
                images = d.teacher.decode_latents(d.rollout(prompts).states[-1])
            d.gen.set_state(state)
            return float(np.mean(Brightness()(images, prompts)))

        before = measure()
        for _ in range(60):
            d.iteration()
        return before, measure()

    tdm_before, tdm_after = brightness_after(False)
    r1_before, r1_after = brightness_after(True)
    assert tdm_before == pytest.approx(r1_before, abs=1e-6)  # the same starting student
    assert_margin((r1_after - r1_before) - (tdm_after - tdm_before), REQUIRED_R1_EXCESS,
                  "R1's brightness gain minus TDM's", tdm_gain=tdm_after - tdm_before, r1_gain=r1_after - r1_before)


def test_surrogate_command_trains_alone_and_train_starts_from_it(tiny_base, tmp_path, capsys):
    """`tdm-r1 surrogate`: the student is untouched, the ranking is reported per step (0 for the untrained
    surrogate), the LoRA is written; `tdm-r1 train --set surrogate.init=...` starts from exactly those weights."""
    keys = [f"teacher.base={tiny_base}", *TINY_R1, "surrogate.lr=1e-2"]
    out = tmp_path / "surrogate"
    assert main(["surrogate", "--out", str(out), "--updates", "3", "--eval-every", "2", "--eval-prompts", "2",
                 "--per-prompt", "4", *sets(*keys)]) == 0
    ranking = json.loads((out / "ranking.json").read_text())["evaluations"]
    assert [r["update"] for r in ranking] == [0, 2, 3]
    assert ranking[0]["kendall_tau"] == {"1": 0.0, "2": 0.0, "3": 0.0, "4": 0.0}  # untrained: no order at all
    assert "| update | τ at step 1" in capsys.readouterr().out
    saved = load_file(str(out / "surrogate_lora" / "pytorch_lora_weights.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)  # it trained
    d = Reinforcer(tiny_cfg(tiny_base, tmp_path / "r1", f"surrogate.init={out / 'surrogate_lora'}"),
                  log=lambda *a: None)
    for k, p in d.adapters.named_parameters("surrogate"):
        assert torch.equal(p.detach(), saved[f"transformer.{k}"]), k
    assert main(["surrogate", "--out", str(out), "--updates", "1", *sets(*keys)]) == 2  # never over a user's folder
    assert "--out" in capsys.readouterr().err


@pytest.mark.parametrize("fault,precision", [("generator", "no"), ("surrogate", "no"), ("reward", "no"),
                                             ("generator", "bf16"), ("surrogate", "bf16")])
def test_a_non_finite_update_is_skipped_then_stops_the_run_with_finite_checkpoints(fault, precision, tiny_base,
                                                                                    tmp_path, monkeypatch):
    """A NaN in the generator's loss, the surrogate's gradient or a reward, on iterations 2 and 3 of 3: the
    first is skipped with a warning (nothing of it reaches the weights), the second in a row stops the run;
    every checkpoint holds finite values only — in fp32 and under teacher.mixed_precision=bf16."""

    from dgpo.errors import UserError
    from tdm_r1.distill import prepare_run_dir
    out = tmp_path / "run"
    logged = []
    d = Reinforcer(prepare_run_dir(tiny_cfg(tiny_base, out, "run.iterations=3", "run.checkpoint_every=1",
                                           "optim.max_skipped_steps=1", f"teacher.mixed_precision={precision}"),
                                  False), log=logged.append)
    dtypes = set()
    linear = next(m for m in d.teacher.transformer.modules() if isinstance(m, torch.nn.Linear))
    linear.register_forward_hook(lambda module, args, output: dtypes.add(output.dtype))
    poisoned = lambda: d.counters.iteration >= 1  # noqa: E731
    if fault == "generator":
        real_loss = distill_module.regression_loss
        monkeypatch.setattr(distill_module, "regression_loss", lambda *a, **k: real_loss(*a, **k) * (
            float("nan") if poisoned() else 1.0))
    elif fault == "surrogate":
        real_surrogate_loss = d.surrogate.loss

        def nan_gradient_loss(*args, **kwargs):
            loss, stats = real_surrogate_loss(*args, **kwargs)
            return (loss + d.surrogate.params[0].sum() * float("nan") if poisoned() else loss), stats
        monkeypatch.setattr(d.surrogate, "loss", nan_gradient_loss)
    else:
        real_reward = d.reward
        d.reward = lambda images, prompts: np.where(poisoned(), np.nan, np.asarray(real_reward(images, prompts)))
    with pytest.raises(UserError, match="2 steps in a row had a non-finite loss, gradient or reward, the last at "
                                        "iteration 3"):
        d.run()
    assert any(line.startswith("warning: skipped the update of iteration 2") for line in logged)
    assert (torch.bfloat16 in dtypes) == (precision == "bf16")  # the iterations autocast; evaluation is fp32
    checkpoints = sorted((out / "checkpoints").iterdir())
    assert [c.name for c in checkpoints] == ["step-1", "step-2"]  # iteration 2, skipped, is still checkpointed
    one, two = (load_file(str(c / "tensors.safetensors")) for c in checkpoints)
    assert all(torch.isfinite(v).all() for c in (one, two) for v in c.values())
    frozen = ("student.",) if fault == "generator" else ("student.", "surrogate.")  # what the skip kept still
    assert all(torch.equal(one[k], two[k]) for k in one if k.startswith(frozen)), \
        "a skipped update moved the weights it was skipped for"


def test_tdm_r1_is_a_recipe_of_its_own_and_the_tdm_recipe_refuses_its_config(r1, tiny_base, tmp_path):
    """The run calls both through the Recipe protocol; a TDM-R1 config given to the TDM recipe is one clear error
    (it would silently train plain TDM)."""
    from dgpo.errors import UserError
    from dgpo.runtime.loop import Recipe
    assert isinstance(r1, Recipe) and type(r1) is Reinforcer and r1.label == "TDM-R1"
    with pytest.raises(UserError, match="Reinforcer"):
        Distiller(tiny_cfg(tiny_base, tmp_path / "tdm"), log=lambda *a: None)
