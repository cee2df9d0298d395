"""The typed config of an online RL run (``configs/dgpo/*.yaml``); every field documented."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from dgpo.config import option, section
from dgpo.runtime.loop import EvalTiming, RunSettings
from dgpo.evaluation.evaluate import SamplerConfig
from dgpo.sampling.ode import SOLVERS


@dataclass
class ModelConfig:
    base: str = option("", "saved SD3 pipeline folder; empty = the embedded shapes base of base_config (shipped, or pretrained once)")
    base_config: str = option("configs/base/shapes_grammar_fidelity0.5.yaml", "pretraining recipe of the embedded base when base is empty")
    merge_lora: str = option("", "a diffusers LoRA folder fused into the base before training, e.g. a few-step "
                             "student's final/lora: the run trains a new LoRA on top, and its reference (the "
                             "policy off) is the base with this LoRA fused")
    resolution: int = option(0, "image side in pixels the model samples and trains at (0 = the pipeline's own: "
                             "1024 for SD3.5 and FLUX.1; the released DGPO recipes use 512)", min=0)
    lora_rank: int = option(16, "LoRA rank on the transformer's attention projections", min=1)
    lora_alpha: float = option(16.0, "LoRA alpha (scale = alpha / rank)", min=0.0)
    lora_targets: str = option("attention", "layers that get adapters: the joint-attention projections, or those "
                               "and the feed-forward layers of both streams", choices=("attention", "attention_ff"))
    gradient_checkpointing: bool = option(False, "recompute activations in backward (saves memory, costs time)")
    mixed_precision: str = option("no", "accelerate mixed precision", choices=("no", "bf16", "fp16"))
    weights_dtype: str = option("fp32", "dtype the frozen weights load in (transformer, text encoders, VAE): bf16 "
                                "halves their memory on a GPU and needs mixed_precision=bf16; the LoRA adapters and "
                                "their optimiser state stay fp32", choices=("fp32", "bf16"))


@dataclass
class RolloutConfig:
    prompts_per_epoch: int = option(8, "P: prompts per epoch (from the train split)", min=1)
    group_size: int = option(8, "G: samples per prompt, each from its own initial noise", min=2)
    steps: int = option(10, "ODE steps of a training rollout", min=1)
    guidance_scale: float = option(1.5, "CFG scale of rollouts (<= 1: no CFG)", min=0.0)
    solver: str = option("euler", "ODE solver of rollouts", choices=SOLVERS)
    sigmas: list[float] = option([], "explicit noise levels of ODE rollouts as the stock pipeline's sigmas= takes "
                                 "them (Euler, one step each; e.g. a student's final/sampler.json); empty: `steps`")
    policy: str = option("current", "who samples: the current weights or their EMA", choices=("current", "ema"))
    ema_after: int = option(0, "with policy=ema: use the current weights for the first N epochs", min=0)
    prompt_weighting: str = option("uniform", "uniform over train prompts, or 'failure': weight each prompt by "
                                   "max(1 − r̄, floor)^power, r̄ its EMA training reward (dgpo.methods.prompt_sampling)",
                                   choices=("uniform", "failure"))
    failure_power: float = option(2.0, "prompt_weighting=failure: how sharply failing prompts are preferred", min=0.0)
    failure_floor: float = option(0.05, "prompt_weighting=failure: least weight base (solved prompts stay in)",
                                  min=0.0, max=1.0)
    failure_decay: float = option(0.5, "prompt_weighting=failure: EMA decay of r̄ per visit", min=0.0, max=1.0)


@dataclass
class RewardConfig:
    name: str = option("", "reward: empty = the world's own (shapes: shapes_partial); shapes_strict, shapes_mixed, "
                       "shapes_soft, ocr, clip_score, pickscore, hpsv2, aesthetic, vlm_judge, remote, or a registered name; several "
                       "joined by + "
                       "(ocr+shapes_strict)")
    model: str = option("", "the model a model-based reward reads: clip_score and pickscore a local transformers "
                        "CLIP folder, hpsv2 CHECKPOINT.pt,CLIP_TOKENIZER_DIR, aesthetic CLIP_DIR,HEAD.pth, vlm_judge "
                        "the served model's name "
                        "(docs/rewards.md)")
    weights: list[float] = option([], "with several rewards: one weight each (empty = all 1)")
    combine: str = option("sum", "with several rewards: sum (one reward, Σ w_k r_k) or advantages (Σ w_k A_k, each "
                          "reward normalised within its groups)", choices=("sum", "advantages"))
    url: str = option("", "reward server URL (name=remote; several, comma-separated, share the load); a token the "
                      "server requires is read from the environment variable DGPO_REWARD_TOKEN")
    timeout: float = option(30.0, "reward server timeout in seconds (name=remote)", min=0.1)
    retries: int = option(2, "further attempts of a request after a connection error, a timeout or HTTP 502/503/504 "
                          "(name=remote)", min=0)
    batch_size: int = option(0, "images per request, sent concurrently (name=remote; 0 = the whole batch in one)", min=0)
    score_range: list[float] = option([], "[low, high] every score of a served reward must lie in; an answer outside "
                                      "it is an error naming the server (name=remote; empty = any finite number)",
                                      length=(0, 2))


@dataclass
class AdvantageConfig:
    std: str = option("group", "divide by the per-prompt std, the batch std, or nothing", choices=("group", "batch", "none"))
    eps: float = option(1e-4, "added to the std", min=0.0)
    clip: float = option(5.0, "clip advantages to ±clip (0 = off)", min=0.0)


@dataclass
class ObjectiveConfig:
    name: str = option("dgpo", "training objective: a registered method (dgpo.methods; built in: dgpo, flow_grpo, "
                       "diffusion_dpo, nft); the DGPO keys below apply to dgpo, other methods have their own section")
    beta: float = option(100.0, "β of the group DPO loss", min=0.0)
    normalization: str = option("group_size", "β/|g| (paper), none, or the released code's gradient-equivalent scaling",
                                choices=("group_size", "none", "gradient_equivalent"))
    timesteps_per_sample: int = option(1, "M: noise levels per sample per epoch", min=1)
    t_min: float = option(0.4, "timestep clip: σ drawn from [t_min, 1] before the schedule shift", min=0.0, max=1.0)
    shift: float = option(-1.0, "shift of the training noise levels (-1 = the scheduler's)", min=-1.0)
    reference: str = option("base", "π_ref: the frozen base (adapters off) or an EMA of the policy ('dynamic')",
                            choices=("base", "ema"))
    reference_ema_decay: float = option(0.99, "decay of the EMA reference", min=0.0, max=1.0)
    reference_cfg: float = option(1.0, "CFG scale on the reference branch (<= 1: off)", min=0.0)
    kl_weight: float = option(0.0, "β_KL · ‖v_θ − v_ref‖² added to the loss", min=0.0)
    clip_range: float = option(0.0, "PPO-style clip of ℓ_θ − ℓ_old against an EMA 'old' model (0 = off)", min=0.0)
    old_ema_decay: float = option(0.9, "decay of the EMA 'old' model used by clip_range", min=0.0, max=1.0)


@dataclass
class OptimConfig:
    name: str = option("adamw", "optimiser: adamw (moves every coordinate by about lr per step, whatever the "
                       "gradient's signal-to-noise) or sgd (steps proportional to the gradient, with momentum)",
                       choices=("adamw", "sgd"))
    lr: float = option(3e-4, "learning rate", min=0.0)
    betas: list[float] = option([0.9, 0.999], "AdamW betas [β₁, β₂], each in [0, 1)", min=0.0, max=0.9999,
                                length=2)
    momentum: float = option(0.9, "SGD momentum (optim.name=sgd)", min=0.0, max=0.999)
    weight_decay: float = option(0.0, "weight decay (decoupled for AdamW, L2 for SGD)", min=0.0)
    lr_schedule: str = option("constant", "constant, or cosine: lr decays to lr_min_ratio·lr over the run "
                              "(over run.time_budget_min of training when a budget is set, else over run.epochs)",
                              choices=("constant", "cosine"))
    lr_min_ratio: float = option(0.1, "lr_schedule=cosine: the final learning rate as a fraction of lr",
                                 min=0.0, max=1.0)
    grad_clip: float = option(1.0, "global gradient-norm clip (0 = off)", min=0.0)
    max_skipped_steps: int = option(3, "a step whose loss, gradient or reward is not finite is skipped with a warning; "
                                    "after this many in a row the run stops with a clear message (0: at the first)",
                                    min=0)
    micro_batch: int = option(64, "samples per forward/backward (whole groups; gradients accumulate)", min=1)
    steps_per_epoch: int = option(1, "optimiser steps per epoch (1 = the whole batch accumulates into one)", min=1)
    ema_decay: float = option(0.95, "decay of the policy EMA (used by rollout.policy=ema)", min=0.0, max=1.0)


@dataclass
class EvalSection(EvalTiming):
    every: int = option(25, "evaluate every N epochs (and at the start and end; 0 = by epochs never, only at the "
                        "start, the end and every_minutes)", min=0)
    split: str = option("test", "prompts to evaluate on", choices=("train", "test", "all"))
    per_prompt: int = option(16, "images per prompt", min=1)
    rewards: list[str] = option([], "evaluation-only rewards: each one's mean on the evaluation images is logged "
                                "beside the task metric (eval_rewards), so a trained reward that is hacked shows "
                                "as diverging curves")
    seed: int = option(1000, "seed of the first evaluation image", min=0)
    fd: bool = option(True, "compute the quality FD")
    cache_initial: bool = option(True, "reuse the epoch-0 evaluation of a run with the same base and protocol "
                                 "(at epoch 0 every method's policy is the base; dgpo.evaluation.cache)")
    sampler: SamplerConfig = section(SamplerConfig, "the evaluation sampler")


@dataclass
class RunConfig(RunSettings):
    out_dir: str = option("runs/dgpo-shapes", "run folder (config, metrics, grids, checkpoints, final LoRA)")
    epochs: int = option(1000, "maximum epochs (one rollout batch each)", min=0)
    checkpoint_every: int = option(50, "save a full checkpoint every N epochs", min=1)


@dataclass
class TrainConfig:
    """The sections every method shares; :func:`train_config_class` adds each registered method's own."""

    world: str = option("shapes", "the world: train/test prompts, task and quality metric (dgpo.worlds registry), "
                        "or a JSON-lines prompt file PATH.jsonl (dgpo.worlds.prompt_file)")
    run: RunConfig = section(RunConfig, "run folder, length, logging")
    model: ModelConfig = section(ModelConfig, "base model and LoRA")
    rollout: RolloutConfig = section(RolloutConfig, "online rollouts")
    reward: RewardConfig = section(RewardConfig, "the reward")
    advantage: AdvantageConfig = section(AdvantageConfig, "group advantages")
    objective: ObjectiveConfig = section(ObjectiveConfig, "the training objective (and DGPO's settings)")
    optim: OptimConfig = section(OptimConfig, "optimiser")
    eval: EvalSection = section(EvalSection, "evaluation on test prompts")


def train_config_class(method: str | None = None) -> type:
    """The config type of a training run: :class:`TrainConfig` plus the own section of the method ``method``
    (``Objective.config_section``; e.g. ``flow_grpo:``), or of every registered method when None (what reads a
    config written before sections were chosen, and ``--help``). Built from the registry when called: a method
    registered before a run is loaded is part of it."""
    from dgpo.methods import method_sections
    sections = tuple((name, spec) for name, spec in method_sections().items() if method in (None, name))
    if sections not in _CLASSES:
        fields = [(name, cls, section(cls, f"{label} (objective.name={name})")) for name, (cls, label) in sections]
        _CLASSES[sections] = dataclasses.make_dataclass("TrainConfig", fields, bases=(TrainConfig,))
    return _CLASSES[sections]


_CLASSES: dict[tuple, type] = {}
