"""DGPO as a method: ODE rollouts and its training signal on them (DGPO, arXiv 2510.08425, §3–4).

For each group g (one prompt, G clean samples x₀ from deterministic ODE rollouts) and each of M noise
levels:

1. draw one noise level σ_g from the timestep-clipped, shifted schedule — u ~ U[t_min, 1],
   σ_g = s·u / (1 + (s − 1)·u) — and one noise ε_g, both *shared by the group* (fresh per level), so the
   samples of a group are compared at the same point of the forward process;
2. x_σ,i = (1 − σ_g)·x₀,i + σ_g·ε_g, target v_i = ε_g − x₀,i;
3. ℓ_θ,i = mean‖v_i − v_θ(x_σ,i, σ_g, c)‖² (grad) and ℓ_ref,i the same for π_ref (no grad): the frozen
   base (LoRA adapters off) or an EMA of the policy;
4. L = dgpo_loss(ℓ_θ, ℓ_ref, A, groups, β) [+ β_KL·mean‖v_θ − v_ref‖²], averaged over the M levels.

Micro-batches hold whole groups, so accumulating their gradients gives the full-batch gradient exactly.
"""

from __future__ import annotations

import torch

from dgpo.runtime.ema import EMA
from dgpo.methods.objective import Objective
from dgpo.methods.batch import (RolloutBatch, group_noise_levels, group_shared_noise, local_micro_batches,
                               per_sample_mse)
from dgpo.models.handle import FlowModel, flow_interpolate
from dgpo.models.lora import adapters_disabled
from dgpo.methods.losses import dgpo_loss


def reference_velocity(model: FlowModel, x_sigma, sigma, embeds, cfg, ref_ema: EMA | None):
    """v_ref: the base with adapters disabled, or the EMA ('dynamic') reference; CFG optional."""
    context = adapters_disabled(model.transformer) if cfg.reference == "base" else ref_ema.swapped_in()
    with torch.no_grad(), context:
        if cfg.reference_cfg > 1.0:
            return model.guided_velocity(x_sigma, sigma, embeds, cfg.reference_cfg)
        return model.velocity(x_sigma, sigma, embeds)


def clip_to_old(loss_policy: torch.Tensor, loss_old: torch.Tensor, advantages: torch.Tensor, clip_range: float):
    """PPO-style trust region on the implicit log-ratio −(ℓ_θ − ℓ_old): once a sample has moved more than
    ``clip_range`` in the direction its advantage asks (ℓ down for A > 0, up for A < 0), its loss is held at
    the clipped value and stops pulling. Our reading of the released code's clip; off by default."""
    delta = loss_policy - loss_old
    clipped = loss_old + delta.clamp(-clip_range, clip_range)
    # Pessimistic choice as in PPO: the larger of the two per-sample DGPO terms A·(ℓ − ℓ_ref).
    return torch.where(advantages * delta < advantages * (clipped - loss_old), clipped, loss_policy)


def dgpo_backward(model: FlowModel, batch: RolloutBatch, cfg, shift: float, gen: torch.Generator,
                  micro_batch: int, backward, ref_ema: EMA | None = None, old_ema: EMA | None = None) -> dict:
    """Accumulate the gradient of the DGPO loss over ``batch`` (M noise levels, whole-group micro-batches).

    ``backward`` is the accelerator's backward. Returns diagnostics: the loss, mean |ℓ_θ − ℓ_ref|,
    the implicit reward margin Σ A (ℓ_ref − ℓ_θ) / N, and the KL term.
    """
    n = len(batch.latents)
    stats = {"loss": 0.0, "loss_gap": 0.0, "margin": 0.0, "kl": 0.0, "clip_frac": 0.0}
    device = batch.latents.device
    parts = local_micro_batches(batch, micro_batch)  # whole groups of the global batch, this process's rows
    total_groups = len(torch.unique(batch.all_group_ids))
    share = batch.share()
    for _ in range(cfg.timesteps_per_sample):
        sigma_all = group_noise_levels(batch, cfg.t_min, shift, gen).to(device)
        noise_all = group_shared_noise(batch, tuple(batch.latents.shape[1:]), gen).to(device)
        for idx, part_groups in parts:
            # The part's groups numbered 0..k−1 alike on every process (the part is global).
            k = len(part_groups)
            dense_ids = torch.searchsorted(part_groups, batch.group_ids[idx].cpu()).to(device)
            if len(idx) == 0:  # none of this process's rows: it still joins the part's group sums
                # under a sharded model it makes the part's calls too, in the same order, on a stand-in row
                stand_in = (stand_in_calls(model, batch, sigma_all, noise_all, cfg, ref_ema, old_ema)
                            if batch.processes.lockstep else 0.0)
                loss = dgpo_loss(torch.zeros(0, device=device, requires_grad=True), torch.zeros(0, device=device),
                                 torch.zeros(0, device=device), dense_ids, cfg.beta, normalization=cfg.normalization,
                                 num_groups=k, reduce_fn=batch.processes.sum_across) * (k / total_groups)
                loss = loss + 0.0 * stand_in  # weight 0: only its backward's gathers count
                backward(loss / cfg.timesteps_per_sample)
                stats["loss"] += loss.item() / cfg.timesteps_per_sample
                continue
            idx = idx.to(device)
            mb = batch.select(idx)
            sigma, noise = sigma_all[idx], noise_all[idx]
            x_sigma = flow_interpolate(mb.latents, noise, sigma)
            target = noise - mb.latents
            v_ref = reference_velocity(model, x_sigma, sigma, mb.embeds, cfg, ref_ema)
            loss_ref = per_sample_mse(target, v_ref)
            v_theta = model.velocity(x_sigma, sigma, mb.embeds)
            loss_policy = per_sample_mse(target, v_theta)
            if cfg.clip_range > 0 and old_ema is not None:
                with torch.no_grad(), old_ema.swapped_in():
                    loss_old = per_sample_mse(target, model.velocity(x_sigma, sigma, mb.embeds))
                clipped = clip_to_old(loss_policy, loss_old, mb.advantages, cfg.clip_range)
                stats["clip_frac"] += (clipped != loss_policy).float().sum().item() / max(n, 1) / cfg.timesteps_per_sample
                loss_policy = clipped
            # The loss of this part's groups (their sums over every process's rows), scaled so that the sum
            # over parts is the batch mean; each process's gradient is its share of that loss's gradient.
            loss = dgpo_loss(loss_policy, loss_ref, mb.advantages, dense_ids, cfg.beta,
                             normalization=cfg.normalization, num_groups=k,
                             reduce_fn=batch.processes.sum_across) * (k / total_groups)
            kl = per_sample_mse(v_theta, v_ref).sum() / batch.global_size if cfg.kl_weight > 0 else torch.zeros(())
            backward((loss + cfg.kl_weight * kl) / cfg.timesteps_per_sample)
            with torch.no_grad():
                gap = (loss_policy - loss_ref)
                stats["loss"] += loss.item() / cfg.timesteps_per_sample
                stats["loss_gap"] += gap.abs().sum().item() / max(n, 1) / cfg.timesteps_per_sample
                stats["margin"] += -(mb.advantages * gap).sum().item() / max(n, 1) / cfg.timesteps_per_sample
                stats["kl"] += kl.item() / share / cfg.timesteps_per_sample
    return stats


def stand_in_calls(model, batch: RolloutBatch, sigma_all, noise_all, cfg, ref_ema, old_ema) -> torch.Tensor:
    """The model calls of one part of :func:`dgpo_backward` on row 0 (reference, policy, old policy): under a
    sharded model a process with no row in the part makes them anyway. Returns a policy output to add with
    weight 0 to the loss, so the backward runs through the model too."""
    mb = batch.select(torch.zeros(1, dtype=torch.long, device=batch.latents.device))
    sigma, noise = sigma_all[:1], noise_all[:1]
    x_sigma = flow_interpolate(mb.latents, noise, sigma)
    batch.processes.standing_in = True  # not the method's transformer evaluations
    try:
        reference_velocity(model, x_sigma, sigma, mb.embeds, cfg, ref_ema)
        policy = model.velocity(x_sigma, sigma, mb.embeds).sum()
        if cfg.clip_range > 0 and old_ema is not None:
            with torch.no_grad(), old_ema.swapped_in():
                model.velocity(x_sigma, sigma, mb.embeds)
    finally:
        batch.processes.standing_in = False
    return policy


class DGPO(Objective):
    name = "dgpo"
    label = "DGPO"

    def __init__(self, cfg, model, params, shift):
        super().__init__(cfg, model, params, shift)
        o = cfg.objective
        # Checkpoint names "ref" and "old" (the format of runs written before objectives were pluggable).
        self._emas = {}
        if o.reference == "ema":
            self._emas["ref"] = EMA(params, o.reference_ema_decay, warmup=False)
        if o.clip_range > 0:
            self._emas["old"] = EMA(params, o.old_ema_decay, warmup=False)

    def emas(self) -> dict[str, EMA]:
        return self._emas

    def backward(self, batch: RolloutBatch, gen, backward) -> dict:
        return dgpo_backward(self.model, batch, self.cfg.objective, self.shift, gen, self.cfg.optim.micro_batch,
                             backward, self._emas.get("ref"), self._emas.get("old"))
