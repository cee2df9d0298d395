"""TDM's formulas (tdm_r1.objectives) against their definitions: no model needed."""

import math

import pytest
import torch
from conftest import assert_margin
from torch.distributions import Normal

from tdm_r1.objectives import (cfg_direction, distribution_matching_direction, dmd_normaliser, fake_score_loss,
                               generator_loss, log_importance_weight, normalise_weights, sample_tau,
                               transition_coefficients, transition_sample, x0_from_velocity)

SIGMAS = torch.tensor([1.0, 0.8, 0.5, 0.2, 0.0])  # K = 4 boundaries + σ_K = 0


def test_transition_kernel_lands_on_the_flow_marginal(outcome_seed):
    """x_s = (1−s)x₀ + sε diffused to t by q(x_t|x_s) must be distributed as (1−t)x₀ + tε'.

    Margin framing: tolerance (5e-3 on the mean and on the std) vs |Monte Carlo deviation|; with n = 2·10⁶
    the tolerances are 11 (mean) and 15 (std) standard errors.
    Measured margin (seeds 0-2, 1 and 2 threads): mean 11-103x, std 54-431x."""
    g = torch.Generator().manual_seed(outcome_seed)
    n, x0 = 2_000_000, torch.tensor(0.7)
    s, t = torch.full((n,), 0.3), torch.full((n,), 0.65)
    x_s = (1 - s) * x0 + s * torch.randn(n, generator=g)
    x_t = transition_sample(x_s.view(n, 1), s, t, torch.randn(n, 1, generator=g)).flatten().double()
    mean, std = x_t.mean().item(), x_t.std().item()
    assert_margin(5e-3, abs(mean - (1 - 0.65) * 0.7), "x_t mean: tolerance vs |deviation|", mean=mean)
    assert_margin(5e-3, abs(std - 0.65), "x_t std: tolerance vs |deviation|", std=std)
    a, b = transition_coefficients(torch.tensor(0.0), torch.tensor(0.4))  # from s = 0: q(x_t | x₀)
    assert a.item() == pytest.approx(0.6) and b.item() == pytest.approx(0.4)


def test_tau_disjoint_stays_in_its_own_interval_and_is_uniform(outcome_seed):
    """Margin framing: tolerance (0.01 on each interval's mean, 5 % on its variance) vs |Monte Carlo
    deviation|; with 160 000 draws (40 000 an interval) these are ≥ 23 and 11 standard errors.
    Measured margin (seeds 0-2, 1 and 2 threads): means 25-49x, variances 6.1-9.8x."""
    g = torch.Generator().manual_seed(1 + outcome_seed)
    k = torch.randint(4, (160_000,), generator=g)
    tau = sample_tau(SIGMAS, k, "disjoint", g)
    lo, hi = SIGMAS[k + 1], SIGMAS[k]
    assert torch.all(tau >= lo) and torch.all(tau <= hi)
    mean_dev, var_dev = [], []
    for j in range(4):  # U(σ_{j+1}, σ_j): mean at the midpoint, variance (width)²/12
        tj, width = tau[k == j].double(), (SIGMAS[j] - SIGMAS[j + 1]).item()
        mean_dev.append(abs(tj.mean().item() - (SIGMAS[j] + SIGMAS[j + 1]).item() / 2))
        var_dev.append(abs(tj.var().item() / (width ** 2 / 12) - 1))
    assert_margin(0.01, max(mean_dev), "interval means: tolerance vs largest |deviation|", deviations=mean_dev)
    assert_margin(0.05, max(var_dev), "interval variances: relative tolerance vs largest |relative deviation|",
                  deviations=var_dev)
    u = torch.tensor([0.0, 0.25, 1.0])
    exact = sample_tau(SIGMAS, torch.tensor([0, 1, 3]), "disjoint", u=u)
    assert torch.allclose(exact, torch.tensor([0.8, 0.5 + 0.25 * 0.3, 0.2]))


def test_tau_full_reaches_pure_noise_from_the_next_boundary(outcome_seed):
    """τ ~ U(σ_{k+1}, 1): from the boundary after k up to pure noise.

    Margin framing: tolerance 0.01 on the mean vs |Monte Carlo deviation| (12 standard errors with 80 000
    draws); the top: the gap 1 − 0.99 allowed below 1 vs the gap 1 − max τ observed.
    Measured margin (seeds 0-2, 1 and 2 threads): mean 6.4-125x, top 671x and up."""
    g = torch.Generator().manual_seed(2 + outcome_seed)
    k = torch.full((80_000,), 2)
    tau = sample_tau(SIGMAS, k, "full", g)
    assert tau.min().item() >= 0.2 and tau.max().item() <= 1.0
    top, mean = tau.max().item(), tau.double().mean().item()
    assert_margin(1 - 0.99, max(1 - top, 1e-7), "top of τ: allowed vs observed gap below 1", max=top)
    assert_margin(0.01, abs(mean - 0.6), "τ mean: tolerance vs |deviation|", mean=mean)
    with pytest.raises(ValueError):
        sample_tau(SIGMAS, k, "bogus", g)


def test_importance_weight_is_the_ratio_of_the_two_gaussian_kernels():
    g = torch.Generator().manual_seed(3)
    b, shape = 6, (6, 2, 3, 3)
    x0, x_s, z = torch.randn(shape, generator=g), torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    s = torch.tensor([0.0, 0.1, 0.2, 0.5, 0.5, 0.7])
    t = torch.tensor([0.3, 0.2, 0.6, 0.55, 0.9, 0.75])
    x_t = transition_sample(x_s, s, t, z)
    a = (1 - t) / (1 - s)
    std = (t ** 2 - a ** 2 * s ** 2).sqrt()
    expected = []
    for i in range(b):
        log_p = Normal((1 - t[i]) * x0[i], t[i]).log_prob(x_t[i]).sum()
        log_q = Normal(a[i] * x_s[i], std[i]).log_prob(x_t[i]).sum()
        expected.append((log_p - log_q).item())
    got = log_importance_weight(x_t, x_s, x0, s, t)
    assert torch.allclose(got, torch.tensor(expected), atol=1e-3)
    # From the last boundary (s = 0, x_s = x̂₀) the proposal is the target: w = 1.
    same = log_importance_weight(x_t, x0, x0, torch.zeros(b), t)
    assert torch.allclose(same, torch.zeros(b), atol=1e-4)


def test_self_normalised_weights_have_mean_one_and_the_right_ratios():
    log_w = torch.tensor([-1000.0, -1001.0, -1003.0])  # would underflow as plain exp
    w = normalise_weights(log_w)
    assert w.mean().item() == pytest.approx(1.0)
    assert (w[0] / w[1]).item() == pytest.approx(math.e, rel=1e-5)
    assert torch.equal(normalise_weights(log_w, "none"), torch.ones(3))
    per_dim = normalise_weights(log_w, "per_dim", dim=100)
    expected = torch.exp(log_w.double() / 100)
    assert torch.allclose(per_dim.double(), expected / expected.mean(), rtol=1e-5)


def test_generator_gradient_is_the_normalised_score_difference(outcome_seed):
    """Margin framing (the Huber direction): (1 − 0.9) vs 1 − cosine.
    Measured margin (seeds 0-2, 1 and 2 threads): 7.1-34x."""
    g = torch.Generator().manual_seed(4 + outcome_seed)
    shape = (3, 2, 4, 4)
    x0 = torch.randn(shape, generator=g).requires_grad_(True)
    teacher, fake = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    generator_loss(x0, teacher, fake).backward()
    n = (x0.detach() - teacher).abs().flatten(1).mean(1).view(-1, 1, 1, 1)
    d = x0[0].numel()
    expected = -(teacher - fake) / n / (d * shape[0])
    assert torch.allclose(x0.grad, expected, atol=1e-6)
    # Huber: same direction, and no gradient when the fake equals the teacher.
    x1 = x0.detach().clone().requires_grad_(True)
    generator_loss(x1, teacher, fake, distance="huber").backward()
    cos = torch.nn.functional.cosine_similarity(x1.grad.flatten(), expected.flatten(), dim=0).item()
    assert_margin(1 - 0.9, max(1 - cos, 1e-7), "Huber vs L2 generator gradient: 1 - 0.9 vs 1 - cosine", cosine=cos)
    x2 = x0.detach().clone().requires_grad_(True)
    generator_loss(x2, teacher, teacher.clone(), distance="huber").backward()
    assert x2.grad.abs().max().item() == 0.0


def test_fake_loss_is_zero_at_the_velocity_of_its_target():
    g = torch.Generator().manual_seed(5)
    x0, x_t = torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 3, 2, 2, generator=g)
    t = torch.tensor([0.2, 0.4, 0.6, 0.9])
    v = (x_t - x0) / t.view(-1, 1, 1, 1)
    assert fake_score_loss(v, x_t, t, x0, torch.ones(4)).item() == pytest.approx(0.0, abs=1e-10)
    assert torch.allclose(x0_from_velocity(x_t, t, v), x0, atol=1e-6)
    assert fake_score_loss(v + 0.1, x_t, t, x0, torch.ones(4)).item() == pytest.approx(0.01, rel=1e-4)


def test_shifted_tau_is_uniform_in_the_unshifted_levels_then_shifted():
    """τ with shift s and margin m (the released code's draw): u = 0 gives the shifted (ũ(σ_{k+1}) + m), u = 1 the
    upper end, and in between τ = s·t / (1 + (s − 1)·t) of t uniform on the unshifted interval; s = 1, m = 0 is the
    plain draw, value for value."""
    s, m = 3.0, 0.02
    unshift = lambda x: x / (s - (s - 1) * x)  # noqa: E731
    shifted = lambda t: s * t / (1 + (s - 1) * t)  # noqa: E731
    k = torch.tensor([0, 1, 2, 3])
    for u, expect in ((0.0, lambda lo, hi: shifted(unshift(lo) + m)), (1.0, lambda lo, hi: hi),
                      (0.5, lambda lo, hi: shifted(0.5 * (unshift(lo) + m) + 0.5 * unshift(hi)))):
        tau = sample_tau(SIGMAS, k, "full", u=torch.full((4,), u), shift=s, margin=m)
        for j in range(4):
            lo, hi = SIGMAS[j + 1].item(), 1.0
            assert tau[j].item() == pytest.approx(expect(lo, hi), abs=1e-6), (u, j)
    u = torch.rand(4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_tau(SIGMAS, k, "disjoint", u=u), sample_tau(SIGMAS, k, "disjoint", u=u, shift=1.0))


def test_the_teacher_regulariser_and_its_gradient():
    from tdm_r1.objectives import teacher_regulariser
    g = torch.Generator().manual_seed(0)
    v = torch.randn(3, 4, 2, 2, generator=g, requires_grad=True)
    v_t = torch.randn(3, 4, 2, 2, generator=g)
    r = teacher_regulariser(v, v_t)
    assert r.item() == pytest.approx(((v - v_t) ** 2).mean().item(), rel=1e-6)
    r.backward()
    torch.testing.assert_close(v.grad, 2 * (v - v_t).detach() / v.numel())


@pytest.mark.parametrize("normalise", [False, True])
def test_conditional_matching_plus_cfg_is_matching_a_teacher_at_the_effective_scale(normalise):
    """The released code's split (distribution matching towards the conditional teacher, CFG as a direction of weight
    λ, both normalised against the teacher at CFG w) is TDM's direction towards the teacher at CFG 1 + λ(w − 1):
    x̂₀^c − x̂₀^fake + λ(w − 1)(x̂₀^c − x̂₀^u) = x̂₀^{u + (1 + λ(w − 1))(c − u)} − x̂₀^fake, over the same n."""
    g = torch.Generator().manual_seed(0)
    student, uncond, cond, fake = (torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64) for _ in range(4))
    w, lam = 4.5, 0.3
    def at(scale):  # the teacher's x̂₀ at CFG `scale` (x̂₀ is linear in v at a fixed point)
        return uncond + scale * (cond - uncond)
    split = (distribution_matching_direction(student, cond, fake, normalise, x0_normaliser=at(w))
             + lam * cfg_direction(student, at(w), cond, normalise))
    n = dmd_normaliser(student, at(w)).view(-1, 1, 1, 1) if normalise else 1.0
    torch.testing.assert_close(split, (at(1 + lam * (w - 1)) - fake) / n, rtol=1e-12, atol=1e-12)
    # the normaliser follows x0_normaliser, not the matched prediction
    assert not torch.allclose(distribution_matching_direction(student, cond, fake, True),
                              distribution_matching_direction(student, cond, fake, True, x0_normaliser=at(w)))
