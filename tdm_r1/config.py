"""The typed config of a TDM distillation run (``configs/tdm/*.yaml``); every field documented."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dgpo.config import from_dict, option, read_config_data, section
from dgpo.runtime.loop import EvalTiming, RunSettings
from dgpo.train_config import AdvantageConfig, RewardConfig
from tdm_r1.surrogate import SurrogateConfig


@dataclass
class TeacherConfig:
    base: str = option("", "saved SD3 pipeline folder of the teacher; empty = the embedded shapes base")
    base_config: str = option("configs/base/shapes_grammar_fidelity0.5.yaml", "pretraining recipe of the embedded base when base is empty")
    resolution: int = option(0, "image side in pixels the teacher and student sample at (0 = the pipeline's own)", min=0)
    guidance_scale: float = option(1.5, "CFG scale of the teacher's score in the generator target (<= 1: off)", min=0.0)
    mixed_precision: str = option("no", "autocast of the training iteration's transformer calls (rollout, fake "
                                  "score, surrogate, generator); optimisers stay fp32, evaluation runs in the weights' dtype",
                                  choices=("no", "bf16"))
    weights_dtype: str = option("fp32", "dtype the frozen teacher's weights load in (transformer, text encoders, "
                                "VAE): bf16 halves their memory on a GPU and needs mixed_precision=bf16 and "
                                "student.mode=lora; the adapters and their optimiser states stay fp32",
                                choices=("fp32", "bf16"))


@dataclass
class StudentConfig:
    nfe: int = option(4, "K: student steps (transformer evaluations per image)", min=1)
    boundaries: list[float] = option([], "σ_0 = 1 > … > σ_{K-1}: the student's noise levels (empty: by "
                                         "level_shift)")
    level_shift: float = option(0.0, "with boundaries empty: K levels evenly spaced before a shift s, u_j = 1 − j/K, "
                                "σ_j = s·u_j / (1 + (s − 1)·u_j) (the released TDM-R1 code's sampler: 3, giving "
                                "[1, 0.9, 0.75, 0.5] at K = 4); 0 = the pipeline scheduler's own K-step schedule",
                                min=0.0)
    mode: str = option("lora", "train LoRA adapters on the teacher's transformer or a full copy of it",
                       choices=("lora", "full"))
    lora_rank: int = option(32, "student LoRA rank", min=1)
    lora_alpha: float = option(32.0, "student LoRA alpha (scale = alpha / rank)", min=0.0)
    lora_targets: str = option("attention", "student LoRA layers: the joint-attention projections, or those and "
                               "the MLPs of both streams", choices=("attention", "attention_ff"))
    ema_decay: float = option(0.0, "EMA of the student's weights, used for evaluation and export (0 = off); "
                              "smooths the iteration-to-iteration swings of the student", min=0.0, max=1.0)


@dataclass
class FakeConfig:
    lora_rank: int = option(32, "fake-score LoRA rank (a second adapter on the teacher's backbone)", min=1)
    lora_alpha: float = option(32.0, "fake-score LoRA alpha", min=0.0)
    lora_targets: str = option("attention", "fake-score LoRA layers: the joint-attention projections, or those "
                               "and the MLPs of both streams", choices=("attention", "attention_ff"))
    importance: str = option("self_normalized", "importance weight of the fake loss: the exact ratio "
                             "self-normalised over the batch, its per-dimension geometric mean, or none",
                             choices=("self_normalized", "per_dim", "none"))
    updates_per_generator: int = option(1, "fake-score updates per generator update (the 1:1 default)", min=1)
    teacher_reg: float = option(0.0, "weight of mean‖v_fake − v_teacher‖² at the fake's points (the teacher's "
                                "conditional velocity) added to the fake score's loss (the released TDM-R1 code: "
                                "0.02; an extra teacher call per fake update)", min=0.0)


@dataclass
class ObjectiveConfig:
    tau: str = option("disjoint", "τ inside step k's own interval (σ_{k+1}, σ_k), or in (σ_{k+1}, 1) with k as "
                      "extra conditioning of the fake score", choices=("disjoint", "full"))
    tau_min: float = option(0.0, "lowest τ (x̂₀ of teacher and fake both collapse onto x_τ as τ → 0)",
                            min=0.0, max=0.99)
    tau_shift: float = option(1.0, "τ uniform in the unshifted levels, then shifted by this (1 = uniform in σ; the "
                              "released TDM-R1 code: 3, with tau=full and tau_margin=0.02)", min=1.0)
    tau_margin: float = option(0.0, "added to τ's lower end in the unshifted levels (the released code: 0.02)",
                               min=0.0, max=0.5)
    distance: str = option("l2", "generator distance to its target", choices=("l2", "huber"))
    huber_c: float = option(0.03, "c of the pseudo-Huber distance", min=0.0)
    normalise: bool = option(True, "divide the score difference by DMD's normaliser mean|x̂₀ − x̂₀^teacher|")
    dm_target: str = option("guided", "the teacher prediction distribution matching moves the student towards: the "
                            "teacher at teacher.guidance_scale (guided), or its conditional prediction with CFG as a "
                            "separate direction of weight objective.cfg_weight (conditional; the released TDM-R1 "
                            "code, scripts/train_tdmr1_pub.py: conditional, 0.3 at its CFG 4.5); both normalised "
                            "against the guided teacher; conditional costs one more teacher call per generator update",
                            choices=("guided", "conditional"))
    cfg_weight: float = option(0.3, "with dm_target=conditional, `tdm-r1 distill`: weight w of the CFG direction "
                               "(x̂₀^teacher,CFG − x̂₀^teacher)/n, so the target is the teacher at CFG "
                               "1 + w·(guidance_scale − 1); `tdm-r1 train` weighs it by r1.cfg_weight instead",
                               min=0.0)


@dataclass
class OptimConfig:
    batch_size: int = option(32, "student trajectories per iteration (prompts drawn from the train split)", min=1)
    generator_lr: float = option(3e-4, "Adam learning rate of the student (below the fake score's)", min=0.0)
    fake_lr: float = option(1e-3, "Adam learning rate of the fake score", min=0.0)
    betas: list[float] = option([0.0, 0.99], "Adam betas [β₁, β₂] of both optimisers, each in [0, 1) (β₁ = 0, as "
                                "in DMD/TDM)", min=0.0, max=0.9999, length=2)
    weight_decay: float = option(0.0, "decoupled weight decay of both optimisers (AdamW; 0 = Adam; the released "
                                 "TDM-R1 code: 1e-4 with betas [0, 0.999])", min=0.0)
    grad_clip: float = option(1.0, "global gradient-norm clip (0 = off)", min=0.0)
    max_skipped_steps: int = option(3, "an iteration that meets a non-finite loss, gradient or reward is skipped "
                                    "from there on with a warning; after this many in a row the run stops with a "
                                    "clear message (0: at the first)", min=0)


@dataclass
class EvalSection(EvalTiming):
    every: int = option(100, "evaluate the student every N iterations (and at the start and end; 0 = by iterations "
                        "never, only at the start, the end and every_minutes)", min=0)
    split: str = option("test", "prompts to evaluate on", choices=("train", "test", "all"))
    per_prompt: int = option(8, "images per prompt", min=1)
    seed: int = option(1000, "seed of the first evaluation image", min=0)
    fd: bool = option(True, "compute the quality FD")


@dataclass
class RunConfig(RunSettings):
    out_dir: str = option("runs/tdm-shapes", "run folder (config, metrics, grids, checkpoints, final LoRA)")
    iterations: int = option(5000, "maximum generator updates", min=0)
    checkpoint_every: int = option(100, "save a full checkpoint every N iterations", min=1)


@dataclass
class R1Config:
    """TDM-R1 (arXiv 2603.07700): reinforce the few-step student with a non-differentiable reward through the
    stepwise surrogate (:mod:`tdm_r1.surrogate`); off = plain TDM distillation."""
    enabled: bool = option(False, "a TDM-R1 run: TDM plus the surrogate reward and its direction (`tdm-r1 train` "
                           "sets it; a config file with r1.enabled: true is read as TDM-R1's)")
    init_run: str = option("", "a `tdm-r1 distill` run folder whose latest checkpoint gives the starting student "
                           "and fake score (empty: start from the teacher)")
    init_lora: str = option("", "a student LoRA folder to start from instead (RUN/final/lora, or a published TDM "
                            "student converted by `tdm-r1 convert`); the fake score starts at the teacher, and the "
                            "folder's sampler.json gives the student's levels when student.boundaries is empty")
    group_size: int = option(4, "G: student rollouts per prompt (a group); optim.batch_size = P × G", min=2)
    categories: list[str] = option([], "train only on prompts of these world categories (empty: all train "
                                   "prompts), e.g. [position, counting]")
    reward_source: str = option("surrogate", "how the reward reaches the student: TDM-R1's surrogate and its reward "
                                "direction, or directly (the paper's TDM + RL baseline, tdm_r1.direct_rl): the "
                                "surrogate section's group loss on the student's own weights against the starting "
                                "student, its own Adam step beside TDM's (no surrogate; needs student.mode=lora)",
                                choices=("surrogate", "direct"))
    rl_cfg: float = option(4.5, "CFG scale of the surrogate's x̂₀ in the reward direction", min=0.0)
    reward_reference: str = option("conditional", "what the surrogate's guided x̂₀ is compared with in the reward "
                                   "direction: the base's conditional x̂₀ (the released code: the direction then also "
                                   "carries CFG at rl_cfg), or the base at the same rl_cfg (the surrogate's learned "
                                   "shift alone)", choices=("conditional", "guided"))
    t_min: float = option(0.0, "τ′ ~ U[max(σ_{k+1}, t_min), 1]: where the reward direction is read", min=0.0,
                          max=0.99)
    tau_shift: float = option(1.0, "τ′ uniform in the unshifted levels, then shifted by this (1: uniform in σ); the "
                              "released TDM-R1 code (scripts/train_tdmr1_pub.py): 3, which puts fewer reads where "
                              "the surrogate never trained", min=1.0)
    tau_margin: float = option(0.0, "τ′'s lower end raised by this in the unshifted levels (the released code: 0.02)",
                               min=0.0, max=0.5)
    trunc_steps: int = option(0, "steps k < trunc_steps take the early weights, the rest the late ones "
                              "(0 = all steps early, the released recipe's default)", min=0)
    reward_weight: float = option(0.7, "weight of the reward direction, early steps (released recipe)", min=0.0)
    cfg_weight: float = option(0.3, "weight of the CFG direction, early steps (released recipe)", min=0.0)
    dm_weight: float = option(1.0, "weight of TDM's distribution-matching direction, early steps", min=0.0)
    late_cfg_weight: float = option(0.3, "weight of the CFG direction after trunc_steps", min=0.0)
    late_dm_weight: float = option(0.3, "weight of the distribution-matching direction after trunc_steps", min=0.0)


R1_SECTIONS = ("r1", "surrogate", "reward", "advantage")  # TDM-R1's own: a TDM run carries none of them


@dataclass
class DistillConfig:
    """A TDM run (``tdm-r1 distill``); :class:`ReinforceConfig` adds TDM-R1's sections."""

    world: str = option("shapes", "the world: train/test prompts, task and quality metric (dgpo.worlds registry), "
                        "or a JSON-lines prompt file PATH.jsonl (dgpo.worlds.prompt_file)")
    run: RunConfig = section(RunConfig, "run folder, length")
    teacher: TeacherConfig = section(TeacherConfig, "the teacher (the base model)")
    student: StudentConfig = section(StudentConfig, "the few-step student")
    fake: FakeConfig = section(FakeConfig, "the fake score")
    objective: ObjectiveConfig = section(ObjectiveConfig, "the TDM objective")
    optim: OptimConfig = section(OptimConfig, "optimisers")
    eval: EvalSection = section(EvalSection, "evaluation of the student on test prompts")

    @classmethod
    def saved_data(cls, data: dict) -> dict:
        """A run folder's saved config as this type reads it: a TDM run saved before TDM-R1's sections were
        its own carried them unused (``r1.enabled: false``); they are left out."""
        if cls is not DistillConfig:
            return data
        if (data.get("r1") or {}).get("enabled"):
            from dgpo.errors import UserError
            raise UserError("this is a TDM-R1 run's config (r1.enabled: true): use tdm-r1 train (--resume RUN)")
        if (data.get("r1") or {}).get("enabled") is None:
            return data  # TDM-R1 sections without r1.enabled: refused by name when read (config_class_of)
        return {k: v for k, v in data.items() if k not in R1_SECTIONS}


@dataclass
class ReinforceConfig(DistillConfig):
    """A TDM-R1 run (``tdm-r1 train``, ``tdm-r1 surrogate``): TDM's sections and TDM-R1's."""

    r1: R1Config = section(R1Config, "TDM-R1: the starting student and the reward term")
    surrogate: SurrogateConfig = section(SurrogateConfig, "TDM-R1's stepwise surrogate reward")
    reward: RewardConfig = section(RewardConfig, "TDM-R1's reward: labels of the student's rollouts only")
    advantage: AdvantageConfig = section(AdvantageConfig, "TDM-R1's group advantages")


def config_class_of(data: dict) -> type[DistillConfig]:
    """The config type of a config's data: TDM-R1's when ``r1.enabled``, else TDM's. A TDM config that sets a
    TDM-R1 section without saying ``r1.enabled: false`` is refused (the keys would do nothing)."""
    enabled = (data.get("r1") or {}).get("enabled")
    if enabled:
        return ReinforceConfig
    if enabled is None and any(k in data for k in R1_SECTIONS):
        from dgpo.config import ConfigError
        first = next(k for k in R1_SECTIONS if k in data)
        raise ConfigError(f"section {first}: TDM-R1's (tdm-r1 train); tdm-r1 distill trains plain TDM: remove it")
    return DistillConfig


def load_distill_config(path: str | Path | None, overrides=()) -> DistillConfig:
    """A TDM config (:class:`DistillConfig`), or a TDM-R1 one (:class:`ReinforceConfig`) when it says
    ``r1.enabled``; checked across keys before any model loads."""
    from dgpo.config import ConfigError
    data = read_config_data(path, overrides)
    cls = config_class_of(data)
    cfg = from_dict(cls, cls.saved_data(data))
    if cfg.student.boundaries and len(cfg.student.boundaries) != cfg.student.nfe:
        raise ConfigError(f"student.boundaries has {len(cfg.student.boundaries)} levels but student.nfe is "
                          f"{cfg.student.nfe}: give one level per step (starting at 1.0) or leave it empty")
    if cfg.teacher.weights_dtype == "bf16" and (cfg.teacher.mixed_precision != "bf16" or cfg.student.mode != "lora"):
        raise ConfigError("teacher.weights_dtype=bf16 needs teacher.mixed_precision=bf16 and student.mode=lora (a "
                          "full student would train bf16 weights)")
    if not isinstance(cfg, ReinforceConfig):
        return cfg
    if cfg.r1.reward_source == "direct" and cfg.student.mode != "lora":
        from dgpo.config import ConfigError
        raise ConfigError("r1.reward_source=direct trains the student's LoRA with DGPO's loss: set student.mode=lora")
    if cfg.optim.batch_size % cfg.r1.group_size:
        raise ConfigError(f"optim.batch_size={cfg.optim.batch_size} is not a multiple of r1.group_size="
                          f"{cfg.r1.group_size}: a batch is P prompts × G rollouts")
    if cfg.reward.name:
        from dgpo.rewards import available_rewards
        if cfg.reward.name not in available_rewards():
            raise ConfigError(f"reward.name: {cfg.reward.name!r} is not a registered reward; choose one of "
                              f"{available_rewards()}")
    return cfg
