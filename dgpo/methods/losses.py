"""Training objectives as pure functions of tensors.

DGPO — Direct Group Preference Optimization (Luo et al., arXiv 2510.08425)
--------------------------------------------------------------------------
A group of samples x_1..x_n is drawn for one prompt c, each gets a reward, and the rewards become
group-normalised advantages A_i (:func:`group_advantages`). DGPO turns the group into a *preference*
between its positive part G⁺ = {i : A_i > 0} and its negative part G⁻ = {i : A_i < 0} and fits it with a
Bradley–Terry / DPO objective, so no likelihoods, no SDE rollouts and no per-step trajectories are needed.
:func:`dgpo_loss` computes it from per-sample flow-matching errors; see its docstring for the derivation.

Everything here is a pure function: tensors in, tensors out, no module state, no distributed calls (the
one hook for groups that span processes is the ``reduce_fn`` argument of :func:`dgpo_loss`).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from dgpo.runtime.nonfinite import NonFiniteValues

__all__ = ["NORMALIZATIONS", "ADVANTAGE_STDS", "group_sums", "group_advantages", "dgpo_loss", "flow_grpo_loss",
           "diffusion_dpo_loss", "nft_optimality", "nft_loss"]

#: Allowed values of ``dgpo_loss(normalization=...)``.
NORMALIZATIONS: tuple[str, ...] = ("group_size", "none", "gradient_equivalent")
#: Allowed values of ``group_advantages(std=...)``.
ADVANTAGE_STDS: tuple[str, ...] = ("group", "batch", "none")


# ------------------------------------------------------------------------------------------------ helpers

def _check_vector(name: str, x, fn: str, *, finite: bool = True, allow_empty: bool = False) -> torch.Tensor:
    """``x`` must be a 1-D floating tensor (B,) with B ≥ 1 (B = 0 with ``allow_empty``) and (optionally) only
    finite values."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{fn}: {name} must be a torch.Tensor of shape (B,), got {type(x).__name__}")
    if x.ndim != 1 or (x.shape[0] == 0 and not allow_empty):
        raise ValueError(f"{fn}: {name} must have shape (B,) with B >= 1, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{fn}: {name} must be a floating-point tensor, got dtype {x.dtype}")
    if finite and not bool(torch.isfinite(x.detach()).all()):
        bad = int((~torch.isfinite(x.detach())).sum())
        raise NonFiniteValues(
            f"{fn}: {name} has NaN/inf values ({bad} of {x.shape[0]}) — check the learning rate, the "
            "rewards and the inputs, or turn bf16/fp16 autocast off for the loss")
    return x


def _check_ids(group_ids, batch: int, device, fn: str) -> torch.Tensor:
    """``group_ids`` as an integer tensor (B,) on ``device``."""
    ids = torch.as_tensor(group_ids, device=device)
    if ids.ndim != 1 or ids.shape[0] != batch:
        raise ValueError(
            f"{fn}: group_ids must have shape ({batch},) like the per-sample values, got {tuple(ids.shape)}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"{fn}: group_ids must be an integer tensor (one id per prompt group), got {ids.dtype}")
    return ids.long()


def group_sums(values: torch.Tensor, group_ids, num_groups: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-group sums of a per-sample vector: S_g = Σ_{i : id_i = g} v_i, differentiable in ``values``.

    Args:
        values: (B,) floating tensor.
        group_ids: (B,) integer ids saying which samples share a prompt.
        num_groups: ``None`` — ids are arbitrary integers (any order, not necessarily contiguous); the
            groups are the distinct ids in increasing order (``torch.unique``). An int G — ids are *global*
            ids in [0, G) and the outputs are dense (G,) tensors (groups absent from this batch get sum 0
            and size 0), which is the layout an all-reduce across processes needs.

    Returns:
        ``(sums, sizes, inverse)``: ``sums`` (G,) in ``values``' dtype (gradients flow back to ``values``
        through ``index_add``), ``sizes`` (G,) sample counts as floats of the same dtype (so they can be
        all-reduced with the sums and divided without casts), and ``inverse`` (B,) the row of each sample
        in ``sums`` (``sums[inverse]`` broadcasts a group statistic back to its samples).
    """
    fn = "group_sums"
    if not isinstance(values, torch.Tensor) or values.ndim != 1:
        raise ValueError(f"{fn}: values must be a tensor of shape (B,), got "
                         f"{tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__}")
    ids = _check_ids(group_ids, values.shape[0], values.device, fn)
    if num_groups is None:
        _, inverse = torch.unique(ids, sorted=True, return_inverse=True)
        n = int(inverse.max()) + 1 if inverse.numel() else 0
    else:
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
            raise ValueError(f"{fn}: num_groups must be a positive int or None, got {num_groups!r}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_groups):
            raise ValueError(
                f"{fn}: with num_groups={num_groups} the group_ids must be global ids in [0, {num_groups}), "
                f"got ids in [{int(ids.min())}, {int(ids.max())}]")
        inverse, n = ids, num_groups
    sums = values.new_zeros(n).index_add(0, inverse, values)
    sizes = values.new_zeros(n).index_add(0, inverse, torch.ones_like(values.detach()))
    return sums, sizes, inverse


# ------------------------------------------------------------------------------------------------ advantages

def group_advantages(rewards, group_ids, std: str = "group", eps: float = 1e-4,
                     clip: float | None = 5.0) -> torch.Tensor:
    """Group-normalised advantages (DGPO / GRPO): A_i = (r_i − mean_g r) / (σ + eps), clipped to ±clip.

    mean_g r is the mean reward of sample i's group g (the samples that share its prompt) and σ is

    * ``std="group"``: the population std of group g, σ_g = sqrt(mean_g (r − mean_g r)²);
    * ``std="batch"``: the population std of all B rewards (one σ for the batch, as some Flow-GRPO
      variants use: groups with a small spread keep small advantages);
    * ``std="none"``: no division, A_i = r_i − mean_g r.

    Properties: Σ_{i∈g} A_i = 0 for every group before clipping (what makes the DGPO group preference
    well defined, see :func:`dgpo_loss`; a standardised group of n samples has |A| ≤ sqrt(n − 1), so the
    default clip at 5 only acts on groups of more than 26 samples or with ``std="batch"/"none"``); adding a
    constant to the rewards of a group leaves its advantages unchanged (for ``std="group"`` and
    ``"none"``); a group whose rewards are all equal (including a group of one sample) gets A = 0
    *exactly* — it carries no preference and contributes no gradient.

    Args:
        rewards: (B,) rewards (tensor, numpy array or list); float64 stays float64, others become float32.
        group_ids: (B,) integer prompt-group ids (any order, unequal sizes, arbitrary integers).
        std: ``"group"``, ``"batch"`` or ``"none"``.
        eps: added to σ before dividing (≥ 0).
        clip: clamp A to [−clip, clip]; ``None`` or 0 disables clipping.

    Returns:
        (B,) advantages, detached (they are constants of the policy update), on ``rewards``' device.

    When a prompt group is split across processes, all-gather the (B,) rewards and ids first (a few floats)
    and compute the advantages on the whole batch: the statistics are then exactly the single-process ones.
    """
    fn = "group_advantages"
    r = torch.as_tensor(rewards).detach()
    if not r.is_floating_point():
        r = r.float()
    _check_vector("rewards", r, fn)
    if std not in ADVANTAGE_STDS:
        raise ValueError(f"{fn}: std={std!r} is not allowed; choose one of {list(ADVANTAGE_STDS)}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"{fn}: eps must be a finite number >= 0, got {eps!r}")
    if clip is not None and not (isinstance(clip, (int, float)) and math.isfinite(clip) and clip >= 0):
        raise ValueError(f"{fn}: clip must be None or a finite number >= 0, got {clip!r}")

    sums, sizes, inv = group_sums(r, group_ids)
    centred = r - (sums / sizes)[inv]                                   # r_i − mean_g r
    n_groups = sums.shape[0]
    # A group is constant iff its max equals its min (exact; the mean of equal floats may not be exact).
    g_max = r.new_full((n_groups,), -math.inf).scatter_reduce(0, inv, r, "amax")
    g_min = r.new_full((n_groups,), math.inf).scatter_reduce(0, inv, r, "amin")
    constant = (g_max == g_min)[inv]

    if std == "group":
        sq, _, _ = group_sums(centred.square(), inv, n_groups)
        sigma = (sq / sizes).sqrt()[inv]                                # population std of the group
        adv = centred / (sigma + eps)
    elif std == "batch":
        adv = centred / (r.std(unbiased=False) + eps)
    else:
        adv = centred
    adv = torch.where(constant, torch.zeros_like(adv), adv)
    if clip:
        adv = adv.clamp(-clip, clip)
    return adv


# ------------------------------------------------------------------------------------------------ DGPO loss

def dgpo_loss(loss_policy: torch.Tensor, loss_ref: torch.Tensor, advantages: torch.Tensor, group_ids,
              beta: float, normalization: str = "group_size", *, num_groups: int | None = None,
              reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    r"""The DGPO group-preference loss: mean over groups g of softplus(β/|g| · Σ_{i∈g} A_i (ℓ_θ,i − ℓ_ref,i)).

    Inputs, all (B,): ``loss_policy`` ℓ_θ,i — the flow-matching error ‖v_target − v_θ(x_t, t, c)‖² of
    sample i averaged over its elements (carries the gradient); ``loss_ref`` ℓ_ref,i — the same error of
    the frozen reference at the *same* noise and timestep (treated as a constant: it is detached);
    ``advantages`` A_i — group-normalised advantages (:func:`group_advantages`; detached); ``group_ids``
    — which samples share a prompt (any order, unequal sizes, arbitrary integer ids).

    Derivation (DGPO, arXiv 2510.08425, Eq. 8–17 in the numbering of arXiv v1; the closed form below is
    derived here from those definitions, not copied from any code):

    1. Diffusion-DPO implicit reward (Wallace et al., arXiv 2311.12908):
       r_θ(x, c) = β·log(p_θ(x|c) / p_ref(x|c)) + β·log Z(c).
       Bounding the log-likelihood ratio through the diffusion ELBO at one shared (t, noise) gives
       r_θ(x, c) ≈ −β·(ℓ_θ(x) − ℓ_ref(x)) + β·log Z(c), a positive time weight being absorbed into β.
    2. Group reward of a set of samples: R_θ(G|c) = Σ_{x∈G} |A(x)|·r_θ(x, c).
    3. Bradley–Terry preference G⁺ ≻ G⁻: L = −log σ(R_θ(G⁺|c) − R_θ(G⁻|c)).
       Since |A| = A on G⁺ and |A| = −A on G⁻,
       R_θ(G⁺|c) − R_θ(G⁻|c) = Σ_i A_i·r_θ(x_i, c) = −β Σ_i A_i (ℓ_θ,i − ℓ_ref,i) + β·log Z(c)·Σ_i A_i.
       Group-normalised advantages sum to zero over the group, so the intractable partition term
       β·log Z(c)·Σ_i A_i vanishes — this is why the group-level DPO is well defined with them.
    4. −log σ(u) = softplus(−u), hence per group L_g = softplus(β Σ_{i∈g} A_i (ℓ_θ,i − ℓ_ref,i)).
       Lowering the loss lowers ℓ_θ on positive samples and raises it on negative ones. We scale the
       sum by 1/|g| so that the scale of β does not depend on the group size, and average over groups:

           L = (1/n_groups) Σ_g softplus(z_g),   z_g = β/|g| · Σ_{i∈g} A_i (ℓ_θ,i − ℓ_ref,i).

       At θ = ref every z_g = 0 and L = log 2. The gradient is
       ∂L/∂ℓ_θ,i = (1/n_groups) · σ(z_g) · β · A_i / |g|.

    ``normalization``:
      * ``"group_size"`` (default): the formula above.
      * ``"none"``: no 1/|g| (z_g = β Σ_{i∈g} A_i (ℓ_θ,i − ℓ_ref,i)).
      * ``"gradient_equivalent"``: the variant of the authors' released code: the loss scaled so that its
        gradient at θ = ref equals that of the plain advantage-weighted regression
        (1/n_groups) Σ_g (1/|g|) Σ_{i∈g} A_i ℓ_θ,i, i.e. divided by σ'(·)·β evaluated as σ(0)·β = β/2:
        L = (1/n_groups) Σ_g (2/β)·softplus(z_g), with z_g as for ``"group_size"``. Its gradient is
        (1/n_groups)·2σ(z_g)·A_i/|g|, which is A_i/|g|/n_groups at θ = ref (softplus'(0) = 1/2), so the
        learning rate does not need retuning when β changes.

    Groups that span processes: pass ``num_groups`` G and *global* group ids in [0, G); the per-group
    sums Σ A_i(ℓ_θ,i − ℓ_ref,i) and sizes |g| are then computed into dense (G,) tensors and, if
    ``reduce_fn`` is given, replaced by ``reduce_fn(sums)`` and ``reduce_fn(sizes)`` before the softplus
    (a process may then hold no sample at all, B = 0). The trainers pass
    :meth:`dgpo.runtime.processes.Processes.sum_across`: an all-reduce sum whose backward is the identity. Every
    process computes the same global loss, the mean being over the groups with global size > 0; each
    process's gradient is the part of the global gradient that flows through its own samples, and summing
    the gradients over processes gives the single-process gradient exactly (a 2-process gloo run is checked
    against one process). An all-reduce whose backward also all-reduces (``torch.distributed.nn``'s) would
    instead give world_size times it. Without ``num_groups``/``reduce_fn`` the ids are arbitrary and the
    groups are those of this batch.

    Args:
        loss_policy, loss_ref, advantages: (B,) finite floating tensors (computation is done in at least
            float32, so bf16 inputs are upcast).
        group_ids: (B,) integer ids.
        beta: β > 0, the KL-regularisation strength of the implicit reward.
        normalization: one of :data:`NORMALIZATIONS`.
        num_groups: number of global groups (required with ``reduce_fn``).
        reduce_fn: callable applied to the dense (G,) sums and sizes (a sum all-reduce).

    Returns:
        A scalar tensor (differentiable w.r.t. ``loss_policy``).

    Raises:
        ValueError: shapes differ, a value is NaN/inf, β ≤ 0, an unknown ``normalization``, bad ids.
    """
    fn = "dgpo_loss"
    shared = reduce_fn is not None  # a process may hold no sample of these groups and still join the sums
    _check_vector("loss_policy", loss_policy, fn, allow_empty=shared)
    _check_vector("loss_ref", loss_ref, fn, allow_empty=shared)
    _check_vector("advantages", advantages, fn, allow_empty=shared)
    shapes = {n: tuple(t.shape) for n, t in
              (("loss_policy", loss_policy), ("loss_ref", loss_ref), ("advantages", advantages))}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"{fn}: loss_policy, loss_ref and advantages must all have the same shape (B,), "
                         f"got {shapes}")
    if isinstance(beta, torch.Tensor):
        beta = float(beta)
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"{fn}: beta must be a finite number > 0 (the DPO KL strength), got {beta!r}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"{fn}: normalization={normalization!r} is not allowed; "
                         f"choose one of {list(NORMALIZATIONS)}")
    if reduce_fn is not None and num_groups is None:
        raise ValueError(f"{fn}: reduce_fn needs num_groups and global group ids in [0, num_groups), "
                         "so that every process sums the same groups in the same slots")

    dtype = torch.promote_types(loss_policy.dtype, torch.float32)
    diff = (loss_policy.to(dtype) - loss_ref.detach().to(dtype)) * advantages.detach().to(dtype)
    sums, sizes, _ = group_sums(diff, group_ids, num_groups)            # Σ_{i∈g} A_i (ℓ_θ,i − ℓ_ref,i), |g|
    if reduce_fn is not None:
        sums, sizes = reduce_fn(sums), reduce_fn(sizes)
    present = sizes > 0
    sums, sizes = sums[present], sizes[present]
    if sums.numel() == 0:
        raise ValueError(f"{fn}: no group has any sample (all global group sizes are 0)")

    z = beta * sums if normalization == "none" else beta * sums / sizes
    per_group = F.softplus(z)                                           # −log σ(R(G⁺) − R(G⁻))
    if normalization == "gradient_equivalent":
        per_group = per_group * (2.0 / beta)
    return per_group.mean()


# ------------------------------------------------------------------------------------------------ baselines
# The losses of the baselines that run in the same trainer (dgpo/methods/). Pure functions of tensors, as
# above; the sampling side (SDE log-probabilities) is in dgpo/sampling/sde.py.

def _same_shape(fn: str, **tensors) -> None:
    shapes = {n: tuple(t.shape) for n, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"{fn}: inputs must all have the same shape, got {shapes}")


def flow_grpo_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                   clip_range: float, kl: torch.Tensor | None = None, kl_weight: float = 0.0
                   ) -> tuple[torch.Tensor, dict]:
    r"""Flow-GRPO's clipped-ratio objective on one denoising step of each trajectory (arXiv 2505.05470, §4.1,
    the GRPO objective of its Eq. for J_Flow-GRPO, with per-step ratios of the SDE policy of §4.2):

        ρ_i = exp(log π_θ(x_{t−1,i} | x_{t,i}, c) − log π_old(x_{t−1,i} | x_{t,i}, c))
        L   = mean_i max(−A_i·ρ_i, −A_i·clip(ρ_i, 1 − ε, 1 + ε)) + β_KL · mean_i KL_i

    i.e. the negative of PPO's pessimistic min(ρA, clip(ρ)A). ``kl`` (B,) is D_KL(π_θ ‖ π_ref) of the step's
    Gaussian transition (see :func:`dgpo.sampling.sde.gaussian_kl`). Returns the loss and diagnostics (mean ρ,
    fraction of clipped terms, approximate KL to π_old).

    Args:
        log_prob: (B,) log-probabilities under θ (carry the gradient).
        old_log_prob: (B,) log-probabilities stored at rollout time (constants).
        advantages: (B,) advantages (constants).
        clip_range: ε ≥ 0.
        kl: (B,) or None; kl_weight: β_KL ≥ 0.
    """
    fn = "flow_grpo_loss"
    _check_vector("log_prob", log_prob, fn)
    _check_vector("old_log_prob", old_log_prob, fn)
    _check_vector("advantages", advantages, fn)
    _same_shape(fn, log_prob=log_prob, old_log_prob=old_log_prob, advantages=advantages)
    if not (math.isfinite(clip_range) and clip_range >= 0):
        raise ValueError(f"{fn}: clip_range must be a finite number >= 0, got {clip_range!r}")
    adv = advantages.detach()
    log_ratio = log_prob - old_log_prob.detach()
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    if kl is not None and kl_weight > 0:
        _check_vector("kl", kl, fn)
        loss = loss + kl_weight * kl.mean()
    with torch.no_grad():
        stats = {"ratio": ratio.mean().item(), "ratio_dev": (ratio - 1).abs().max().item(),
                 "clip_frac": ((ratio - 1).abs() > clip_range).float().mean().item(),
                 "approx_kl_old": (0.5 * log_ratio ** 2).mean().item()}
    return loss, stats


def diffusion_dpo_loss(loss_policy_w: torch.Tensor, loss_ref_w: torch.Tensor, loss_policy_l: torch.Tensor,
                       loss_ref_l: torch.Tensor, beta: float) -> torch.Tensor:
    r"""Diffusion-DPO (Wallace et al., arXiv 2311.12908, Eq. 14), with flow-matching errors in place of the
    ε-prediction errors and the time weight T·ω(λ_t) absorbed into β:

        L = mean_pairs −log σ(−β · [(ℓ_θ(x^w) − ℓ_ref(x^w)) − (ℓ_θ(x^l) − ℓ_ref(x^l))])

    ℓ the per-sample mean-square velocity error at the noise level and noise shared by the pair; w the
    preferred ("winner") and l the rejected sample. At θ = ref the loss is log 2.

    All inputs (B,) with B the number of pairs; the reference errors are constants.
    """
    fn = "diffusion_dpo_loss"
    for name, t in (("loss_policy_w", loss_policy_w), ("loss_ref_w", loss_ref_w),
                    ("loss_policy_l", loss_policy_l), ("loss_ref_l", loss_ref_l)):
        _check_vector(name, t, fn)
    _same_shape(fn, loss_policy_w=loss_policy_w, loss_ref_w=loss_ref_w, loss_policy_l=loss_policy_l,
                loss_ref_l=loss_ref_l)
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"{fn}: beta must be a finite number > 0, got {beta!r}")
    inside = (loss_policy_w - loss_ref_w.detach()) - (loss_policy_l - loss_ref_l.detach())
    return F.softplus(beta * inside).mean()                            # −log σ(−β·inside)


def nft_optimality(advantages: torch.Tensor, clip: float) -> torch.Tensor:
    """DiffusionNFT's optimality probability r ∈ [0, 1] from advantages (arXiv 2509.16117, §3–4):
    r = 1/2 + 1/2·clip(A / clip, −1, 1); r = 1/2 (no preference) for A = 0."""
    if not (math.isfinite(clip) and clip > 0):
        raise ValueError(f"nft_optimality: clip must be a finite number > 0, got {clip!r}")
    return 0.5 + 0.5 * (advantages.detach() / clip).clamp(-1.0, 1.0)


def nft_loss(v_theta: torch.Tensor, v_old: torch.Tensor, target: torch.Tensor, r: torch.Tensor, beta: float,
             weight: torch.Tensor | None = None) -> torch.Tensor:
    r"""DiffusionNFT's negative-aware flow-matching loss (Zheng et al., arXiv 2509.16117, the implicit
    positive/negative policies of its §3.2 and the training objective built from them):

        v⁺ = (1 − β)·v_old + β·v_θ,   v⁻ = (1 + β)·v_old − β·v_θ
        L  = mean_i w_i·[ r_i·‖v⁺_i − v_i‖² + (1 − r_i)·‖v⁻_i − v_i‖² ]

    with v = ε − x₀ the flow-matching target at x_t = (1 − t)·x₀ + t·ε, v_old the sampling ("old") policy
    (a constant), r the optimality probability (:func:`nft_optimality`) and ‖·‖² the mean over elements.
    Positive samples pull the implicit positive policy v⁺ to the data, negative ones the implicit negative
    policy v⁻; at θ = old both equal v_old. ``weight`` (B,) is an optional per-sample weight (constant).

    Args: v_theta, v_old, target: (B, ...); r: (B,) in [0, 1]; beta > 0.
    """
    fn = "nft_loss"
    _same_shape(fn, v_theta=v_theta, v_old=v_old, target=target)
    _check_vector("r", r, fn)
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"{fn}: beta must be a finite number > 0, got {beta!r}")
    v_old = v_old.detach()
    pos = (1 - beta) * v_old + beta * v_theta
    neg = (1 + beta) * v_old - beta * v_theta
    err_pos = ((pos - target) ** 2).flatten(1).mean(1)
    err_neg = ((neg - target) ** 2).flatten(1).mean(1)
    r = r.detach()
    per = r * err_pos + (1 - r) * err_neg
    if weight is not None:
        per = per * weight.detach()
    return per.mean()
