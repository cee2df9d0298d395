"""TDM-R1's stepwise surrogate reward (arXiv 2603.07700): a LoRA on the student's backbone that learns, with
DGPO's group preference loss, which points of the student's own deterministic trajectories lead to better
final images — a dense, differentiable stand-in for a reward that is neither (the shapes verifier, OCR, a
human label). A component of its own: any loop that has deterministic trajectories, their final rewards and
groups can train one (the TDM-R1 recipe, :mod:`tdm_r1.reinforce`; ``tdm-r1 surrogate`` trains one alone).

One update, on a batch of G rollouts for each of P prompts (group g = the rollouts of one prompt):

1. A = group advantages of the final rewards (:func:`dgpo.methods.batch.score_groups`: normalised per group
   and clipped). Along a deterministic trajectory every point carries its final image's reward:
   r(x_{t_k}) = E[r(x₀) | x_{t_k}] = r(x₀) (the paper's Eq. 6), so the same A labels every point.
2. A step k ∈ {1, …, K} with P(k) ∝ k (``k_draw``: one per group by default, or per sample / per batch) and its
   point x_{t_k} (t_k = σ_k; k = K is the clean sample); τ in [max(t_k, t_min), 1], uniform in the unshifted
   levels from ``tau_margin`` above max(t_k, t_min) before a shift of ``tau_shift`` (uniform in σ with 1 and
   0), and the noise z shared by the group; x_τ = a·x_{t_k} + b·z (:func:`tdm_r1.objectives.transition_sample`).
3. ℓ_φ,i = mean ‖v_φ(x_τ, τ, c) − v*‖² with v* the flow-matching velocity target of q(x_τ | x_{t_k})
   (:func:`tdm_r1.objectives.flow_velocity_target`, whose mean given x_τ is the flow's velocity; ε − x₀ at
   t_k = 0), or the straight-line bridge (x_τ − x_{t_k}) / (τ − t_k) (``target=bridge``); ℓ_ref,i the same for
   the reference (the base: every adapter off; or an EMA of φ).
4. L = ``dgpo_loss``(ℓ_φ, ℓ_ref, A·w?, groups, β) with the weight w = k/K entering per ``k_weight``:
   multiplying each group's loss (default) or each sample's term inside its group sum; optional stabilisers
   (a PPO-style clip of ℓ_φ against an EMA "old" surrogate, :func:`dgpo.methods.dgpo.clip_to_old`, and
   ``kl_weight``·mean ‖v_φ − v_ref‖²).

Its implicit reward at a point, r_φ(x_{t_k}) = −(ℓ_φ − ℓ_ref) averaged over draws of τ and z, is 0 for the
untrained surrogate (LoRA B = 0) and ranks trajectory points once trained (:meth:`SurrogateReward.implicit_reward`).
The generator update reads the surrogate's CFG-guided x̂₀ (:meth:`SurrogateReward.x0`).

The paper leaves open where k/K enters and how k and τ are drawn; each is a config key
(:class:`SurrogateConfig`) whose help says whose choice the default is.

On several processes (:mod:`dgpo.runtime.processes`) each holds its rows of the global batch: k, τ and z are drawn for
the global batch and each process keeps its rows, a group's sum in the DGPO loss runs over every process's
samples of it (``dgpo_loss``'s ``reduce_fn``), and the gradients are summed — the step one process takes on
the same batch.
"""

from __future__ import annotations

from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from dgpo.config import option
from dgpo.runtime.ema import EMA
from dgpo.methods.batch import per_sample_mse
from dgpo.methods.dgpo import clip_to_old
from dgpo.models.adapters import AdapterRoles
from dgpo.models.handle import FlowModel, PromptEmbeds
from dgpo.methods.losses import dgpo_loss
from dgpo.runtime.runtime import Runtime
from tdm_r1.objectives import (bridge_velocity, flow_velocity_target, level_above, transition_sample,
                               x0_from_velocity)

SURROGATE = "surrogate"
#: a replayed batch's tensors in a checkpoint (surrogate.replay)
REPLAY_FIELDS = ("states", "advantages", "group_ids", "tokens", "pooled", "rows")


@dataclass
class SurrogateConfig:
    """The stepwise surrogate reward (TDM-R1): a LoRA trained with DGPO's group loss on trajectory points."""
    lora_rank: int = option(32, "surrogate LoRA rank (a third adapter on the student's backbone)", min=1)
    lora_alpha: float = option(32.0, "surrogate LoRA alpha", min=0.0)
    lora_targets: str = option("attention", "surrogate LoRA layers", choices=("attention", "attention_ff"))
    lr: float = option(1e-4, "Adam learning rate of the surrogate", min=0.0)
    beta: float = option(100.0, "β of the group DPO loss (DGPO's default)", min=0.0)
    normalization: str = option("group_size", "β/|g| (DGPO paper), none, or DGPO's released gradient-equivalent "
                                "scaling", choices=("group_size", "none", "gradient_equivalent"))
    t_min: float = option(0.0, "τ ~ U[max(t_k, t_min), 1]: lowest diffusion level of a trajectory point", min=0.0,
                          max=0.99)
    tau_shift: float = option(3.0, "τ uniform in the unshifted levels, then shifted by this (1: uniform in σ); the "
                              "released TDM-R1 code (scripts/train_tdmr1_pub.py): 3", min=1.0)
    tau_margin: float = option(0.02, "τ's lower end raised by this in the unshifted levels, so x_τ is never a "
                               "hair above x_{t_k}; the released code: 0.02 (20 of its 1000 timesteps)",
                               min=0.0, max=0.5)
    target: str = option("velocity", "the regression target at x_τ: the flow-matching velocity of q(x_τ | x_{t_k}) "
                         "(its mean is the flow's velocity at x_τ; the released code's), or the straight-line "
                         "bridge (x_τ − x_{t_k}) / (τ − t_k) (whose mean is not, for t_k > 0)",
                         choices=("velocity", "bridge"))
    k_draw: str = option("group", "draw the step k (and τ) per group, so a group's samples are compared at one "
                         "step, per sample, or once per batch (open in the paper; per group is our choice); or "
                         "always the clean sample k = K (last: DGPO's own points)",
                         choices=("group", "sample", "batch", "last"))
    k_weight: str = option("group", "where the weight k/K enters: each group's loss (our reading of the released "
                           "code's 'loss weighted by k/K'), or each sample's term inside its group sum",
                           choices=("group", "sample"))
    reference: str = option("base", "π_ref: the base (every adapter off) or an EMA of the surrogate",
                            choices=("base", "ema"))
    reference_ema_decay: float = option(0.99, "decay of the EMA reference (reference=ema)", min=0.0, max=1.0)
    clip_range: float = option(0.0, "PPO-style clip of ℓ_φ against an EMA 'old' surrogate (0 = off)", min=0.0)
    old_ema_decay: float = option(0.9, "decay of the 'old' surrogate EMA (clip_range > 0)", min=0.0, max=1.0)
    kl_weight: float = option(0.0, "weight of mean ‖v_φ − v_ref‖² (0 = off)", min=0.0)
    updates_per_iteration: int = option(1, "surrogate updates per generator update", min=1)
    draws_per_update: int = option(1, "M: independent draws of (k, τ, z) on the same rollouts in one update, their "
                                   "losses averaged — M× the (point, τ) pairs a rollout teaches, at M× the surrogate's "
                                   "compute (DGPO's M; the released code: 2, its num_train_timesteps slots)", min=1)
    replay: int = option(0, "R: each update also trains on the R most recent earlier batches (their trajectory points, "
                         "advantages and groups as labelled then; fresh draws of k, τ and z), the losses averaged — "
                         "more (point, τ) pairs per rollout, at (R + 1)× the surrogate's compute (ours; 0 = off)",
                         min=0)
    init: str = option("", "a surrogate LoRA folder to start from (written by `tdm-r1 surrogate`; empty: B = 0, "
                       "the base)")


def step_probabilities(k_max: int) -> torch.Tensor:
    """P(k) ∝ k for k = 1 … K (later, cleaner points more often)."""
    k = torch.arange(1, k_max + 1, dtype=torch.float64)
    return k / k.sum()


def group_draws(group_ids: torch.Tensor, shape: tuple[int, ...], gen: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """One uniform u and one standard normal z of ``shape`` per group, given to each of its samples: (B,), (B, *shape)."""
    groups, inverse = torch.unique(group_ids, return_inverse=True)
    u = torch.rand(len(groups), generator=gen)[inverse]
    return u, torch.randn((len(groups), *shape), generator=gen)[inverse]


def draw_steps(n: int, group_ids: torch.Tensor, k_max: int, mode: str, gen: torch.Generator) -> torch.Tensor:
    """k ∈ {1, …, K} per sample (n,), drawn per group, per sample or once, with P(k) ∝ k; or K for all (last)."""
    probs = step_probabilities(k_max)
    groups, inverse = torch.unique(group_ids, return_inverse=True)
    if mode == "last":
        return torch.full((n,), k_max, dtype=torch.long)
    count = {"sample": n, "group": len(groups), "batch": 1}[mode]
    draws = torch.multinomial(probs, count, replacement=True, generator=gen) + 1
    if mode == "group":
        return draws[inverse]
    return draws if mode == "sample" else draws.expand(n)


class SurrogateReward:
    """The surrogate LoRA (role ``surrogate`` on ``adapters``' backbone), its optimiser and EMAs; trained on the
    ``processes`` a run was launched on."""

    role = SURROGATE    #: the adapter it trains
    prefix = "surrogate"  #: its checkpoint keys
    owns_parameters = True  #: its parameters are saved with it (not with a recipe's)

    def __init__(self, model: FlowModel, adapters: AdapterRoles, cfg: SurrogateConfig, runtime: Runtime,
                 seed: int = 0):
        self.model, self.adapters, self.cfg = model, adapters, cfg
        self.runtime, self.processes = runtime, runtime.processes
        self.params = self.trained_parameters(seed)
        self.optimizer = torch.optim.Adam(self.params, lr=cfg.lr, betas=(0.9, 0.999))
        self.emas: dict[str, EMA] = {}
        if cfg.reference == "ema":
            self.emas["ref"] = EMA(self.params, cfg.reference_ema_decay, warmup=False)
        if cfg.clip_range > 0:
            self.emas["old"] = EMA(self.params, cfg.old_ema_decay, warmup=False)
        #: the R most recent batches (surrogate.replay): (states, advantages, group_ids, embeds, rows), oldest first
        self.replayed: deque = deque(maxlen=cfg.replay)

    def trained_parameters(self, seed: int) -> list[torch.nn.Parameter]:
        """A new LoRA (B = 0: the base) on the backbone, its role ``surrogate``."""
        c = self.cfg
        return self.adapters.add(self.role, c.lora_rank, c.lora_alpha, self.model.lora_targets(c.lora_targets),
                                 seed=seed)

    # ------------------------------------------------------------------------------------------- models
    @contextmanager
    def active(self):
        with self.adapters.active(self.role):
            yield self.model

    def reference_velocity(self, x, sigma, embeds: PromptEmbeds) -> torch.Tensor:
        """v_ref without gradient: the base (every adapter off) or the surrogate's EMA."""
        with torch.no_grad():
            if self.cfg.reference == "base":
                with self.adapters.reference():
                    return self.model.velocity(x, sigma, embeds)
            with self.active(), self.emas["ref"].swapped_in():
                return self.model.velocity(x, sigma, embeds)

    def x0(self, x: torch.Tensor, sigma: torch.Tensor, embeds: PromptEmbeds, guidance_scale: float) -> torch.Tensor:
        """The surrogate's x̂₀ at (x, σ) with its own CFG (no gradient)."""
        with torch.no_grad(), self.active():
            return x0_from_velocity(x, sigma, self.model.guided_velocity(x, sigma, embeds, guidance_scale))

    # ------------------------------------------------------------------------------------------- points
    def points(self, states: torch.Tensor, sigmas: torch.Tensor, group_ids: torch.Tensor, gen: torch.Generator,
               rows: torch.Tensor | None = None):
        """Per sample: k, t_k, x_{t_k}, τ and x_τ (τ and z shared by a group, see the module docstring), drawn
        for the global batch whose groups are ``group_ids`` (n,); ``states`` (K + 1, B, C, h, w) are the
        trajectories of its ``rows`` (B,; default all), ``sigmas`` (K + 1,) their levels. ``k_all``: every
        global row's step."""
        k_max, b = states.shape[0] - 1, states.shape[1]
        rows = torch.arange(len(group_ids)) if rows is None else rows
        k_all = draw_steps(len(group_ids), group_ids, k_max, self.cfg.k_draw, gen)
        u, z = group_draws(group_ids, tuple(states.shape[2:]), gen)
        k = k_all[rows]
        t = sigmas[k].float()
        tau = self.level_above(t, u[rows])
        device = states.device
        x_t = states[k.to(device), torch.arange(b, device=device)]
        x_tau = transition_sample(x_t, t.to(device), tau.to(device), z[rows].to(device, states.dtype))
        return {"k": k, "t": t.to(device), "x_t": x_t, "tau": tau.to(device), "x_tau": x_tau, "k_max": k_max,
                "k_all": k_all}

    def level_above(self, t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """τ for trajectory points of level t from u ~ U(0, 1): in [max(t, t_min), 1] by tau_shift and tau_margin."""
        c = self.cfg
        return level_above(t, u, c.t_min, shift=c.tau_shift, margin=c.tau_margin)

    def target(self, p: dict) -> torch.Tensor:
        """v* at the points ``p`` (``surrogate.target``: :func:`flow_velocity_target` or :func:`bridge_velocity`)."""
        f = flow_velocity_target if self.cfg.target == "velocity" else bridge_velocity
        return f(p["x_t"], p["t"], p["x_tau"], p["tau"])

    def errors(self, p: dict, embeds: PromptEmbeds, grad: bool = True, target: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ℓ_φ (with grad), ℓ_ref and mean ‖v_φ − v_ref‖² per sample at the points ``p`` (``target``: their v*,
        when the caller has it already)."""
        target = self.target(p) if target is None else target
        v_ref = self.reference_velocity(p["x_tau"], p["tau"], embeds)
        with torch.set_grad_enabled(grad), self.active():
            v_phi = self.model.velocity(p["x_tau"], p["tau"], embeds)
        return per_sample_mse(target, v_phi), per_sample_mse(target, v_ref), per_sample_mse(v_phi, v_ref)

    # ------------------------------------------------------------------------------------------- training
    def loss(self, states: torch.Tensor, sigmas: torch.Tensor, advantages: torch.Tensor, group_ids: torch.Tensor,
             embeds: PromptEmbeds, gen: torch.Generator, rows: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, dict]:
        """This process's part of the surrogate's loss on one global batch of trajectories (see the module
        docstring) and the batch's diagnostics. ``advantages`` and ``group_ids`` (n,) are the global batch's;
        ``states`` and ``embeds`` those of its ``rows`` (default all). The DGPO term's value is the global one on
        every process; its gradient, and the KL term, are this process's share."""
        c, processes = self.cfg, self.processes
        group_ids = group_ids.cpu()
        n = len(group_ids)
        rows = torch.arange(n) if rows is None else rows
        p = self.points(states, sigmas, group_ids, gen, rows)
        target = self.target(p)
        if c.clip_range > 0:  # before ℓ_φ's graph: swapping the old weights in and out writes the parameters
            with torch.no_grad(), self.active(), self.emas["old"].swapped_in():
                loss_old = per_sample_mse(target, self.model.velocity(p["x_tau"], p["tau"], embeds))
        loss_phi, loss_ref, kl = self.errors(p, embeds, target=target)
        device = loss_phi.device
        adv = advantages.cpu()[rows].to(device)
        if c.clip_range > 0:
            loss_phi = clip_to_old(loss_phi, loss_old, adv, c.clip_range)
        weight_all = p["k_all"].double() / p["k_max"]  # k/K of every global row
        groups, dense_all = torch.unique(group_ids, return_inverse=True)  # global groups 0 … G−1, alike everywhere
        dense = dense_all[rows].to(device)
        if c.k_weight == "sample":
            group_loss = dgpo_loss(loss_phi, loss_ref, adv * weight_all[rows].to(device, adv.dtype), dense, c.beta,
                                   normalization=c.normalization, num_groups=len(groups),
                                   reduce_fn=processes.sum_across)
        else:  # each group's DGPO loss times its k/K (one k per group with k_draw=group)
            group_loss = torch.stack([
                dgpo_loss(loss_phi[dense == g], loss_ref[dense == g], adv[dense == g], dense[dense == g] - g, c.beta,
                          normalization=c.normalization, num_groups=1, reduce_fn=processes.sum_across)
                * weight_all[dense_all == g].mean().item()
                for g in range(len(groups))]).mean()
        kl_share = kl.sum() / n  # this process's part of the batch mean
        loss = group_loss + c.kl_weight * kl_share if c.kl_weight > 0 else group_loss
        gap = (loss_phi - loss_ref).detach()
        return loss, {"loss_surrogate": group_loss.item() + c.kl_weight * processes.sum(kl_share.item()),
                      "surrogate_margin": -processes.sum((adv * gap).sum().item()) / n,
                      "surrogate_k": p["k_all"].float().mean().item()}

    def update(self, states, sigmas, advantages, group_ids, embeds, gen, step: int, grad_clip: float = 1.0,
               rows: torch.Tensor | None = None) -> dict:
        """One Adam step of the surrogate on a global batch (this process's ``rows`` of it, see :meth:`loss`) and
        the ``replay`` batches before it: the mean of ``draws_per_update`` losses per batch, each at fresh draws of
        (k, τ, z), gradients accumulated one draw at a time and summed over the processes; its EMAs follow. A
        non-finite loss or gradient steps nothing and raises :class:`dgpo.runtime.nonfinite.NonFiniteStep` (on
        every process alike). The batch is then kept for replay."""
        batch = (states, advantages, group_ids, embeds, torch.arange(states.shape[1]) if rows is None else rows)
        batches = [batch, *self.replayed]
        n = self.cfg.draws_per_update * len(batches)
        self.optimizer.zero_grad(set_to_none=True)
        draws = []
        for b_states, b_adv, b_groups, b_embeds, b_rows in batches:
            for _ in range(self.cfg.draws_per_update):
                loss, stats = self.loss(b_states, sigmas, b_adv, b_groups, b_embeds, gen, b_rows)
                self.runtime.backward(loss / n)
                draws.append(stats)
        stats = {k: sum(d[k] for d in draws) / n for k in draws[0]}
        norm = self.runtime.optimizer_step(self.optimizer, self.params, stats["loss_surrogate"], grad_clip, "surrogate")
        for ema in self.emas.values():
            ema.update(step)
        if self.cfg.replay:
            self.replayed.append(batch)
        return {**stats, "grad_norm_surrogate": norm}

    @torch.no_grad()
    def implicit_reward(self, states: torch.Tensor, sigmas: torch.Tensor, k: int, embeds: PromptEmbeds,
                        gen: torch.Generator, draws: int = 4, rows: torch.Tensor | None = None,
                        n: int | None = None) -> torch.Tensor:
        """r_φ(x_{t_k}) = −mean over ``draws`` of (ℓ_φ − ℓ_ref) at every sample's step-k point, (B,); each draw
        puts every sample at the same τ, each with noise of its own (drawn for a global batch of ``n`` of which
        ``states`` are the ``rows``; default: these states are the whole batch)."""
        b = states.shape[1]
        rows = torch.arange(b) if rows is None else rows
        total = torch.zeros(b, device=states.device)
        for _ in range(draws):
            t = sigmas[k].float().expand(b)
            tau = self.level_above(t, torch.rand(1, generator=gen))
            z = torch.randn((n or b, *states.shape[2:]), generator=gen)[rows]  # (B, C, h, w)
            x_t = states[k]
            x_tau = transition_sample(x_t, t.to(x_t.device), tau.to(x_t.device), z.to(x_t.device, x_t.dtype))
            p = {"t": t.to(x_t.device), "x_t": x_t, "tau": tau.to(x_t.device), "x_tau": x_tau}
            loss_phi, loss_ref, _ = self.errors(p, embeds, grad=False)
            total -= loss_phi - loss_ref
        return total / draws

    @torch.no_grad()
    def ranking(self, states: torch.Tensor, sigmas: torch.Tensor, rewards: torch.Tensor, group_ids: torch.Tensor,
                embeds: PromptEmbeds, gen: torch.Generator, draws: int = 4, rows: torch.Tensor | None = None
                ) -> dict[int, float]:
        """How well the implicit reward orders trajectory points by their true final rewards: for each step
        k = 1 … K, the mean over groups (prompts) of Kendall's τ between r_φ(x_{t_k}) and the rewards of the
        group's samples (groups whose rewards are all equal are skipped; 0 = chance, 1 = the true order).
        ``rewards`` and ``group_ids`` are the global batch's, ``states`` its ``rows``; the same on every process."""
        from scipy.stats import kendalltau
        out = {}
        for k in range(1, states.shape[0]):
            implicit = self.processes.gather_rows(
                self.implicit_reward(states, sigmas, k, embeds, gen, draws, rows, len(rewards))).cpu().numpy()
            taus = []
            for g in torch.unique(group_ids):
                idx = (group_ids == g).cpu().numpy()
                r = rewards[torch.as_tensor(idx)].cpu().numpy()
                if r.max() > r.min():
                    tau = kendalltau(implicit[idx], r).statistic
                    taus.append(0.0 if tau != tau else float(tau))  # NaN (a constant implicit reward): no order
            out[k] = sum(taus) / len(taus) if taus else 0.0
        return out

    # ------------------------------------------------------------------------------------------- state
    def save(self, folder) -> None:
        """The surrogate as a diffusers-format LoRA folder (its rank and alpha with it)."""
        self.adapters.save_diffusers(SURROGATE, folder)

    def load(self, folder) -> None:
        """Start from a LoRA folder (:meth:`save`'s, ``tdm-r1 surrogate``'s), rescaled to this surrogate's α / r."""
        from dgpo.models.lora_io import read_lora_folder
        weights, scale = read_lora_folder(folder, "surrogate.init")
        self.adapters.load_scaled(SURROGATE, weights, scale, "surrogate.init")
        for ema in self.emas.values():
            ema.shadow = [p.detach().clone() for p in self.params]

    def state_tensors(self) -> tuple[dict, dict]:
        from dgpo.runtime.checkpoint import optimizer_to_flat
        p = self.prefix
        tensors = ({f"{p}.{k}": v.detach() for k, v in self.adapters.named_parameters(self.role)}
                   if self.owns_parameters else {})
        for name, ema in self.emas.items():
            tensors.update({f"{p}_{name}.{k}": v for k, v in ema.state_dict().items()})
        for i, (states, adv, groups, embeds, rows) in enumerate(self.replayed):
            fields = (states, adv, groups, embeds.tokens, embeds.pooled, rows)
            tensors.update({f"{p}_replay.{i}.{name}": t.detach().cpu().contiguous()
                            for name, t in zip(REPLAY_FIELDS, fields)})
        opt_t, opt_s = optimizer_to_flat(self.optimizer)
        tensors.update({f"{p}_opt.{k}": v for k, v in opt_t.items()})
        return tensors, {f"{p}_optimizer": opt_s, f"{p}_replayed": len(self.replayed)}

    @torch.no_grad()
    def load_state(self, tensors: dict, state: dict) -> None:
        from dgpo.runtime.checkpoint import optimizer_from_flat
        p = self.prefix
        if self.owns_parameters:
            for k, v in self.adapters.named_parameters(self.role):
                v.copy_(tensors[f"{p}.{k}"])
        for name, ema in self.emas.items():
            key = f"{p}_{name}."
            ema.load_state_dict({k[len(key):]: v for k, v in tensors.items() if k.startswith(key)})
        key = f"{p}_opt."
        sub = {k[len(key):]: v for k, v in tensors.items() if k.startswith(key)}
        optimizer_from_flat(self.optimizer, sub, state[f"{p}_optimizer"])
        self.replayed.clear()
        device = self.params[0].device
        for i in range(state.get(f"{p}_replayed", 0)):
            t = {name: tensors[f"{p}_replay.{i}.{name}"] for name in REPLAY_FIELDS}
            self.replayed.append((t["states"].to(device), t["advantages"], t["group_ids"],
                                  PromptEmbeds(t["tokens"].to(device), t["pooled"].to(device)), t["rows"]))
