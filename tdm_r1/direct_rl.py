"""The direct-RL baseline for a few-step student (the TDM-R1 paper's "TDM + RL" comparison, arXiv 2603.07700):
DGPO's group loss applied to the student's own weights on its own rollouts, with TDM's distribution matching kept
beside it — what TDM-R1's surrogate exists to replace, measured in the same recipe.

With ``r1.reward_source=direct`` the TDM-R1 recipe (:mod:`tdm_r1.reinforce`) builds no surrogate. Each iteration
scores the student's rollouts as before; then this loss takes one step with its own Adam (``surrogate.lr``), and
TDM's generator update (distribution matching and CFG, no reward direction) takes its own, so each moves the
student as it would alone:

    θ ← θ − Adam_RL(∇_θ L_DGPO(θ; θ₀))
    θ ← θ − Adam_TDM(∇_θ ‖x̂₀_θ − sg(x̂₀_θ + w_D·dm + w_C·cfg)‖²)

L_DGPO is the surrogate's loss (:class:`tdm_r1.surrogate.SurrogateReward`: its points, velocity target, β,
normalisation, PPO clip and KL keys) with φ = the student's LoRA θ and the reference the starting student θ₀, held
fixed (``surrogate.reference`` is not read). ``surrogate.k_draw=last`` takes DGPO's own points, the clean samples
(k = K); the other draws also train at the trajectory's intermediate points, each labelled with its final image's
advantage (the paper's Eq. 6).
"""

from __future__ import annotations

import torch

from dgpo.models.adapters import AdapterRoles
from dgpo.models.handle import FlowModel, PromptEmbeds
from dgpo.runtime.ema import EMA
from dgpo.runtime.runtime import Runtime
from tdm_r1.distill import STUDENT
from tdm_r1.surrogate import SurrogateConfig, SurrogateReward


class StudentGroupLoss(SurrogateReward):
    """DGPO's group loss on the student's LoRA (role ``student``), against the starting student; its own Adam."""

    role = STUDENT
    prefix = "direct_rl"
    owns_parameters = False  # the student's weights are saved by the recipe

    def __init__(self, model: FlowModel, adapters: AdapterRoles, cfg: SurrogateConfig, runtime: Runtime,
                 student_params: list[torch.nn.Parameter]):
        self.student_params = list(student_params)
        super().__init__(model, adapters, cfg, runtime)
        self.start = EMA(self.params, 1.0, warmup=False)  # decay 1: the starting student, held fixed

    def trained_parameters(self, seed: int) -> list[torch.nn.Parameter]:
        return self.student_params

    def reference_velocity(self, x, sigma, embeds: PromptEmbeds) -> torch.Tensor:
        """v_ref without gradient: the starting student."""
        with torch.no_grad(), self.active(), self.start.swapped_in():
            return self.model.velocity(x, sigma, embeds)
