"""The DGPO recipe (and its baselines): one epoch = rollout → reward → advantage → update.

One epoch samples P train prompts, G rollouts each from different initial noise (drawn by the objective's
sampler: ODE for DGPO, Diffusion-DPO and DiffusionNFT, SDE with log-probs for Flow-GRPO; see
:mod:`dgpo.methods`), scores the decoded images with the reward, turns rewards into group advantages and
takes ``optim.steps_per_epoch`` passes of the objective's optimiser steps on that batch (gradients of
micro-batches accumulate; DGPO takes one step per pass on the whole batch). The run around the epochs —
the folder, evaluation every ``eval.every`` epochs (and every ``eval.every_minutes`` of training),
checkpoints and exact resume, metrics, the final export and summary — is :class:`dgpo.runtime.loop.Run`'s. Counted:
training wall-clock (evaluation excluded) and transformer evaluations (NFE: single-sample transformer
calls, counted at the transformer, rollouts and updates alike; evaluation excluded).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
import shutil
from pathlib import Path

import numpy as np
import torch

from dgpo.runtime.checkpoint import flatten_state, load_flat_state
from dgpo.config import flat_dict, to_dict
from dgpo.evaluation import cache as eval_cache
from dgpo.methods.batch import RolloutBatch, checked_rewards, score_groups
from dgpo.runtime.nonfinite import NonFiniteRewards, NonFiniteStep, SkipGuard
from dgpo.runtime.ema import EMA
from dgpo.sampling.generation import timed
from dgpo.methods import make_objective
from dgpo.errors import UserError
from dgpo.runtime.run_folder import reopen_run, start_run
from dgpo.runtime.loop import Counters, Run, Schedule, plot_run
from dgpo.evaluation.evaluate import EvalConfig, evaluate_model
from dgpo.models.handle import FlowModel, PromptEmbeds, t5_tokens_of
from dgpo.models.families import WEIGHTS_DTYPES, load_model
from dgpo.models.adapters import AdapterRoles
from dgpo.models.prompt_encodings import PromptEncodings
from dgpo.runtime.runtime import Runtime
from dgpo.methods.prompt_sampling import PromptSampler
from dgpo.rewards import make_reward, metadata_of, reward_of_run
from dgpo.rewards.registry import check_reward_weights
from dgpo.runtime.sharding import shard_frozen_model
from dgpo.train_config import TrainConfig, train_config_class
from dgpo.worlds.registry import make_world

POLICY = "policy"  # the adapter role DGPO and its baselines train


# ------------------------------------------------------------------------------------------- set-up

def resolve_base(cfg: TrainConfig, log=print) -> tuple[Path, int]:
    """The base pipeline folder (``model.base``, or the world's embedded base) and its zero T5 tokens."""
    path = Path(cfg.model.base) if cfg.model.base else make_world(cfg.world).embedded_base(cfg.model.base_config, log)
    return path, t5_tokens_of(path)


def build_optimizer(params: list[torch.nn.Parameter], cfg) -> torch.optim.Optimizer:
    """The optimiser of ``optim`` (:class:`dgpo.train_config.OptimConfig`): AdamW, or SGD with momentum.

    Why both: Adam's step is about lr per coordinate whatever the gradient's signal-to-noise ratio, so with a
    few samples per step (noise-dominated gradients) it random-walks the LoRA at a fixed speed; SGD's step
    is lr × the (momentum-averaged) gradient, so it shrinks where the gradient is noise that averages out.
    """
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def scheduled_lr(cfg, progress: float) -> float:
    """The learning rate of ``optim`` (:class:`dgpo.train_config.OptimConfig`) at ``progress`` ∈ [0, 1] of the run.

    constant: lr. cosine: lr · (r + (1 − r) · ½ (1 + cos(π p))), r = ``lr_min_ratio``, p clamped to [0, 1]
    (Loshchilov & Hutter 2017, SGDR Eq. 5, one cycle). Why decay: with a few samples per step the update is
    mostly noise, and a constant step size keeps the weights wandering at a distance from where the signal
    points that grows with lr; shrinking the step late in the run lets them settle.
    """
    if cfg.lr_schedule == "constant":
        return cfg.lr
    p = min(max(progress, 0.0), 1.0)
    return cfg.lr * (cfg.lr_min_ratio + (1.0 - cfg.lr_min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p)))


def nfe_per_epoch(cfg: TrainConfig) -> int:
    """DGPO's transformer evaluations per epoch: rollouts (×2 with CFG) + training (policy + reference per
    level). The trainer counts NFE at the transformer for every objective; for DGPO the count equals this."""
    n = cfg.rollout.prompts_per_epoch * cfg.rollout.group_size
    rollout = n * (len(cfg.rollout.sigmas) or cfg.rollout.steps) * (2 if cfg.rollout.guidance_scale > 1 else 1)
    ref = 2 if cfg.objective.reference_cfg > 1 else 1
    old = 1 if cfg.objective.clip_range > 0 else 0
    train = n * cfg.objective.timesteps_per_sample * (1 + ref + old) * cfg.optim.steps_per_epoch
    return rollout + train


class Trainer:
    """Holds the model, optimiser, EMAs and counters of one run; ``run()`` is the loop."""

    def __init__(self, cfg: TrainConfig, log=print, *, model: FlowModel | None = None, reward=None):
        """Build the run's components from ``cfg``; ``model`` (a :class:`FlowModel`, e.g. one built in memory)
        and ``reward`` (a callable ``(images, prompts) -> scores``) replace the configured ones when given, so
        tools compose a trainer instead of copying its epoch."""
        self.cfg = cfg
        self.out = Path(cfg.run.out_dir)
        self.runtime = Runtime(cfg.run.seed, cfg.model.mixed_precision, cfg.run.threads, cfg.run.tracker, self.out, log)
        self.processes, self.log = self.runtime.processes, self.runtime.log
        log = self.log
        sharded = self.processes.sharded
        if sharded and cfg.model.mixed_precision == "fp16":  # accelerate would unscale fp16 gradients twice
            raise UserError("model.mixed_precision=fp16 under an FSDP launch: use bf16 (or a launch without FSDP)")
        if model is None:
            self.base_path, _ = self.processes.main_first(lambda: resolve_base(cfg, log))
            dtype = WEIGHTS_DTYPES[cfg.model.weights_dtype]
            model = load_model(self.base_path, torch.float32 if cfg.model.merge_lora else dtype, cfg.model.resolution)
            if cfg.model.merge_lora:  # fused in fp32, then rounded once (a LoRA's deltas are below bf16's step)
                model.fuse_lora(cfg.model.merge_lora)
                model.to(dtype)
        else:
            self.base_path = Path(cfg.model.base or "in-memory-model")
        self.model = model.to(self.runtime.device)
        if self.model.dtype != torch.float32 and cfg.model.mixed_precision != "bf16":
            raise UserError(f"the model's frozen weights are {self.model.dtype}: train it with "
                            f"model.mixed_precision=bf16 (the training step autocasts to the weights' dtype)")
        backbone = self.model.transformer
        self.adapters = AdapterRoles(backbone)  # the reference = the backbone with the policy off
        self.params = self.adapters.add(POLICY, cfg.model.lora_rank, cfg.model.lora_alpha,
                                        self.model.lora_targets(cfg.model.lora_targets), seed=cfg.run.seed)
        if cfg.model.gradient_checkpointing:
            backbone.enable_gradient_checkpointing()
        self.optimizer = self.runtime.prepare(build_optimizer(self.params, cfg.optim))  # fp16: its loss scaler
        self.policy_ema = EMA(self.params, cfg.optim.ema_decay)
        self.nonfinite = SkipGuard(cfg.optim.max_skipped_steps, log, "lower optim.lr or the objective's beta, set "
                                   "optim.grad_clip, or check the reward")
        self.world = make_world(cfg.world)
        self.eval_rewards = {name: make_reward(name) for name in cfg.eval.rewards}  # logged beside, never trained on
        if reward is None:
            self.reward_name, self.reward = reward_of_run(cfg.reward, self.world)
        else:
            self.reward_name, self.reward = cfg.reward.name or self.world.reward, reward
        self.gen = torch.Generator().manual_seed(cfg.run.seed)
        self.train_prompts = self.world.prompts("train")
        r = cfg.rollout
        self.prompt_sampler = PromptSampler(self.train_prompts, r.prompts_per_epoch, r.prompt_weighting,
                                            r.failure_power, r.failure_floor, r.failure_decay)
        self.counters = Counters()
        run = cfg.run
        self.runner = Run(self, self.out, Schedule.of(run, run.epochs, cfg.eval),
                          step_key="epoch", grid_prefix="epoch", log=log, processes=self.processes,
                          tracking=(self.runtime, "dgpo", flat_dict(to_dict(cfg))))
        self.shift = cfg.objective.shift if cfg.objective.shift > 0 else self.model.scheduler_config.shift
        self.objective = make_objective(cfg, self.model, self.params, self.shift)
        if self.processes.distributed and not self.objective.multi_process:
            raise UserError(f"objective.name={cfg.objective.name}: {self.objective.label} runs on one process only "
                            f"({self.objective.multi_process_note}); launch it without accelerate's --num_processes")
        self.processes.rows(cfg.rollout.prompts_per_epoch * cfg.rollout.group_size,
                            "an epoch (rollout.prompts_per_epoch × rollout.group_size)")
        self.calls = self.runtime.count_calls(backbone)  # NFE, counted at the transformer
        if sharded:  # an FSDP launch: the frozen model split over the processes
            shard_frozen_model(self.model, self.processes, log)
        self.embeds_of = PromptEncodings(self.model, self.train_prompts)  # each prompt encoded once

    @property
    def label(self) -> str:
        return self.objective.label

    #: What lowers a step's memory, for the memory messages of :class:`dgpo.runtime.loop.Run`.
    memory_levers = ("lower optim.micro_batch (samples per forward/backward) or set "
                     "model.gradient_checkpointing=true")

    def emas(self) -> dict[str, EMA]:
        """Every EMA that is checkpointed: the policy's and the objective's (e.g. DGPO's "ref"/"old")."""
        return {"policy": self.policy_ema, **self.objective.emas()}

    # --------------------------------------------------------------------------------------- epoch parts
    def sample_prompts(self) -> list[str]:
        return self.prompt_sampler.sample(self.gen)

    def rollout_policy(self):
        use_ema = self.cfg.rollout.policy == "ema" and self.counters.epoch >= self.cfg.rollout.ema_after
        return self.policy_ema.swapped_in() if use_ema else nullcontext()

    @torch.no_grad()
    def rollout(self, prompts: list[str]) -> tuple[torch.Tensor, np.ndarray, PromptEmbeds, list[str], dict]:
        """G samples per prompt from the objective's sampler, for this process's rows of the epoch's global
        batch (all of it on one process): latents (n, C, h, w), uint8 images, embeddings, prompts and the
        sampler's per-sample extras. The initial noise is drawn for the whole global batch (:mod:`dgpo.runtime.processes`)."""
        g = self.cfg.rollout.group_size
        everyone = [p for p in prompts for _ in range(g)]
        rows = self.processes.rows(len(everyone))
        flat = [everyone[i] for i in rows.tolist()]
        embeds = self.embeds_of.batch(everyone, rows)
        noise = torch.randn((len(everyone), *self.model.latent_shape), generator=self.gen)[rows].to(self.model.device)
        with self.objective.rollout_context() or self.rollout_policy():
            latents, extras = self.objective.rollout(embeds, noise, self.gen, rows=rows, total=len(everyone))
        images = self.model.decode_latents(latents)
        return latents, images, embeds, flat, extras

    def score(self, images: np.ndarray, prompts: list[str]) -> torch.Tensor:
        return checked_rewards(self.reward, images, prompts, self.reward_name)

    def run_progress(self) -> float:
        """Fraction of the run done before this epoch: of the time budget if one is set, else of run.epochs.
        Both counters are checkpointed, so a resumed run continues the same schedule."""
        budget = self.cfg.run.time_budget_min * 60
        if budget:
            return self.counters.train_seconds / budget
        return self.counters.epoch / max(self.cfg.run.epochs, 1)

    def update(self, batch: RolloutBatch) -> dict:
        """The objective's optimiser steps on this epoch's batch; returns its diagnostics averaged over them."""
        lr = scheduled_lr(self.cfg.optim, self.run_progress())
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        steps: list[dict] = []
        for _ in range(self.cfg.optim.steps_per_epoch):
            for part in self.objective.minibatches(batch, self.gen):
                try:  # a non-finite forward (the loss's inputs), loss or gradient: nothing steps
                    stats = self.processes.mean_stats(self.objective.backward(part, self.gen, self.runtime.backward))
                    stats["grad_norm"] = self.runtime.optimizer_step(self.optimizer, self.params, stats["loss"],
                                                                     self.cfg.optim.grad_clip, "policy")
                except NonFiniteStep as fault:
                    self.skip_nonfinite_step(str(fault))
                    continue
                self.nonfinite.passed()
                steps.append(stats)
        step = self.counters.epoch
        self.policy_ema.update(step)
        self.objective.after_epoch(step)
        if not steps:
            return {"loss": float("nan"), "skipped": 1.0, "lr": lr}
        return {**{k: sum(s[k] for s in steps) / len(steps) for k in steps[0]}, "lr": lr}

    def skip_nonfinite_step(self, fault: str) -> None:
        """A non-finite loss, gradient or reward: no optimiser step, a warning; after ``optim.max_skipped_steps``
        in a row, a UserError (:mod:`dgpo.runtime.nonfinite`)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite.skip(f"epoch {self.counters.epoch + 1}", fault)

    def train_step(self) -> dict:
        """One epoch (:meth:`_epoch`: rollout → reward → advantages → update), timed and counted by the run; its
        metrics row."""
        return self.runner.timed_step(self._epoch)

    epoch = train_step

    def _epoch(self) -> tuple[dict, int]:
        """Rollout, reward and update, each timed (device synchronised) into the row as ``rollout_s``,
        ``reward_s`` and ``update_s``; transformer calls counted (``rollout_nfe``: the rollout's share)."""
        prompts = self.sample_prompts()
        self.calls.start()
        device = self.model.device
        try:
            with self.runtime.autocast():  # model.mixed_precision (a no-op at "no")
                (latents, images, embeds, flat, extras), rollout_s = timed(lambda: self.rollout(prompts), device)
                rollout_calls = self.calls.calls
                try:
                    scored, reward_s = timed(lambda: score_groups(
                        self.reward, images, flat, self.cfg.rollout.group_size, self.cfg.advantage,
                        self.reward_name, self.processes, metadata_of(self.world, flat)),
                        device)  # every process's rewards, global groups
                except NonFiniteRewards as fault:  # no update learns from it; the epoch is counted
                    self.skip_nonfinite_step(str(fault))
                    return {"reward": float("nan"), "loss": float("nan"), "skipped": 1.0,
                            "rollout_s": round(rollout_s, 3), "rollout_nfe": self.calls.total(rollout_calls)
                            }, self.calls.total()
                rewards = scored.rewards
                self.prompt_sampler.observe(prompts, rewards.view(len(prompts), -1).double().mean(1))
                rows = self.processes.rows(len(rewards))
                batch = RolloutBatch(latents, embeds, scored.advantages[rows].to(latents.device),
                                     scored.group_ids[rows].to(latents.device), extras, rows=rows,
                                     epoch_group_ids=scored.group_ids, total=len(rewards), processes=self.processes)
                stats, update_s = timed(lambda: self.update(batch), device)
        finally:
            self.calls.stop()
        calls = self.calls.total()
        return {"reward": rewards.mean().item(), "reward_std": rewards.std().item(),
                **{k: v if k == "lr" else round(v, 6) for k, v in stats.items()},
                "rollout_s": round(rollout_s, 3), "reward_s": round(reward_s, 3), "update_s": round(update_s, 3),
                "rollout_nfe": self.calls.total(rollout_calls)}, calls

    def close(self) -> None:
        """Take the policy adapter and the NFE counter off the model, so that the same in-memory model can
        serve another trainer (the GPU speed check runs every method on one model)."""
        self.calls.close()
        self.adapters.remove(POLICY)

    def postfix(self, row: dict) -> dict:
        return {"reward": f"{row['reward']:.3f}", "loss": f"{row['loss']:.4f}"}

    # --------------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, per_prompt: int = 0) -> dict:
        e = self.cfg.eval
        n = per_prompt or e.per_prompt
        fd = e.fd and not per_prompt  # an FD of fewer images is biased upwards: not comparable, not computed
        with self.rollout_policy():
            result, images, _ = evaluate_model(self.model, EvalConfig(split=e.split, per_prompt=n, seed=e.seed,
                                                                      fd=fd), e.sampler,
                                               progress=False, world=self.world, processes=self.processes,
                                               rewards=self.eval_rewards)
        return self.runner.evaluation_row(result, images, n)

    def initial_evaluation(self) -> dict:
        """The epoch-0 evaluation (the base itself), read from :mod:`dgpo.evaluation.cache` when a run on the same
        base with the same protocol stored it; otherwise evaluated and stored."""
        e = self.cfg.eval
        if not e.cache_initial or self.counters.epoch != 0:
            return self.evaluate()
        protocol = {"world": self.world.name, "split": e.split, "per_prompt": e.per_prompt, "seed": e.seed, "fd": e.fd,
                    "sampler": to_dict(e.sampler), "t5_tokens": self.model.max_sequence_length,
                    "precision": self.cfg.model.mixed_precision, "device": self.runtime.device.type,
                    "record": 2,  # 2: rows carry eval_geneval_se (older entries are evaluated again)
                    **({"rewards": list(e.rewards)} if e.rewards else {}),
                    **({"weights_dtype": str(self.model.dtype)} if self.model.dtype != torch.float32 else {}),
                    **({"resolution": self.model.image_size} if self.cfg.model.resolution else {})}
        if self.cfg.model.merge_lora:  # the epoch-0 model is the base with that LoRA fused
            merged = Path(self.cfg.model.merge_lora)
            protocol["merged_lora"] = [str(merged.resolve()), eval_cache.weight_files(merged)]
        key = eval_cache.eval_key(self.base_path, protocol)
        hit = self.processes.broadcast(eval_cache.load(key) if self.processes.is_main else None)
        grid_path = self.runner.grid_path()
        if hit is None:
            row = self.evaluate()
            if self.processes.is_main:
                eval_cache.store(key, {k: v for k, v in row.items() if k.startswith("eval_")}, grid_path)
            return row
        result, grid = hit
        if grid is not None and self.processes.is_main:
            grid_path.parent.mkdir(exist_ok=True)
            shutil.copyfile(grid, grid_path)
        self.log(f"epoch 0: the base's evaluation under this protocol is cached ({eval_cache.entry_dir(key)}); "
                 f"set eval.cache_initial=false to re-evaluate")
        return {"epoch": 0, **result, "train_seconds": 0.0, "nfe": 0}

    # --------------------------------------------------------------------------------------- state
    def generators(self) -> dict[str, torch.Generator]:
        return {"main": self.gen}

    def _optimizer(self) -> torch.optim.Optimizer:
        return self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer

    def state_tensors(self) -> tuple[dict, dict]:
        """The LoRA (by peft name), optimiser, prompt sampler and EMAs (the run adds counters and generators)."""
        tensors = {f"lora.{k}": p.detach() for k, p in self.adapters.named_parameters(POLICY)}
        flat, scalars = flatten_state({"": self._optimizer()}, self._flat_emas())
        tensors.update(flat)
        tensors.update(self.prompt_sampler.state_tensors())
        # the LoRA's names (the EMAs are in the same order) and config: `dgpo export` needs no model
        return tensors, {"optimizer": scalars[""], "lora_keys": [k for k, _ in self.adapters.named_parameters(POLICY)],
                         "lora_config": self.adapters.config(POLICY)}

    def _flat_emas(self) -> dict[str, EMA]:
        return {f"{name}.": ema for name, ema in self.emas().items()}

    @torch.no_grad()
    def load_state(self, tensors: dict, state: dict) -> None:
        for k, p in self.adapters.named_parameters(POLICY):
            p.copy_(tensors[f"lora.{k}"])
        load_flat_state(tensors, {"": state["optimizer"]}, {"": self._optimizer()}, self._flat_emas())
        self.prompt_sampler.load_state_tensors(tensors)

    def save(self) -> Path:
        return self.runner.save()

    def restore(self, path: Path) -> None:
        self.runner.restore(path)

    # --------------------------------------------------------------------------------------- loop
    def run(self, resume: bool = False) -> dict:
        return self.runner.run(resume)

    def export(self, folder: Path) -> None:
        """final/: lora/ (diffusers format; the EMA weights when rollouts use the EMA) and a usage note."""
        with self.rollout_policy():
            self.adapters.save_diffusers(POLICY, folder / "lora")
        (folder / "README.md").write_text(_final_note(self.base_path, self.model, self.cfg))

    def plot(self, rows: list[dict], out: Path) -> None:
        plot_curves(rows, out / "reward_curve.png", self.world.metric)

    def summary_names(self, first: dict, last: dict) -> tuple[str, str]:
        return "base (epoch 0)", f"{self.objective.label} (epoch {last['epoch']})"


# ------------------------------------------------------------------------------------------- helpers

def _final_note(base: Path, model: FlowModel, cfg: TrainConfig) -> str:
    """final/README.md: the stock diffusers lines that sample the trained LoRA as the run evaluated it."""
    s = cfg.eval.sampler
    pipeline = getattr(getattr(model, "pipe", None), "__class__", type(None)).__name__
    if pipeline == "NoneType":
        return "# Trained LoRA\n\n`pytorch_lora_weights.safetensors` in the diffusers LoRA format.\n"
    merged = (f'pipe.load_lora_weights("{Path(cfg.model.merge_lora).resolve()}")\n'
              'pipe.fuse_lora(); pipe.unload_lora_weights()  # the LoRA this run was trained on top of (model.merge_lora)\n'
              if cfg.model.merge_lora else "")
    schedule = f"sigmas={list(s.sigmas)}" if s.sigmas else f"num_inference_steps={s.steps}"
    loading = ', text_encoder_3=None, tokenizer_3=None' if pipeline == "StableDiffusion3Pipeline" else ""
    size = f"height={model.image_size}, width={model.image_size}, "
    return f"""# Trained LoRA

```python
import torch
from diffusers import {pipeline}
pipe = {pipeline}.from_pretrained("{base}"{loading})
{merged}pipe.load_lora_weights("{Path(cfg.run.out_dir).resolve() / 'final' / 'lora'}")
pipe.fuse_lora()  # only sampling: fold the adapters into the weights (the same function, faster)
image = pipe("a photo of a red circle", {size}{schedule},
             guidance_scale={s.guidance_scale}, max_sequence_length={model.max_sequence_length},
             generator=torch.Generator().manual_seed(0)).images[0]
```
"""


def plot_curves(rows: list[dict], path: Path, metric: str = "shapes-geneval") -> None:
    """Training reward per epoch and the world's test metric against training wall-clock, as one PNG."""
    plot_run(rows, path, "epoch", [("reward", "training reward (mean over rollouts)")],
             "evaluation (± 2 standard errors)", metric)


def check_sigmas(sigmas: list[float], solver: str, section: str) -> None:
    """Explicit sampler sigmas: Euler, strictly decreasing inside (0, 1] (the stock pipeline's ``sigmas=``)."""
    from dgpo.config import ConfigError
    if not sigmas:
        return
    if solver != "euler":
        raise ConfigError(f"{section}.sigmas needs {section}.solver=euler (one Euler step per level)")
    if any(not 0.0 < s <= 1.0 for s in sigmas) or any(a <= b for a, b in zip(sigmas, sigmas[1:])):
        raise ConfigError(f"{section}.sigmas must decrease strictly inside (0, 1], got {list(sigmas)}")


def load_train_config(path: str | Path | None, overrides=()) -> TrainConfig:
    """Load and validate a training config: the shared sections and the chosen method's own (``objective.name``;
    another method's section is refused); a reward name that is not registered fails here, before any model is
    loaded (rewards added with ``dgpo.rewards.register_reward`` count)."""
    from dgpo.config import ConfigError, from_dict, read_config_data
    from dgpo.rewards import available_rewards
    from dgpo.methods import method_sections, objective_class
    data = read_config_data(path, overrides)
    method = (data.get("objective") or {}).get("name", TrainConfig().objective.name)
    objective_class(method)  # an unknown method fails here, naming the registered ones
    others = [name for name in method_sections() if name != method and name in data]
    if others:  # config by selection: a run carries its own method's section only
        raise ConfigError(f"section {others[0]}: sets keys of objective.name={others[0]}, but this run trains "
                          f"objective.name={method}; remove the section (or choose that method)")
    cfg = from_dict(train_config_class(method), data)
    objective_class(method).validate(cfg)  # bad settings fail before any model loads
    if cfg.model.weights_dtype == "bf16" and cfg.model.mixed_precision != "bf16":
        raise ConfigError(f"model.weights_dtype=bf16 needs model.mixed_precision=bf16 (it is "
                          f"{cfg.model.mixed_precision}): the training step autocasts to the weights' dtype")
    check_sigmas(cfg.rollout.sigmas, cfg.rollout.solver, "rollout")
    check_sigmas(cfg.eval.sampler.sigmas, cfg.eval.sampler.solver, "eval.sampler")
    if cfg.model.merge_lora:
        from dgpo.models.lora_io import check_lora_folder
        check_lora_folder(cfg.model.merge_lora)
    from dgpo.worlds.prompt_file import is_prompt_file
    if is_prompt_file(cfg.world):
        make_world(cfg.world)  # a bad prompt file fails here, naming its line, before any model loads
    for name in [n for n in cfg.reward.name.split("+") if cfg.reward.name] + list(cfg.eval.rewards):
        if name not in available_rewards():
            raise ConfigError(f"reward {name!r} (reward.name or eval.rewards) is not a registered reward; choose "
                              f"from {available_rewards()} (or register yours with dgpo.rewards.register_reward)")
    check_reward_weights(cfg.reward)
    if cfg.reward.name == "remote" and not cfg.reward.url:
        raise ConfigError("reward.name=remote needs reward.url (e.g. --set reward.url=http://127.0.0.1:8000/score)")
    return cfg


def prepare_run_dir(cfg: TrainConfig, resume: bool, overrides=(), overwrite: bool = False, named: bool = True,
                    log=print) -> TrainConfig:
    """A new run's folder (claimed and holding the resolved ``config.yaml``), or with ``resume`` the run in
    ``cfg.run.out_dir`` reopened; see :mod:`dgpo.runtime.run_folder`."""
    if resume:
        return reopen_run(train_config_class(), cfg.run.out_dir, overrides)
    return start_run(cfg, "dgpo train", overwrite=overwrite, named=named, log=log)
