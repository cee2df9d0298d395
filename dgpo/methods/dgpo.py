"""DGPO as an objective: ODE rollouts and :func:`dgpo.dgpo_update.dgpo_backward` (see there for the math)."""

from __future__ import annotations

from dgpo.dgpo_update import RolloutBatch, dgpo_backward
from dgpo.ema import EMA
from dgpo.methods import Objective, register_objective


@register_objective
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
