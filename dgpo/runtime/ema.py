"""Exponential moving averages of parameters: θ_ema ← d·θ_ema + (1 − d)·θ."""

from __future__ import annotations

from contextlib import contextmanager

import torch


class EMA:
    """An EMA over a fixed, ordered list of parameters, with a swap-in context for evaluation."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float, warmup: bool = True):
        self.decay = decay
        self.warmup = warmup
        self.params = list(params)
        self.shadow = [p.detach().clone() for p in self.params]

    def decay_at(self, step: int) -> float:
        """The decay used at ``step``; with warm-up, min(d, (1 + step)/(10 + step)) so early averages
        are not dominated by the initial weights."""
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = self.decay_at(step)
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - d)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)

    @contextmanager
    @torch.no_grad()
    def swapped_in(self):
        """Temporarily load the EMA weights into the live parameters (restored afterwards)."""
        backup = [p.detach().clone() for p in self.params]
        self.copy_to_params()
        try:
            yield
        finally:
            for p, b in zip(self.params, backup):
                p.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"ema.{i}": s for i, s in enumerate(self.shadow)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for i, s in enumerate(self.shadow):
            s.copy_(state[f"ema.{i}"])
