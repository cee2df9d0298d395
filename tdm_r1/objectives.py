"""Trajectory Distribution Matching (TDM, Luo et al., arXiv 2503.06674) in rectified-flow notation; pure
functions of tensors.

Notation. Noise levels σ ∈ [0, 1], x_σ = (1 − σ)·x₀ + σ·ε (SD3). A velocity model v gives the clean
prediction x̂₀ = x_σ − σ·v. The student's boundaries are σ_0 = 1 > … > σ_K = 0; its step k maps x_{σ_k} to
x_{σ_{k+1}} deterministically (see :mod:`tdm_r1.student`).

TDM matches, for every step k, the distribution of the student's *trajectory* point x_{σ_{k+1}}, diffused
to a noise level τ, with the teacher's marginal at τ (the paper's trajectory-distribution-matching KL,
Sec. 3.1–3.2): minimise KL(p^θ_τ ‖ p^teacher_τ) where x_τ ~ q(x_τ | x_{σ_{k+1}}). Its gradient is a
score difference, estimated with a *fake score* (a second network that tracks the student's diffused
trajectory distribution) against the teacher's score — the DMD-style data-free score distillation.

- :func:`transition_sample` — the forward kernel q(x_t | x_s) from level s to t ≥ s.
- :func:`sample_tau` — τ in the step's own interval (σ_{k+1}, σ_k) ("sampling-steps-aware", disjoint
  intervals, Sec. 3.3) or in (σ_{k+1}, 1) with the step index as extra conditioning of the fake score.
- :func:`generator_loss` — the student update with target x̂₀ + (x̂₀^teacher,CFG − x̂₀^fake)/n.
- :func:`log_importance_weight`, :func:`normalise_weights`, :func:`fake_score_loss` — the fake score's
  importance-weighted denoising loss.

Equation numbers are not quoted: the formulas are written out in full in each docstring instead.
"""

from __future__ import annotations

import math

import torch


def _b(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-sample (B,) tensor against (B, C, h, w)."""
    return x.view(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def x0_from_velocity(x: torch.Tensor, sigma: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """x̂₀ = x_σ − σ·v (rectified flow: v = ε − x₀)."""
    return x - _b(sigma, x) * v


def eps_from_velocity(x: torch.Tensor, sigma: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """ε̂ = x_σ + (1 − σ)·v."""
    return x + (1 - _b(sigma, x)) * v


# ------------------------------------------------------------------------------------------- forward kernel

def transition_coefficients(s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) of the rectified-flow forward kernel q(x_t | x_s) = N(a·x_s, b²·I) for t ≥ s:

        a = (1 − t)/(1 − s),   b² = t² − a²·s²,

    so that x_s = (1 − s)·x₀ + s·ε diffused to t has marginal (1 − t)·x₀ + t·ε' (s = 0 gives a = 1 − t,
    b = t: the usual q(x_t | x₀)). b² ≥ 0 ⟺ t ≥ s.
    """
    a = (1 - t) / (1 - s).clamp_min(1e-12)
    var = (t ** 2 - a ** 2 * s ** 2).clamp_min(0.0)
    return a, var.sqrt()


def transition_sample(x_s: torch.Tensor, s: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = a·x_s + b·z with z = ``noise`` ~ N(0, I) (see :func:`transition_coefficients`)."""
    a, b = transition_coefficients(s, t)
    return _b(a, x_s) * x_s + _b(b, x_s) * noise


def sample_tau(sigmas: torch.Tensor, k: torch.Tensor, mode: str, generator: torch.Generator | None = None,
               u: torch.Tensor | None = None, tau_min: float = 0.0, shift: float = 1.0,
               margin: float = 0.0) -> torch.Tensor:
    """The noise level τ at which step k's trajectory point is matched.

    ``sigmas`` = (σ_0, …, σ_K), ``k`` (B,) step indices. With u ~ U(0, 1):

    - ``disjoint`` (default, TDM's sampling-steps-aware objective): τ = σ_{k+1} + u·(σ_k − σ_{k+1}), i.e.
      τ ~ U(σ_{k+1}, σ_k): step k is only ever judged inside its own interval, so the K steps learn
      decoupled targets and the intervals of different steps never overlap;
    - ``full``: τ = σ_{k+1} + u·(1 − σ_{k+1}), τ ~ U(σ_{k+1}, 1): every step is judged up to pure noise and
      the fake score gets k as extra conditioning to tell the K trajectory distributions apart.

    ``tau_min`` raises the lower end to max(σ_{k+1}, tau_min): near τ = 0 the teacher's and the fake's x̂₀
    both collapse onto x_τ, and the DMD normaliser would divide noise by ≈ 0.

    ``shift`` s ≠ 1 draws τ uniformly in the *unshifted* levels and shifts it: with ũ(σ) = σ / (s − (s − 1)·σ)
    (the inverse of the scheduler's shift σ = s·ũ / (1 + (s − 1)·ũ)), τ̃ ~ U(ũ(lo) + ``margin``, ũ(hi)) and
    τ = s·τ̃ / (1 + (s − 1)·τ̃) — more draws near 1 than the uniform; the released TDM-R1 code draws τ so with
    s = 3, margin 0.02 and the full interval (``tau_shift``, ``tau_margin``, ``tau=full``).
    """
    if u is None:
        u = torch.rand(k.shape, generator=generator)
    lo = sigmas[k + 1].clamp_min(tau_min)
    if mode == "disjoint":
        hi = sigmas[k]
    elif mode == "full":
        hi = torch.ones_like(lo)
    else:
        raise ValueError(f"unknown tau mode {mode!r}; choose disjoint or full")
    return shifted_uniform(lo, hi, u, shift, margin)


def shifted_uniform(lo: torch.Tensor, hi: torch.Tensor, u: torch.Tensor, shift: float = 1.0,
                    margin: float = 0.0) -> torch.Tensor:
    """A level in [lo, hi] from u ~ U(0, 1): lo + u·(hi − lo) when ``shift`` is 1 and ``margin`` 0; otherwise
    uniform in the unshifted levels ũ(σ) = σ / (s − (s − 1)·σ) on [ũ(lo) + margin, ũ(hi)], then shifted back,
    σ = s·ũ / (1 + (s − 1)·ũ) (the flow scheduler's shift s; more levels near 1 for s > 1)."""
    if shift == 1.0 and margin == 0.0:
        return lo + u * (hi - lo)
    unshift = lambda x: x / (shift - (shift - 1.0) * x)  # noqa: E731
    hi_u = unshift(hi)
    lo_u = torch.minimum(unshift(lo) + margin, hi_u)
    t = lo_u + u * (hi_u - lo_u)
    return shift * t / (1.0 + (shift - 1.0) * t)


# ------------------------------------------------------------------------------------------- generator

def dmd_normaliser(x0_student: torch.Tensor, x0_teacher: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """DMD's per-sample normaliser n = mean_over_dims |x̂₀^student − x̂₀^teacher| (B,), detached."""
    dims = tuple(range(1, x0_student.ndim))
    return (x0_student - x0_teacher).abs().mean(dim=dims).detach().clamp_min(eps)


def generator_loss(x0_student: torch.Tensor, x0_teacher: torch.Tensor, x0_fake: torch.Tensor,
                   distance: str = "l2", huber_c: float = 0.03, normalise: bool = True) -> torch.Tensor:
    """The student's TDM loss on its grad-enabled clean prediction x̂₀ (B, C, h, w):

        target = sg[ x̂₀ + (x̂₀^teacher,CFG(x_τ) − x̂₀^fake(x_τ)) / n ],
        L = mean_B d(x̂₀, target),

    with n the DMD normaliser (:func:`dmd_normaliser`, 1 when ``normalise`` is off) and d either
    ``l2``: ½·mean_dims ‖x̂₀ − target‖², whose gradient in x̂₀ is −(x̂₀^teacher − x̂₀^fake)/(n·D) — exactly the
    KL gradient direction (fake score − teacher score) of distribution matching, pushed through x̂₀ —
    or ``huber``: the pseudo-Huber distance √(mean_dims ‖x̂₀ − target‖² + c²) − c, which bounds the step
    size for outliers. The teacher and fake predictions must be computed without gradient.
    """
    return regression_loss(x0_student, distribution_matching_direction(x0_student, x0_teacher, x0_fake, normalise),
                           distance, huber_c)


def distribution_matching_direction(x0_student: torch.Tensor, x0_teacher: torch.Tensor, x0_fake: torch.Tensor,
                                    normalise: bool = True, x0_normaliser: torch.Tensor | None = None) -> torch.Tensor:
    """TDM's direction (x̂₀^teacher − x̂₀^fake) / n, n the DMD normaliser mean|x̂₀ − x̂₀^ref| with x̂₀^ref =
    ``x0_normaliser`` (default: ``x0_teacher``; 1 when ``normalise`` is off). x̂₀^teacher is the guided teacher
    (``objective.dm_target=guided``) or its conditional prediction (``conditional``, normalised against the
    guided one, as the released TDM-R1 code does)."""
    ref = x0_teacher if x0_normaliser is None else x0_normaliser
    n = dmd_normaliser(x0_student, ref) if normalise else torch.ones(len(x0_student), device=x0_student.device)
    return ((x0_teacher - x0_fake) / _b(n, x0_student)).detach()


def cfg_direction(x0_student: torch.Tensor, x0_guided: torch.Tensor, x0_conditional: torch.Tensor,
                  normalise: bool = True) -> torch.Tensor:
    """The CFG direction (x̂₀^teacher,CFG − x̂₀^teacher) / n = (w − 1)(x̂₀^c − x̂₀^u) / n at CFG scale w, n the DMD
    normaliser against the guided teacher. With distribution matching towards the conditional teacher,
    dm + λ·cfg moves the student towards the teacher at CFG 1 + λ(w − 1) (up to the fake score)."""
    return distribution_matching_direction(x0_student, x0_guided, x0_conditional, normalise)


def regression_loss(x0_student: torch.Tensor, direction: torch.Tensor, distance: str = "l2",
                    huber_c: float = 0.03) -> torch.Tensor:
    """Regress the student's grad-enabled x̂₀ onto the stop-gradient target x̂₀ + ``direction``:
    ``l2``: L = mean_B ½·mean_dims ‖x̂₀ − sg[x̂₀ + d]‖², whose gradient in x̂₀ is −d/D (the student moves along
    d); ``huber``: mean_B √(mean_dims ‖·‖² + c²) − c. No noise is added and no denoising target is used: this is
    the only loss TDM and TDM-R1 apply to the student."""
    target = (x0_student + direction).detach()
    sq = ((x0_student - target) ** 2).flatten(1).mean(dim=1)
    if distance == "l2":
        return 0.5 * sq.mean()
    if distance == "huber":
        return ((sq + huber_c ** 2).sqrt() - huber_c).mean()
    raise ValueError(f"unknown distance {distance!r}; choose l2 or huber")


# ------------------------------------------------------------------------------------------- TDM-R1

def bridge_velocity(x_t: torch.Tensor, t: torch.Tensor, x_tau: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """The velocity target of the η = 0 bridge from a trajectory point x_t (level t) to x_τ (level τ > t):

        v* = (x_τ − x_t) / (τ − t),

    the constant velocity of the straight path through both points (v = dx_σ/dσ). At t = 0 (x_t = x₀,
    x_τ = (1 − τ)·x₀ + τ·ε) it is ε − x₀, the ordinary flow-matching target; for t > 0 its mean given x_τ is
    *not* the flow's velocity at x_τ (it is the straight line to E[x_t | x_τ]), and its noise coefficient
    b/(τ − t) grows as √(2t / ((1 − t)(τ − t))) when τ → t. ``surrogate.target=bridge``; the default is
    :func:`flow_velocity_target`."""
    return (x_tau - x_t) / _b((tau - t).clamp_min(1e-4), x_t)


def flow_velocity_target(x_t: torch.Tensor, t: torch.Tensor, x_tau: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """The flow-matching velocity target at x_τ ~ q(x_τ | x_t) (:func:`transition_sample`, x_τ = a·x_t + b·z):
    the velocity v = ε̂ − x̂₀ implied by the denoising-score target ε̂ = −τ·∇log q(x_τ | x_t) = τ·(x_τ − a·x_t)/b²
    with x̂₀ = (x_τ − τ·ε̂)/(1 − τ):

        v* = −x_t / (1 − t) + (x_τ − a·x_t) · (τ + a·t² / (1 − t)) / b²,   a = (1 − τ)/(1 − t), b² = τ² − a²t².

    Denoising score matching makes its mean given x_τ the flow's own velocity there, whatever the distribution
    of x_t: the base is the Bayes-optimal predictor of it, so ℓ_φ − ℓ_ref measures only what the surrogate
    learned. At t = 0 it is ε − x₀ (= :func:`bridge_velocity`); its noise coefficient is half the bridge's as
    τ → t. The released TDM-R1 code's surrogate target (``surrogate.target=velocity``)."""
    a, b = transition_coefficients(t, tau)
    a, b2, t_, tau_ = _b(a, x_t), _b(b.square().clamp_min(1e-8), x_t), _b(t, x_t), _b(tau, x_t)
    return -x_t / (1.0 - t_) + (x_tau - a * x_t) * (tau_ + a * t_.square() / (1.0 - t_)) / b2


def level_above(t: torch.Tensor, u: torch.Tensor, t_min: float = 0.0, gap: float = 1e-3, shift: float = 1.0,
                margin: float = 0.0) -> torch.Tensor:
    """A level τ in [max(t, t_min), 1] from u ~ U[0, 1) (:func:`shifted_uniform`: uniform in σ by default, or
    uniform in the unshifted levels from ũ(max(t, t_min)) + ``margin`` before a ``shift``), kept at least ``gap``
    above t (a bridge from t to τ needs τ > t) and at most 1 — where TDM-R1 diffuses a point of level t. The
    released code: shift 3, margin 0.02 (its "+20" timesteps of 1000)."""
    lo = t.clamp_min(t_min)
    return torch.maximum(shifted_uniform(lo, torch.ones_like(lo), u, shift, margin), t + gap).clamp_max(1.0)


def reward_direction(x0_student: torch.Tensor, x0_surrogate_cfg: torch.Tensor,
                     x0_base: torch.Tensor) -> torch.Tensor:
    """TDM-R1's reward direction: (x̂₀^{surrogate,CFG}(x_τ′) − x̂₀^{base}(x_τ′)) / n with the detached per-sample
    n = mean_dims |x̂₀^student − x̂₀^{surrogate,CFG}| (the DMD normaliser against the surrogate)."""
    n = dmd_normaliser(x0_student, x0_surrogate_cfg)
    return ((x0_surrogate_cfg - x0_base) / _b(n, x0_student)).detach()


def r1_generator_direction(reward: torch.Tensor, cfg: torch.Tensor, dm: torch.Tensor, early: torch.Tensor,
                           reward_weight: float, cfg_weight: float, dm_weight: float, late_cfg_weight: float,
                           late_dm_weight: float) -> torch.Tensor:
    """TDM-R1's generator direction per sample: d = w_R·reward + w_C·CFG + w_D·dm, the early weights
    (w_R, w_C, w_D) where ``early`` (the sample's step k < ``r1.trunc_steps``), else (0, late w_C, late w_D):
    past the truncation the reward term is off (the released recipe's split of the student's steps). The
    student's loss is :func:`regression_loss` onto x̂₀ + d — no denoising loss is ever applied to it."""
    def w(early_weight: float, late_weight: float) -> torch.Tensor:
        return torch.where(early, early_weight, late_weight).view(-1, 1, 1, 1).to(dm.dtype)
    return w(reward_weight, 0.0) * reward + w(cfg_weight, late_cfg_weight) * cfg + w(dm_weight, late_dm_weight) * dm


# ------------------------------------------------------------------------------------------- fake score

def log_importance_weight(x_t: torch.Tensor, x_s: torch.Tensor, x0: torch.Tensor, s: torch.Tensor,
                          t: torch.Tensor) -> torch.Tensor:
    """log w for the fake score's denoising loss on student trajectory points (per sample, (B,)):

        w = q(x_t | x̂₀) / q(x_t | x_s),   q(x_t | x̂₀) = N((1 − t)·x̂₀, t²·I),   q(x_t | x_s) = N(a·x_s, b²·I).

    x_t was drawn from the trajectory kernel q(· | x_s) (x_s = x_{σ_{k+1}}, the student's point), but the
    fake score is trained with the ordinary x̂₀-denoising loss, whose samples should come from q(· | x̂₀)
    (x̂₀ = the student's clean prediction of that step): the ratio corrects the proposal (importance
    sampling). Computed in log space: log N(x; m, v·I) = −‖x − m‖²/(2v) − (D/2)·log(2πv).
    """
    a, b = transition_coefficients(s, t)
    d = x_t[0].numel()

    def log_normal(x, mean, std):
        var = std.clamp_min(1e-12) ** 2
        return -((x - mean) ** 2).flatten(1).sum(1) / (2 * var) - 0.5 * d * torch.log(2 * math.pi * var)

    log_p = log_normal(x_t, _b(1 - t, x0) * x0, t)
    log_q = log_normal(x_t, _b(a, x_s) * x_s, b)
    return log_p - log_q


def normalise_weights(log_w: torch.Tensor, mode: str = "self_normalized", dim: int = 1) -> torch.Tensor:
    """Weights from log w (per sample, detached), all with batch mean 1:

    - ``self_normalized``: w_i = B·exp(log w_i)/Σ_j exp(log w_j) — the self-normalised importance-sampling
      estimator of the exact ratio (no overflow). In D dimensions log w has a spread of order √D, so the
      batch weight concentrates on few samples (logged as ``ess``, the effective sample size / B);
    - ``per_dim``: w_i ∝ exp(log w_i / D), the per-dimension geometric mean of the exact ratio (the tempered
      weight the TDM reference implementation uses: a ratio of exp(−½·mean_dims(noise²)) terms), rescaled to
      batch mean 1 — much lower variance, biased;
    - ``none``: 1 (plain denoising loss on the trajectory points).
    """
    if mode == "self_normalized":
        return (len(log_w) * torch.softmax(log_w.double(), dim=0)).to(log_w.dtype).detach()
    if mode == "per_dim":
        return (len(log_w) * torch.softmax(log_w.double() / dim, dim=0)).to(log_w.dtype).detach()
    if mode == "none":
        return torch.ones_like(log_w)
    raise ValueError(f"unknown importance mode {mode!r}; choose self_normalized, per_dim or none")


def fake_score_loss(v_fake: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor,
                    weights: torch.Tensor) -> torch.Tensor:
    """The fake score's importance-weighted flow-matching (x̂₀-denoising) loss:

        L_fake = mean_B w · mean_dims ‖v_ψ(x_t, t) − (x_t − x̂₀)/t‖²,

    the velocity form of ‖x̂₀^ψ(x_t) − x̂₀‖²/t² (x̂₀^ψ = x_t − t·v_ψ): the minimiser is the fake x̂₀-predictor of
    the student's diffused trajectory distribution. ``x0`` and ``weights`` are constants.
    """
    target = (x_t - x0.detach()) / _b(t, x_t).clamp_min(1e-4)
    per = ((v_fake - target) ** 2).flatten(1).mean(dim=1)
    return (weights.detach() * per).mean()


def teacher_regulariser(v_fake: torch.Tensor, v_teacher: torch.Tensor) -> torch.Tensor:
    """R = mean_B mean_dims ‖v_ψ(x_τ, τ) − v_teacher(x_τ, τ)‖² (the teacher's conditional velocity, a constant):
    added to the fake score's loss with weight ``fake.teacher_reg`` it keeps the fake score near the teacher where
    the student's samples say little (the released TDM-R1 code: 0.02). Its gradient in v_ψ is 2(v_ψ − v_teacher)/N."""
    return ((v_fake - v_teacher.detach()) ** 2).flatten(1).mean(dim=1).mean()
