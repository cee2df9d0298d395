"""TDM distillation of a K-NFE student from a flow-matching teacher, read top to bottom.

One iteration (see :mod:`tdm_r1.objectives` for every formula):

1. **rollout** — B train prompts, B noises; a no-grad K-step rollout of the student records
   x_{σ_0} … x_{σ_K} and each step's clean prediction x̂₀_k = x_{σ_k} − σ_k·v_θ(x_{σ_k}).
2. **fake-score update(s)** (``fake.updates_per_generator``, 1:1 by default) — per sample a step k ~ U{0…K−1},
   τ from :func:`sample_tau`, x_τ ~ q(· | x_{σ_{k+1}}); the fake LoRA ψ (a second adapter on the teacher's
   backbone, initialised as the teacher: LoRA's B = 0) takes one Adam step on the importance-weighted
   x̂₀-denoising loss towards x̂₀_k.
3. **generator update** — fresh k, τ, x_τ; teacher (adapters off, CFG) and fake x̂₀ at x_τ without grad;
   one grad-enabled student step from x_{σ_k} gives x̂₀_θ, pulled towards x̂₀_θ + (x̂₀^teacher − x̂₀^fake)/n.
   The deterministic map to x_{σ_{k+1}} is the rollout's own (the weights are the same), so the step
   is not recomputed.

Both optimisers are Adam with β₁ = 0; the generator's learning rate is below the fake's. The run folder
follows ``dgpo train``: ``config.yaml``, ``metrics.jsonl``, ``samples/iter-N.png``, ``checkpoints/step-N``
(``--resume``), ``final/lora`` (+ ``sampler.json``/``USAGE.md``: the stock diffusers call), ``curves.png``,
``summary.md``.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from dgpo.runtime.checkpoint import flatten_state, load_flat_state
from dgpo.runtime.ema import EMA
from dgpo.errors import UserError
from dgpo.config import flat_dict, to_dict
from dgpo.runtime.nonfinite import NonFiniteStep, SkipGuard
from dgpo.models.prompt_encodings import PromptEncodings
from dgpo.runtime.runtime import Runtime
from dgpo.runtime.run_folder import reopen_run, start_run
from dgpo.runtime.loop import Counters, Run, Schedule, plot_run
from dgpo.runtime.sharding import shard_frozen_model
from dgpo.evaluation.evaluate import evaluate_images
from dgpo.models.handle import PromptEmbeds
from dgpo.models.families import WEIGHTS_DTYPES, load_model
from dgpo.models.adapters import AdapterRoles
from dgpo.worlds.registry import make_world
from tdm_r1.config import DistillConfig, ReinforceConfig
from tdm_r1.objectives import (cfg_direction, distribution_matching_direction, fake_score_loss,
                               log_importance_weight, normalise_weights, regression_loss, sample_tau,
                               teacher_regulariser, transition_sample, x0_from_velocity)
from tdm_r1.student import (boundary_sigmas, check_boundaries, generate_student, student_levels,
                            write_sampler_files)

STUDENT, FAKE = "student", "fake"


def resolve_teacher(cfg: DistillConfig, log=print) -> Path:
    """The teacher pipeline folder: ``teacher.base`` or the embedded base (pretrained if not cached)."""
    if cfg.teacher.base:
        return Path(cfg.teacher.base)
    return make_world(cfg.world).embedded_base(cfg.teacher.base_config, log)


@dataclass
class Rollout:
    """A student rollout: states (K + 1, B, C, h, w), clean predictions x̂₀_k (K, B, C, h, w), embeddings."""

    states: torch.Tensor
    x0: torch.Tensor
    embeds: PromptEmbeds
    rows: torch.Tensor   # this process's rows of the iteration's global batch (:mod:`dgpo.runtime.processes`)
    total: int           # the global batch size

    def share(self) -> float:
        return len(self.rows) / self.total


class Distiller:
    """Teacher, student, fake score and optimisers of one run: the TDM recipe on :class:`dgpo.runtime.loop.Run`.
    TDM-R1 (:class:`tdm_r1.reinforce.Reinforcer`) extends it: its set-up through :meth:`training_prompts`,
    :meth:`saved_boundaries` and :meth:`add_parts`, its iteration and generator direction of its own."""

    label = "TDM"
    memory_levers = "lower optim.batch_size (student trajectories per iteration)"

    def __init__(self, cfg: DistillConfig, log=print):
        if isinstance(cfg, ReinforceConfig) and type(self) is Distiller:
            raise UserError("r1.enabled: a TDM-R1 run is tdm_r1.reinforce.Reinforcer (`tdm-r1 train`), not the TDM "
                            "recipe (tdm_r1.reinforce.recipe_of(cfg) picks the recipe of a config)")
        self.cfg = cfg
        self.out = Path(cfg.run.out_dir)
        self.runtime = Runtime(cfg.run.seed, cfg.teacher.mixed_precision, cfg.run.threads, cfg.run.tracker, self.out,
                               log)
        self.processes, self.log = self.runtime.processes, self.runtime.log
        log = self.log
        self.nonfinite = SkipGuard(cfg.optim.max_skipped_steps, log, "lower optim.generator_lr, optim.fake_lr or "
                                   "surrogate.lr, set optim.grad_clip, or check the reward")
        device = self.runtime.device
        self.processes.rows(cfg.optim.batch_size, "optim.batch_size")
        sharded = self.processes.sharded
        if sharded and cfg.student.mode == "full":  # its export would save the shared, sharded text encoders
            raise UserError("student.mode=full under an FSDP launch: the full student trains all its weights on "
                            "every process; use student.mode=lora, or a launch without FSDP")
        self.base_path = self.processes.main_first(lambda: resolve_teacher(cfg, log))
        self.teacher = load_model(self.base_path, WEIGHTS_DTYPES[cfg.teacher.weights_dtype],  # adapters off = the teacher
                                  cfg.teacher.resolution).to(device)
        backbone = self.teacher.transformer
        self.boundaries = check_boundaries(cfg.student.boundaries or self.saved_boundaries()
                                           or student_levels(self.teacher, cfg.student.nfe, cfg.student.level_shift))
        if len(self.boundaries) != cfg.student.nfe:
            raise UserError(f"student.boundaries has {len(self.boundaries)} levels for student.nfe={cfg.student.nfe}")
        self.sigmas = boundary_sigmas(self.teacher, self.boundaries)  # σ_0 … σ_K (σ_K = 0)

        if cfg.student.mode == "full":  # a full copy of the backbone, trained entirely
            student_tr = copy.deepcopy(backbone)
            student_tr.requires_grad_(True)
            self.student = self.teacher.with_transformer(student_tr)
            self.student_params = list(student_tr.parameters())
        self.adapters = AdapterRoles(backbone)  # the teacher = the backbone with every adapter off
        self.fake_params = self.adapters.add(FAKE, cfg.fake.lora_rank, cfg.fake.lora_alpha,
                                             self.teacher.lora_targets(cfg.fake.lora_targets), seed=cfg.run.seed + 1)
        if cfg.student.mode == "lora":  # a second adapter on the same backbone
            self.student_params = self.adapters.add(STUDENT, cfg.student.lora_rank, cfg.student.lora_alpha,
                                                    self.teacher.lora_targets(cfg.student.lora_targets),
                                                    seed=cfg.run.seed)
            self.student = self.teacher
        self.step_embed = None
        if cfg.objective.tau == "full":  # the step index k as extra conditioning of the fake score
            if getattr(self.teacher, "family", "") == "zimage":
                raise UserError("objective.tau=full conditions the fake score through the pooled prompt embedding, "
                                "which Z-Image does not have: use tau=disjoint")
            dim = self.teacher.negative_embeds(1).pooled.shape[-1]  # the pooled prompt embedding's width
            self.step_embed = torch.nn.Parameter(torch.zeros(cfg.student.nfe, dim, device=device))
            self.fake_params.append(self.step_embed)
        for p in self.student_params + self.fake_params:
            p.requires_grad_(True)
        betas = tuple(cfg.optim.betas)
        # evaluation and export read the EMA of the student when student.ema_decay > 0
        self.student_ema = EMA(self.student_params, cfg.student.ema_decay) if cfg.student.ema_decay > 0 else None
        self.gen_opt = self.runtime.prepare(adam(self.student_params, cfg.optim.generator_lr, betas, cfg.optim.weight_decay))
        self.fake_opt = self.runtime.prepare(adam(self.fake_params, cfg.optim.fake_lr, betas, cfg.optim.weight_decay))
        self.gen = torch.Generator().manual_seed(cfg.run.seed)
        self.device = device
        self.world = make_world(cfg.world)
        self.train_prompts = self.training_prompts()
        self.add_parts()
        if sharded:  # an FSDP launch: the frozen model split over the processes
            shard_frozen_model(self.teacher, self.processes, log)
        self.embeds_of = PromptEncodings(self.teacher, self.train_prompts)  # each prompt encoded once
        self.calls = self.runtime.count_calls(backbone)  # NFE, counted at the transformer
        self.counters = Counters()
        run = cfg.run
        self.runner = Run(self, self.out, Schedule.of(run, run.iterations, cfg.eval),
                          step_key="iteration", grid_prefix="iter", log=log, processes=self.processes,
                          tracking=(self.runtime, "tdm-r1", flat_dict(to_dict(cfg))))

    # --------------------------------------------------------------------------------------- set-up steps
    def training_prompts(self) -> list[str]:
        """The prompts student trajectories are drawn for: the world's train prompts."""
        return training_prompts(self.world, [])

    def saved_boundaries(self) -> list[float]:
        """Noise levels a starting student brings with it (none in TDM, which starts from the teacher)."""
        return []

    def add_parts(self) -> None:
        """Models or state a recipe adds before the frozen model is sharded (none in TDM)."""

    # --------------------------------------------------------------------------------------- models
    @contextmanager
    def as_student(self):
        """The student's weights are live (LoRA mode: only the student adapter is active)."""
        if self.cfg.student.mode == "lora":
            with self.adapters.active(STUDENT):
                yield self.student
        else:
            yield self.student

    @contextmanager
    def as_fake(self):
        with self.adapters.active(FAKE):
            yield self.teacher

    @contextmanager
    def as_teacher(self):
        with self.adapters.reference():
            yield self.teacher

    def fake_embeds(self, embeds: PromptEmbeds, k: torch.Tensor) -> PromptEmbeds:
        if self.step_embed is None:
            return embeds
        pooled = embeds.pooled + self.step_embed[k.to(self.device)]  # fp32 + the encoders' dtype
        return PromptEmbeds(embeds.tokens, pooled.to(embeds.pooled.dtype))

    # --------------------------------------------------------------------------------------- iteration parts
    def sample_prompts(self, n: int) -> list[str]:
        """n train prompts, drawn uniformly."""
        idx = torch.randint(len(self.train_prompts), (n,), generator=self.gen)
        return [self.train_prompts[i] for i in idx.tolist()]

    @torch.no_grad()
    def rollout(self, prompts: list[str]) -> Rollout:
        """The no-grad K-step student rollout of this process's rows of the global batch ``prompts``, keeping
        every state and every step's x̂₀."""
        rows = self.processes.rows(len(prompts))
        embeds = self.embeds_of.batch(prompts, rows)
        x = torch.randn((len(prompts), *self.teacher.latent_shape), generator=self.gen)[rows].to(self.device)
        states, x0s = [x], []
        with self.as_student() as model:
            for k in range(len(self.boundaries)):
                s = self.sigmas[k].expand(len(x)).to(self.device)
                v = model.velocity(x, s, embeds)
                x0s.append(x0_from_velocity(x, s, v))
                x = x + (self.sigmas[k + 1] - self.sigmas[k]).item() * v
                states.append(x)
        return Rollout(torch.stack(states), torch.stack(x0s), embeds, rows, len(prompts))

    def trajectory_points(self, r: Rollout) -> dict:
        """Per sample: k ~ U{0…K−1}, τ (:func:`sample_tau`), x_τ ~ q(· | x_{σ_{k+1}}) (drawn for the global
        batch; this process's rows kept)."""
        b = r.states.shape[1]
        k = torch.randint(len(self.boundaries), (r.total,), generator=self.gen)
        o = self.cfg.objective
        tau = sample_tau(self.sigmas, k, o.tau, self.gen, tau_min=o.tau_min, shift=o.tau_shift,
                         margin=o.tau_margin)[r.rows]
        k = k[r.rows]
        rows = torch.arange(b)
        x_k, x_next, x0 = r.states[k, rows], r.states[k + 1, rows], r.x0[k, rows]
        z = torch.randn((r.total, *x_next.shape[1:]), generator=self.gen)[r.rows].to(self.device)
        s_next, tau_d = self.sigmas[k + 1].to(self.device), tau.to(self.device)
        x_tau = transition_sample(x_next, s_next, tau_d, z)
        return {"k": k, "tau": tau_d, "x_k": x_k, "x_next": x_next, "s_next": s_next, "x0": x0, "x_tau": x_tau,
                "s_k": self.sigmas[k].to(self.device)}

    def fake_loss(self, r: Rollout, p: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The importance-weighted fake-score loss on trajectory points ``p`` (and the weights), plus
        ``fake.teacher_reg`` × the teacher regulariser when set."""
        log_w = log_importance_weight(p["x_tau"], p["x_next"], p["x0"], p["s_next"], p["tau"])
        # self-normalised over the global batch: every process's log-weights
        w_all = normalise_weights(self.processes.gather_rows(log_w), self.cfg.fake.importance,
                                  dim=p["x_tau"][0].numel())
        with self.as_fake() as fake:
            v = fake.velocity(p["x_tau"], p["tau"], self.fake_embeds(r.embeds, p["k"]))
            loss = fake_score_loss(v, p["x_tau"], p["tau"], p["x0"], w_all[r.rows])
        if self.cfg.fake.teacher_reg > 0:
            with torch.no_grad(), self.as_teacher() as teacher:
                v_teacher = teacher.velocity(p["x_tau"], p["tau"], r.embeds)
            loss = loss + self.cfg.fake.teacher_reg * teacher_regulariser(v, v_teacher)
        return loss * r.share(), w_all

    def fake_update(self, r: Rollout, points: dict | None = None) -> dict:
        loss, w = self.fake_loss(r, points if points is not None else self.trajectory_points(r))
        grad_norm = self._step(self.fake_opt, self.fake_params, loss, "fake")
        ess = (w.sum() ** 2 / (w ** 2).sum()).item() / len(w)  # effective sample size / B
        return {"loss_fake": self.processes.sum(loss.item()), "grad_norm_fake": grad_norm, "ess": ess}

    def generator_update(self, r: Rollout) -> dict:
        """The student's regression onto x̂₀ + direction (:meth:`generator_direction`; TDM: the
        distribution-matching direction, plus the CFG direction when it matches the conditional teacher). No
        denoising loss."""
        p = self.trajectory_points(r)
        o = self.cfg.objective
        conditional = o.dm_target == "conditional"
        with torch.no_grad():
            with self.as_teacher() as teacher:
                v_t = teacher.guided_velocity(p["x_tau"], p["tau"], r.embeds, self.cfg.teacher.guidance_scale)
                v_c = teacher.velocity(p["x_tau"], p["tau"], r.embeds) if conditional else None
            with self.as_fake() as fake:
                v_f = fake.velocity(p["x_tau"], p["tau"], self.fake_embeds(r.embeds, p["k"]))
            x0_teacher = x0_from_velocity(p["x_tau"], p["tau"], v_t)
            x0_cond = x0_from_velocity(p["x_tau"], p["tau"], v_c) if conditional else None
            x0_fake = x0_from_velocity(p["x_tau"], p["tau"], v_f)
        with self.as_student() as student:
            v = student.velocity(p["x_k"], p["s_k"], r.embeds)
        x0_student = x0_from_velocity(p["x_k"], p["s_k"], v)
        dm = distribution_matching_direction(x0_student, x0_cond if conditional else x0_teacher, x0_fake,
                                             o.normalise, x0_normaliser=x0_teacher)
        direction, extra = self.generator_direction(r, p, x0_student, x0_teacher, x0_cond, dm)
        loss = regression_loss(x0_student, direction, o.distance, o.huber_c) * r.share()
        grad_norm = self._step(self.gen_opt, self.student_params, loss, "generator")
        if self.student_ema is not None:
            self.student_ema.update(self.counters.iteration)
        gap = (x0_teacher - x0_fake).abs().mean().item() * r.share()
        return {"loss_gen": self.processes.sum(loss.item()), "grad_norm_gen": grad_norm,
                "score_gap": self.processes.sum(gap), **extra}

    def generator_direction(self, r: Rollout, p: dict, x0_student, x0_teacher, x0_cond, dm
                            ) -> tuple[torch.Tensor, dict]:
        """The direction the student's x̂₀ moves along, and diagnostics: TDM's distribution matching ``dm``
        (``objective.dm_target=guided``: ``x0_cond`` is None), or ``dm`` + objective.cfg_weight × the CFG direction
        when ``dm`` points at the conditional teacher ``x0_cond`` (:func:`tdm_r1.objectives.cfg_direction`)."""
        if x0_cond is None:
            return dm, {}
        o = self.cfg.objective
        return dm + o.cfg_weight * cfg_direction(x0_student, x0_teacher, x0_cond, o.normalise), {}

    def _step(self, opt, params, loss, who: str) -> float:
        """Backward of this process's share of the loss, then the runtime's guarded step (gradients summed over
        processes, clip, step; a non-finite loss or gradient steps nothing and raises
        :class:`dgpo.runtime.nonfinite.NonFiniteStep`)."""
        self.runtime.backward(loss)
        return self.runtime.optimizer_step(opt, params, self.processes.sum(loss.item()), self.cfg.optim.grad_clip, who)

    def train_step(self) -> dict:
        """One iteration (:meth:`_iteration`), timed and counted by the run; its metrics row."""
        return self.runner.timed_step(self._iteration)

    iteration = train_step

    def _iteration(self) -> tuple[dict, int]:
        """Rollout; fake-score update(s); the generator update — under teacher.mixed_precision's autocast. Returns
        the metrics row and the NFE the runtime counted at the transformer."""
        prompts = self.sample_prompts(self.cfg.optim.batch_size)
        stats: dict = {}
        with self.step_guard(stats) as guard:
            r = self.rollout(prompts)                                 # 1
            for _ in range(self.cfg.fake.updates_per_generator):      # 2
                stats.update(self.fake_update(r))
            stats.update(self.generator_update(r))                    # 3
        return guard.row, self.calls.total()

    @contextmanager
    def step_guard(self, stats: dict):
        """Around one iteration's updates: the runtime's autocast (teacher.mixed_precision) and NFE count; a
        non-finite loss or gradient (:class:`dgpo.runtime.nonfinite.NonFiniteStep`) ends the iteration there — the
        updates before it stand (finite), the rest is skipped, the row says ``skipped``. ``guard.row`` is the
        iteration's metrics row (``stats`` rounded)."""
        guard = SimpleNamespace(row={"skipped": 1.0})
        self.calls.start()
        try:
            with self.runtime.autocast():
                yield guard
        except NonFiniteStep as fault:
            self.nonfinite.skip(f"iteration {self.counters.iteration + 1}", str(fault))
            return
        finally:
            self.calls.stop()
        self.nonfinite.passed()
        guard.row = {k: round(v, 6) for k, v in stats.items()}

    def postfix(self, row: dict) -> dict:
        if row.get("skipped"):
            return {"skipped": "non-finite"}
        return {"fake": f"{row['loss_fake']:.3f}", "gen": f"{row['loss_gen']:.4f}"}

    # --------------------------------------------------------------------------------------- evaluation
    def student_weights(self):
        """The weights that are evaluated and exported: the student's EMA if enabled, else the live ones."""
        from contextlib import nullcontext
        return self.student_ema.swapped_in() if self.student_ema is not None else nullcontext()

    @torch.no_grad()
    def evaluate(self, per_prompt: int = 0) -> dict:
        e = self.cfg.eval
        n = per_prompt or e.per_prompt
        prompts = self.world.prompts(e.split)
        with self.as_student() as student, self.student_weights():
            images, records = generate_student(student, prompts, self.boundaries, n, e.seed, progress=False,
                                               processes=self.processes)
        fd = e.fd and not per_prompt  # an FD of fewer images is biased upwards: not comparable, not computed
        result = evaluate_images(images, [r["prompt"] for r in records], fd, self.world, self.processes)
        return self.runner.evaluation_row(result, images, n)

    initial_evaluation = evaluate

    # --------------------------------------------------------------------------------------- state
    def generators(self) -> dict[str, torch.Generator]:
        return {"main": self.gen}

    def named_trainables(self) -> list[tuple[str, torch.nn.Parameter]]:
        """Every trained parameter by name: ``student.<peft name>`` (or ``student.<module name>`` in full mode),
        ``fake.<peft name>`` and ``fake.step_embed``; checkpoints use these keys."""
        if self.cfg.student.mode == "lora":
            student = self.adapters.named_parameters(STUDENT)
        else:
            student = list(self.student.transformer.named_parameters())
        fake = self.adapters.named_parameters(FAKE) + ([("step_embed", self.step_embed)] if self.step_embed is not None else [])
        return [(f"student.{k}", p) for k, p in student] + [(f"fake.{k}", p) for k, p in fake]

    def state_tensors(self) -> tuple[dict, dict]:
        """Student, fake score, the student's EMA and both optimisers (the run adds counters and generators)."""
        tensors = {k: p.detach() for k, p in self.named_trainables()}
        flat, scalars = flatten_state(self._optimizers(), self._emas())
        return {**tensors, **flat}, {"optimizers": scalars}

    @torch.no_grad()
    def load_state(self, tensors: dict, state: dict) -> None:
        for k, p in self.named_trainables():
            p.copy_(tensors[k])
        load_flat_state(tensors, state["optimizers"], self._optimizers(), self._emas())

    def _optimizers(self) -> dict:
        return {"gen": self.gen_opt, "fake_opt": self.fake_opt}  # checkpoint keys gen.opt.*, fake_opt.opt.*

    def _emas(self) -> dict:
        return {"student_": self.student_ema} if self.student_ema is not None else {}  # student_ema.*

    def save(self) -> Path:
        return self.runner.save()

    def restore(self, path: Path) -> None:
        self.runner.restore(path)

    # --------------------------------------------------------------------------------------- loop
    def run(self, resume: bool = False) -> dict:
        return self.runner.run(resume)

    def export(self, folder: Path) -> None:
        """final/: lora/ (or pipeline/ in full mode) with sampler.json + USAGE.md, the stock diffusers call."""
        final = self.out / "final"
        with self.student_weights():  # the exported student is the evaluated one (its EMA if enabled)
            if self.cfg.student.mode == "lora":
                self.adapters.save_diffusers(STUDENT, folder / "lora")
                base, lora = self.base_path.resolve(), (final / "lora").resolve()
                write_sampler_files(folder / "lora", self.student, self.boundaries, base, lora)
            else:
                self.student.save_pretrained(folder / "pipeline")
                base, lora = (final / "pipeline").resolve(), None
        write_sampler_files(folder, self.student, self.boundaries, base, lora)

    def plot(self, rows: list[dict], out: Path) -> None:
        plot_distill_curves(rows, out / "curves.png", self.world.metric)

    def summary_names(self, first: dict, last: dict) -> tuple[str, str]:
        start = "student at init"
        return (f"{start} ({len(self.boundaries)} steps, no CFG)", f"{self.label} student (iteration {last['iteration']})")


def adam(params: list, lr: float, betas: tuple, weight_decay: float) -> torch.optim.Optimizer:
    """Adam, or AdamW (decoupled weight decay) when ``weight_decay`` > 0."""
    if weight_decay > 0:
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    return torch.optim.Adam(params, lr=lr, betas=betas)


def training_prompts(world, categories: list[str]) -> list[str]:
    """The world's train prompts, or those of ``categories`` (a world that names categories: ``category(p)``)."""
    prompts = world.prompts("train")
    if not categories:
        return prompts
    if not hasattr(world, "category"):
        raise UserError(f"r1.categories: the {world.name} world names no categories; leave it empty")
    chosen = [p for p in prompts if world.category(p) in categories]
    if not chosen:
        known = sorted({world.category(p) for p in prompts})
        raise UserError(f"r1.categories={categories}: no train prompt is in them; the categories are {known}")
    return chosen


def plot_distill_curves(rows: list[dict], path: Path, metric: str = "shapes-geneval") -> None:
    """Fake-score loss and teacher–fake score gap per iteration, and the student's evaluations, as one PNG."""
    plot_run(rows, path, "iteration", [("loss_fake", "loss_fake"), ("score_gap", "score_gap")], "student evaluation",
             metric)


def prepare_run_dir(cfg: DistillConfig, resume: bool, overrides=(), overwrite: bool = False, named: bool = True,
                    log=print) -> DistillConfig:
    """A new run's folder (claimed and holding the resolved ``config.yaml``), or with ``resume`` the run in
    ``cfg.run.out_dir`` reopened; see :mod:`dgpo.runtime.run_folder`."""
    if resume:
        return reopen_run(type(cfg), cfg.run.out_dir, overrides)
    return start_run(cfg, "tdm-r1 distill", overwrite=overwrite, named=named, log=log)
