"""Train a stepwise surrogate reward alone, on rollouts of a frozen few-step student (``tdm-r1 surrogate``).

A use of its own: the surrogate (:mod:`tdm_r1.surrogate`) learns which points of the student's deterministic
trajectories lead to a better final reward, and every ``eval_every`` updates its implicit reward is checked on
*fresh* rollouts of fixed evaluation prompts: per step k, the mean over prompts of Kendall's τ between the
implicit reward of the points and their true final rewards (0 = chance, 1 = the true order). The student never
changes. The result is a LoRA folder that ``tdm-r1 train`` can start from (``surrogate.init``).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from dgpo.runtime.nonfinite import NonFiniteStep


@torch.no_grad()
def ranking_on_fresh_rollouts(distiller, prompts: list[str], per_prompt: int, seed: int) -> dict[int, float]:
    """Kendall's τ per step k of the surrogate's implicit reward against the true rewards, on ``per_prompt``
    fresh rollouts of each prompt (noises from ``seed``, so every evaluation sees the same rollouts)."""
    d = distiller
    gen, d.gen = d.gen, torch.Generator().manual_seed(seed)
    try:
        flat = [p for p in prompts for _ in range(per_prompt)]
        r = d.rollout(flat)
        scored = d.score(r, flat, per_prompt)
        return d.surrogate.ranking(r.states, d.sigmas, scored.rewards, scored.group_ids, r.embeds,
                                   torch.Generator().manual_seed(seed + 1), rows=r.rows)
    finally:
        d.gen = gen


def train_surrogate(distiller, updates: int, eval_every: int, eval_prompts: int = 8, per_prompt: int = 16,
                    seed: int = 12345, progress: bool = True) -> list[dict]:
    """``updates`` surrogate updates on fresh student rollouts (``optim.batch_size`` of them, groups of
    ``r1.group_size``); returns one row per evaluation: ``{"update", "kendall_tau": {k: τ}, "mean"}`` (update 0 is
    the untrained surrogate, whose implicit reward is 0)."""
    d = distiller
    prompts = d.train_prompts[:eval_prompts]

    def evaluate(step: int) -> dict:
        taus = ranking_on_fresh_rollouts(d, prompts, per_prompt, seed)
        return {"update": step, "kendall_tau": taus, "mean": sum(taus.values()) / len(taus)}

    rows = [evaluate(0)]
    bar = tqdm(range(1, updates + 1), desc="surrogate updates", disable=not progress)
    for step in bar:
        batch = d.sample_prompts(d.cfg.optim.batch_size)
        try:
            r = d.rollout(batch)
            scored = d.score(r, batch)
            stats = {"reward": scored.rewards.mean().item(), **d.reward_update(r, scored)}
        except NonFiniteStep as fault:  # nothing stepped; skipped like a run's update (dgpo.runtime.nonfinite)
            d.nonfinite.skip(f"update {step}", str(fault))
            stats = {"loss_surrogate": float("nan"), "reward": float("nan")}
        else:
            d.nonfinite.passed()
        d.counters.step = step  # the surrogate's EMAs follow the update count
        if step % eval_every == 0 or step == updates:
            rows.append(evaluate(step))
        bar.set_postfix(loss=f"{stats['loss_surrogate']:.3f}", reward=f"{stats['reward']:.3f}",
                        tau=f"{rows[-1]['mean']:.2f}")
    return rows
