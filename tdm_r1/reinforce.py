"""TDM-R1 (arXiv 2603.07700): reinforce a few-step student with a non-differentiable reward, read top to bottom.

TDM-R1 is TDM (:mod:`tdm_r1.distill`: the student, the fake score, their rollout and updates) plus a stepwise
surrogate reward (:mod:`tdm_r1.surrogate`) and a reward term in the student's update. One iteration,
:meth:`Reinforcer._iteration`:

1. **rollout** — B / G train prompts, each G times (a group), one noise each; the no-grad K-step student rollout
   keeps every state x_{σ_k} and every step's x̂₀ (TDM's).
2. **fake-score update(s)** — as in TDM.
3. **rewards as labels** — the rollouts' final images are scored (any reward: a verifier, OCR, a served model;
   never differentiated) and turned into group advantages.
4. **surrogate update(s)** — the surrogate (a third LoRA on the teacher's backbone) takes DGPO's group
   preference loss on the trajectory points, so its implicit reward ranks the points of one group as their
   final rewards do.
5. **generator update** — the student's x̂₀ at x_{σ_k} regresses onto x̂₀ + d with the per-sample direction
   d = w_R·reward + w_C·CFG + w_D·distribution matching (:func:`tdm_r1.objectives.r1_generator_direction`): the
   surrogate's guided x̂₀ against the base's at a point x_τ′ diffused from the student's next state, the
   teacher's CFG direction, and TDM's own direction. The student never gets a denoising loss.

With ``r1.reward_source=direct`` (the paper's TDM + RL baseline, :mod:`tdm_r1.direct_rl`) step 4 is DGPO's group
loss on the student's own weights instead, and step 5 has no reward direction.

The run folder, cadence, checkpoints and resume are the runtime's (:class:`dgpo.runtime.loop.Run`), as for TDM.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dgpo.errors import UserError
from dgpo.methods.batch import score_groups
from dgpo.models.lora_io import read_lora_folder
from dgpo.rewards import metadata_of, reward_of_run
from dgpo.runtime.checkpoint import latest_checkpoint, load_checkpoint
from dgpo.runtime.ema import EMA
from dgpo.config import to_dict
from tdm_r1.config import DistillConfig, ReinforceConfig
from tdm_r1.direct_rl import StudentGroupLoss
from tdm_r1.distill import STUDENT, Distiller, Rollout, training_prompts
from tdm_r1.objectives import (cfg_direction, level_above, r1_generator_direction, reward_direction,
                               transition_sample, x0_from_velocity)
from tdm_r1.student import read_sampler_file
from tdm_r1.surrogate import SurrogateReward, group_draws


class Reinforcer(Distiller):
    """The TDM-R1 recipe: TDM's teacher, student and fake score, plus the surrogate reward and the reward."""

    label = "TDM-R1"

    def __init__(self, cfg: ReinforceConfig, log=print):
        if not isinstance(cfg, ReinforceConfig):
            raise UserError("TDM-R1 needs a TDM-R1 config (r1.enabled: true; tdm-r1 train sets it)")
        if cfg.r1.init_run and cfg.r1.init_lora:
            raise UserError("r1.init_run and r1.init_lora both name a starting student: keep one")
        super().__init__(cfg, log)

    # --------------------------------------------------------------------------------------- set-up
    def training_prompts(self) -> list[str]:
        return training_prompts(self.world, self.cfg.r1.categories)

    def add_parts(self) -> None:
        """The surrogate (a third adapter), the reward, and the starting student (r1.init_run / init_lora); with
        r1.reward_source=direct, DGPO's loss on the student against that start instead of the surrogate."""
        cfg = self.cfg
        self.surrogate = None
        if cfg.r1.reward_source == "surrogate":
            self.surrogate = SurrogateReward(self.teacher, self.adapters, cfg.surrogate, self.runtime,
                                             seed=cfg.run.seed + 2)
            if cfg.surrogate.init:
                self.surrogate.load(cfg.surrogate.init)
        self.reward_name, self.reward = reward_of_run(cfg.reward, self.world)
        if cfg.r1.init_run:
            self.load_student_from(Path(cfg.r1.init_run))
        elif cfg.r1.init_lora:
            self.load_student_lora(Path(cfg.r1.init_lora))
        #: what learns from the rewards: the surrogate, or (direct) the student itself, against the student just
        #: loaded (the same on a resume)
        self.learner = self.surrogate or StudentGroupLoss(self.student, self.adapters, cfg.surrogate, self.runtime,
                                                          self.student_params)
        if self.surrogate is None:
            self.label = "TDM + direct RL"

    def saved_boundaries(self) -> list[float]:
        """The levels saved with ``r1.init_lora`` (its sampler.json), when TDM-R1 starts from one."""
        if not self.cfg.r1.init_lora:
            return []
        levels = list((read_sampler_file(self.cfg.r1.init_lora) or {}).get("boundaries", []))
        if levels and len(levels) != self.cfg.student.nfe:
            raise UserError(f"r1.init_lora: that student takes {len(levels)} steps (its sampler.json), this config "
                            f"{self.cfg.student.nfe}: set student.nfe={len(levels)}")
        return levels

    def load_student_from(self, run: Path) -> None:
        """Start from a `tdm-r1 distill` run: its latest checkpoint's student and fake score (and step
        embedding), after checking that its student is this one (steps, levels, adapter shape). The student is
        the one that run exports: its EMA when it kept one (student.ema_decay > 0), else its live weights."""
        import yaml
        saved = run / "config.yaml"
        ckpt = latest_checkpoint(run) if saved.is_file() else None
        if ckpt is None:
            raise UserError(f"r1.init_run: {str(run)!r} is not a `tdm-r1 distill` run folder with a checkpoint")
        theirs = yaml.safe_load(saved.read_text())
        mine = to_dict(self.cfg)
        keys = [("student", k) for k in ("nfe", "boundaries", "level_shift", "mode", "lora_rank", "lora_alpha",
                                         "lora_targets")]
        keys += [("fake", k) for k in ("lora_rank", "lora_alpha", "lora_targets")] + [("objective", "tau")]
        before_the_key = {("student", "level_shift"): 0.0}  # a run saved before the key: the scheduler's levels
        differ = [f"{a}.{b}: {theirs_value!r} there, {mine[a][b]!r} here" for a, b in keys
                  if (theirs_value := theirs.get(a, {}).get(b, before_the_key.get((a, b)))) != mine[a][b]]
        if differ:
            raise UserError(f"r1.init_run: {str(run)!r} trained another student ({'; '.join(differ)}); set the "
                            f"same values here")
        tensors, _ = load_checkpoint(ckpt)
        with torch.no_grad():
            for k, p in self.named_trainables():
                p.copy_(tensors[k])
            # the student that run exports (and its samples and evaluations show) is its EMA when it kept one
            exported = "student_ema.0" in tensors
            if exported:
                for i, p in enumerate(self.student_params):
                    p.copy_(tensors[f"student_ema.{i}"])
        if self.student_ema is not None:  # the EMA starts at the loaded student
            self.student_ema = EMA(self.student_params, self.cfg.student.ema_decay)
        self.log(f"starting student ({'its EMA, as exported' if exported else 'live weights'}) and fake score: {ckpt}")

    def load_student_lora(self, folder: Path) -> None:
        """Start the student from a LoRA folder (rescaled to student.lora_alpha / lora_rank; layers it does
        not name add nothing); the fake score starts at the teacher."""
        if self.cfg.student.mode != "lora":
            raise UserError("r1.init_lora starts a LoRA student: set student.mode=lora")
        weights, scale = read_lora_folder(folder, "r1.init_lora")
        layers = self.adapters.load_scaled(STUDENT, weights, scale, "r1.init_lora")
        if self.student_ema is not None:
            self.student_ema = EMA(self.student_params, self.cfg.student.ema_decay)
        self.log(f"starting student: {folder} ({layers} LoRA layers, levels {[round(b, 4) for b in self.boundaries]})")

    # --------------------------------------------------------------------------------------- the iteration
    def _iteration(self) -> tuple[dict, int]:
        """Rollout; fake-score update(s); the rollouts' rewards (labels only) and the surrogate's update(s) (or the
        direct RL step); the generator update with the reward term — under teacher.mixed_precision's autocast."""
        prompts = self.sample_prompts(self.cfg.optim.batch_size)
        stats: dict = {}
        with self.step_guard(stats) as guard:
            r = self.rollout(prompts)                                 # 1
            for _ in range(self.cfg.fake.updates_per_generator):      # 2
                stats.update(self.fake_update(r))
            scored = self.score(r, prompts)                           # 3
            stats.update(reward=scored.rewards.mean().item(), reward_std=scored.rewards.std().item())
            stats.update(self.reward_update(r, scored))               # 4
            stats.update(self.generator_update(r))                    # 5
        return guard.row, self.calls.total()

    def sample_prompts(self, n: int) -> list[str]:
        """n / G train prompts, each repeated G times (consecutive groups)."""
        g = self.cfg.r1.group_size
        idx = torch.randint(len(self.train_prompts), (n // g,), generator=self.gen)
        return [self.train_prompts[i] for i in idx.tolist() for _ in range(g)]

    def score(self, r: Rollout, prompts: list[str], group_size: int = 0):
        """The rewards and group advantages of the global batch ``prompts`` in consecutive groups of
        ``group_size`` (default ``r1.group_size``; the reward is only ever a label): each process scores its rows'
        final images, :func:`score_groups` gathers them."""
        mine = [prompts[i] for i in r.rows.tolist()]
        with torch.no_grad():
            images = self.teacher.decode_latents(r.states[-1])
        return score_groups(self.reward, images, mine, group_size or self.cfg.r1.group_size, self.cfg.advantage,
                            self.reward_name, processes=self.processes, metadata=metadata_of(self.world, mine))

    def reward_update(self, r: Rollout, scored) -> dict:
        """DGPO's update(s) on the scored rollouts' trajectory points: of the surrogate, or (r1.reward_source=direct)
        of the student itself, its metrics then named direct_rl."""
        stats = {}
        for _ in range(self.cfg.surrogate.updates_per_iteration):
            row = self.learner.update(r.states, self.sigmas, scored.advantages, scored.group_ids, r.embeds, self.gen,
                                      self.counters.iteration, self.cfg.optim.grad_clip, r.rows)
            stats.update({k.replace("surrogate", self.learner.prefix): v for k, v in row.items()})
        return stats

    @torch.no_grad()
    def generator_direction(self, r: Rollout, p: dict, x0_student, x0_teacher_cfg, x0_cond, dm
                            ) -> tuple[torch.Tensor, dict]:
        """TDM-R1's direction w_R·reward + w_C·CFG + w_D·distribution matching, per sample by its step k (early:
        k < ``r1.trunc_steps``, all steps when 0; late: the rest; :func:`tdm_r1.objectives.r1_generator_direction`):

        - reward: (x̂₀^{surrogate, CFG r1.rl_cfg}(x_τ′) − x̂₀^{base}(x_τ′)) / mean|x̂₀ − x̂₀^{surrogate,CFG}|, the base
          conditional (``r1.reward_reference=conditional``) or at the same CFG (``guided``), with
          x_τ′ diffused from the student's next point x_{σ_{k+1}} to τ′ in [max(σ_{k+1}, r1.t_min), 1] (uniform,
          or before a shift of r1.tau_shift from r1.tau_margin above), τ′'s uniform and the noise shared by a
          group (:func:`tdm_r1.objectives.reward_direction`);
        - CFG: (x̂₀^{teacher,CFG}(x_τ) − x̂₀^{teacher}(x_τ)) / mean|x̂₀ − x̂₀^{teacher,CFG}| at TDM's own point x_τ
          (0 when teacher.guidance_scale ≤ 1; :func:`tdm_r1.objectives.cfg_direction`);
        - distribution matching: TDM's direction ``dm``, towards the guided teacher or, with
          ``objective.dm_target=conditional`` (the released code's), the conditional one (objective.cfg_weight is
          then unused: the CFG direction's weights are r1.cfg_weight and r1.late_cfg_weight).
        """
        c = self.cfg.r1
        k = p["k"]
        trunc = c.trunc_steps or len(self.boundaries)
        early = (k < trunc).to(self.device)
        if x0_cond is None:  # objective.dm_target=guided: the conditional teacher only for the CFG direction
            with self.as_teacher() as teacher:
                x0_cond = x0_from_velocity(p["x_tau"], p["tau"], teacher.velocity(p["x_tau"], p["tau"], r.embeds))
        if self.surrogate is not None:
            reward, extra = self.reward_read(r, p, x0_student)
        else:  # r1.reward_source=direct: the reward reached the student in its own step
            reward, extra = torch.zeros_like(dm), {}
        cfg_dir = (torch.zeros_like(dm) if self.cfg.teacher.guidance_scale <= 1 else
                   cfg_direction(x0_student, x0_teacher_cfg, x0_cond))
        direction = r1_generator_direction(reward, cfg_dir, dm, early, c.reward_weight, c.cfg_weight, c.dm_weight,
                                           c.late_cfg_weight, c.late_dm_weight)
        return direction, extra

    @torch.no_grad()
    def reward_read(self, r: Rollout, p: dict, x0_student) -> tuple[torch.Tensor, dict]:
        """The reward direction (see :meth:`generator_direction`) read at x_τ′ from the student's next points."""
        c = self.cfg.r1
        groups = torch.arange(r.total) // c.group_size  # consecutive groups of the global batch
        u, z = group_draws(groups, tuple(x0_student.shape[1:]), self.gen)
        tau2 = level_above(p["s_next"], u[r.rows].to(self.device), c.t_min, shift=c.tau_shift, margin=c.tau_margin)
        x_tau2 = transition_sample(p["x_next"], p["s_next"], tau2, z[r.rows].to(self.device))
        x0_sur = self.surrogate.x0(x_tau2, tau2, r.embeds, c.rl_cfg)
        with self.as_teacher() as teacher:
            v_base = (teacher.guided_velocity(x_tau2, tau2, r.embeds, c.rl_cfg) if c.reward_reference == "guided"
                      else teacher.velocity(x_tau2, tau2, r.embeds))
        x0_base = x0_from_velocity(x_tau2, tau2, v_base)
        gap = self.processes.sum((x0_sur - x0_base).abs().mean().item() * r.share())
        return reward_direction(x0_student, x0_sur, x0_base), {"reward_gap": gap}

    # --------------------------------------------------------------------------------------- state, summary
    def state_tensors(self) -> tuple[dict, dict]:
        tensors, scalars = super().state_tensors()
        t, extra = self.learner.state_tensors()
        return {**tensors, **t}, {**scalars, **extra}

    @torch.no_grad()
    def load_state(self, tensors: dict, state: dict) -> None:
        super().load_state(tensors, state)
        self.learner.load_state(tensors, state)

    def summary_names(self, first: dict, last: dict) -> tuple[str, str]:
        start = "TDM student" if self.cfg.r1.init_run else "student at init"
        return (f"{start} ({len(self.boundaries)} steps, no CFG)", f"{self.label} student (iteration {last['iteration']})")


def recipe_of(cfg: DistillConfig) -> type[Distiller]:
    """The recipe a config runs: TDM-R1 when ``r1.enabled`` (``tdm-r1 train``), else TDM (``tdm-r1 distill``)."""
    return Reinforcer if isinstance(cfg, ReinforceConfig) else Distiller
