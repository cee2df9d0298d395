"""TDM's formulas (tdm_r1.objectives) against their definitions: no model needed."""

import math

import pytest
import torch
from torch.distributions import Normal

from tdm_r1.objectives import (fake_score_loss, generator_loss, log_importance_weight, normalise_weights,
                               sample_tau, transition_coefficients, transition_sample, x0_from_velocity)

SIGMAS = torch.tensor([1.0, 0.8, 0.5, 0.2, 0.0])  # K = 4 boundaries + σ_K = 0


def test_transition_kernel_lands_on_the_flow_marginal():
    """x_s = (1−s)x₀ + sε diffused to t by q(x_t|x_s) must be distributed as (1−t)x₀ + tε'."""
    g = torch.Generator().manual_seed(0)
    n, x0 = 200_000, torch.tensor(0.7)
    s, t = torch.full((n,), 0.3), torch.full((n,), 0.65)
    x_s = (1 - s) * x0 + s * torch.randn(n, generator=g)
    x_t = transition_sample(x_s.view(n, 1), s, t, torch.randn(n, 1, generator=g)).flatten()
    assert x_t.mean().item() == pytest.approx((1 - 0.65) * 0.7, abs=5e-3)
    assert x_t.std().item() == pytest.approx(0.65, abs=5e-3)
    a, b = transition_coefficients(torch.tensor(0.0), torch.tensor(0.4))  # from s = 0: q(x_t | x₀)
    assert a.item() == pytest.approx(0.6) and b.item() == pytest.approx(0.4)


def test_tau_disjoint_stays_in_its_own_interval_and_is_uniform():
    g = torch.Generator().manual_seed(1)
    k = torch.randint(4, (40_000,), generator=g)
    tau = sample_tau(SIGMAS, k, "disjoint", g)
    lo, hi = SIGMAS[k + 1], SIGMAS[k]
    assert torch.all(tau >= lo) and torch.all(tau <= hi)
    for j in range(4):  # U(σ_{j+1}, σ_j): mean at the midpoint, variance (width)²/12
        tj, width = tau[k == j], (SIGMAS[j] - SIGMAS[j + 1]).item()
        assert tj.mean().item() == pytest.approx((SIGMAS[j] + SIGMAS[j + 1]).item() / 2, abs=0.01)
        assert tj.var().item() == pytest.approx(width ** 2 / 12, rel=0.05)
    u = torch.tensor([0.0, 0.25, 1.0])
    exact = sample_tau(SIGMAS, torch.tensor([0, 1, 3]), "disjoint", u=u)
    assert torch.allclose(exact, torch.tensor([0.8, 0.5 + 0.25 * 0.3, 0.2]))


def test_tau_full_reaches_pure_noise_from_the_next_boundary():
    g = torch.Generator().manual_seed(2)
    k = torch.full((20_000,), 2)
    tau = sample_tau(SIGMAS, k, "full", g)
    assert tau.min().item() >= 0.2 and tau.max().item() <= 1.0
    assert tau.max().item() > 0.99 and tau.mean().item() == pytest.approx(0.6, abs=0.01)
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


def test_generator_gradient_is_the_normalised_score_difference():
    g = torch.Generator().manual_seed(4)
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
    cos = torch.nn.functional.cosine_similarity(x1.grad.flatten(), expected.flatten(), dim=0)
    assert cos.item() > 0.9
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
