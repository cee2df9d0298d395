"""The run: what every training recipe shares, so that a recipe keeps only its own step.

A *recipe* (DGPO and its baselines in :mod:`dgpo.trainer`, TDM in the few-step package) builds its
components and knows how to take one training step, evaluate, and export its weights. :class:`Run` owns the
rest, read top to bottom in :meth:`Run.loop`:

    resume?  → restore the latest checkpoint, cut metrics.jsonl back to it
    step 0   → the recipe's initial evaluation (maybe cached), logged
    repeat   → one timed step, logged; evaluate every ``eval_every`` steps or at each slot of the timed cadence (``Schedule.time_slot``) of
               training; checkpoint every ``checkpoint_every`` steps; until ``steps`` or the time budget
    end      → a last evaluation and checkpoint, ``final/`` (atomically), the curve PNG, summary.md/json

Counters (step, training wall-clock without evaluation, transformer evaluations) and the recipe's random
generators are checkpointed with its state, so a resumed run continues exactly as the uninterrupted one
would. The run folder itself is claimed and reopened by :mod:`dgpo.runtime.run_folder`. On several processes
(:mod:`dgpo.runtime.processes`) every process runs the loop alike and only the main one writes the folder.

What a recipe provides is the :class:`Recipe` protocol; DGPO (:class:`dgpo.trainer.Trainer`) and the few-step
package's TDM and TDM-R1 recipes implement it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from tqdm.auto import tqdm

from dgpo.config import flat_dict, option
from dgpo.runtime.checkpoint import (capture_rng, list_checkpoints, load_checkpoint, load_latest_good, restore_rng,
                             save_checkpoint)
from dgpo.errors import UserError
from dgpo.evaluation.evaluate import format_table
from dgpo.runtime import writer_lock
from dgpo.runtime.output_dir import nearest_existing, with_umask
from dgpo.runtime.preemption import PREEMPTION, Preempted
from dgpo.runtime.processes import SINGLE, Processes
from dgpo.runtime.metrics import QUALITY_MEASURES, eval_result, gain_against_noise, read_metrics, truncate_metrics
from dgpo.sampling.samples_io import image_grid


@dataclass
class Counters:
    """What a run has done so far; ``epoch`` and ``iteration`` are the recipes' names for ``step``."""

    step: int = 0
    train_seconds: float = 0.0
    nfe: int = 0  # transformer evaluations per sample, summed over the batch (evaluation excluded)

    @property
    def epoch(self) -> int:
        return self.step

    @property
    def iteration(self) -> int:
        return self.step


@runtime_checkable
class Recipe(Protocol):
    """What :class:`Run` calls on a recipe; everything else about a run (cadence, checkpoints, resume, metrics,
    the final folder) is the run's."""

    label: str                 # progress bars and summaries ("DGPO", "TDM", "TDM-R1")
    counters: "Counters"       # advanced by the run: step, training seconds, NFE
    world: object              # its task metric names the evaluations (``world.metric``)
    memory_levers: str         # what lowers a step's memory, for the memory messages

    def train_step(self) -> dict:
        """One step, taken through :meth:`Run.timed_step`; its metrics row."""

    def evaluate(self, per_prompt: int = 0) -> dict:
        """An evaluation row (:meth:`Run.evaluation_row`) at ``per_prompt`` images per prompt (0: the recipe's
        ``eval.per_prompt``; the run asks for fewer at its interim evaluations, ``eval.interim_per_prompt``)."""

    def initial_evaluation(self) -> dict:
        """The step-0 evaluation (a recipe may read it from a cache)."""

    def state_tensors(self) -> tuple[dict, dict]:
        """Everything checkpointed but the counters and the generators: (tensors, JSON scalars)."""

    def load_state(self, tensors: dict, state: dict) -> None:
        """Load what :meth:`state_tensors` returned."""

    def generators(self) -> dict[str, torch.Generator]:
        """The random generators the run checkpoints with the state."""

    def export(self, folder: Path) -> None:
        """Write the contents of ``final/`` into ``folder``."""

    def plot(self, rows: list[dict], out: Path) -> None:
        """The curve PNG(s) of the metrics rows into the run folder ``out``."""

    def postfix(self, row: dict) -> dict:
        """The progress bar's fields for a step's row."""

    def summary_names(self, first: dict, last: dict) -> tuple[str, str]:
        """Names of the first and last evaluated models in summary.md."""


@dataclass
class RunSettings:
    """The ``run:`` keys every recipe shares; a recipe's own ``run:`` section extends it (its length, defaults)."""

    out_dir: str = option("runs/run", "run folder (config, metrics, grids, checkpoints, final weights)")
    seed: int = option(0, "seed of prompts, noise and LoRA initialisation", min=0)
    time_budget_min: float = option(0.0, "stop after this many minutes of training wall-clock (0 = no limit)", min=0.0)
    checkpoint_every: int = option(50, "save a full checkpoint every N steps", min=1)
    keep_checkpoints: int = option(2, "checkpoints to keep", min=1)
    threads: int = option(0, "torch CPU threads (0 = torch's default; 1 on a machine shared with other jobs)", min=0)
    stop_at_gain: float = option(0.0, "end the run early once stop_after consecutive evaluations score at least "
                                 "the first evaluation (the base) + this much (0 = never)", min=0.0)
    stop_after: int = option(2, "consecutive evaluations at or above the stop_at_gain target that end the run", min=1)
    max_memory_gb: float = option(0.0, "stop with a clear message (the last checkpoint intact) once the process's "
                                  "peak memory passes this many GiB: GPU memory on CUDA, resident memory on CPU; "
                                  "every step's peak is logged as peak_memory_gb (0 = no limit)", min=0.0)
    tracker: str = option("none", "accelerate tracker: W&B (offline with WANDB_MODE=offline) or TensorBoard "
                          "(metrics.jsonl is always written)", choices=("none", "wandb", "tensorboard"))


@dataclass
class EvalTiming:
    """The ``eval:`` keys of the evaluation's cadence in training minutes, which every recipe shares; a recipe's
    own ``eval:`` section extends it (its step cadence ``every``, the protocol)."""

    every_minutes: float = option(0.0, "also evaluate each time this many minutes of training pass (0 = off; "
                                  "benchmarks use it so methods with different step costs are sampled alike)", min=0.0)
    early_every_minutes: float = option(0.0, "in the first early_minutes of training, evaluate this often instead "
                                        "(0 = off; e.g. 0.5, where a benchmark's time ratios are decided); "
                                        "every_minutes takes over after", min=0.0)
    early_minutes: float = option(5.0, "how many minutes of training the early cadence lasts", min=0.0)
    interim_per_prompt: int = option(0, "images per prompt of the evaluations between the first and the last (0 = "
                                     "per_prompt): cheaper curve points, without FD (biased at fewer images); the "
                                     "first (the start) and the last (the result) keep per_prompt, so the gain a run "
                                     "reports keeps its noise", min=0)


@dataclass
class Schedule:
    """How long a run lasts and how often it evaluates and checkpoints (from the recipe's config)."""

    steps: int
    time_budget_min: float = 0.0
    eval_every: int = 100
    eval_every_minutes: float = 0.0
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    stop_at_gain: float = 0.0
    stop_after: int = 2
    max_memory_gb: float = 0.0
    eval_early_every_minutes: float = 0.0
    eval_early_minutes: float = 5.0
    eval_interim_per_prompt: int = 0

    @classmethod
    def of(cls, run: RunSettings, steps: int, evaluation) -> "Schedule":
        """The schedule of a recipe's ``run:`` section, its length in steps and its ``eval:`` section's cadence
        (``evaluation.every`` steps and its :class:`EvalTiming` keys)."""
        return cls(steps, run.time_budget_min, evaluation.every, evaluation.every_minutes, run.checkpoint_every,
                   run.keep_checkpoints, run.stop_at_gain, run.stop_after, run.max_memory_gb,
                   evaluation.early_every_minutes, evaluation.early_minutes, evaluation.interim_per_prompt)

    def time_slot(self, train_seconds: float) -> int:
        """Which slot of the timed cadence ``train_seconds`` of training fall in; an evaluation is due each time
        the slot changes. Slots are ``eval_early_every_minutes`` long up to ``eval_early_minutes``, then
        ``eval_every_minutes`` long, counted from 0 (the early ones at 0.5, 1, …, 5 minutes, then 6, 9, 12 at a
        cadence of 3). Always 0 when neither cadence is set."""
        early, every = self.eval_early_every_minutes * 60, self.eval_every_minutes * 60
        until = self.eval_early_minutes * 60
        early_slots = int(min(train_seconds, until) // early) if early and until else 0
        if early and train_seconds < until:
            return early_slots
        return early_slots + (int(train_seconds // every) if every else 0)

    def target_reached(self, scores: list[float]) -> bool:
        """``scores``: the run's evaluations so far, the first being the base's. True once the last
        ``stop_after`` of the later ones are all ≥ the first + ``stop_at_gain`` (never when that is 0)."""
        if not self.stop_at_gain or len(scores) - 1 < self.stop_after:
            return False
        return all(x >= scores[0] + self.stop_at_gain for x in scores[-self.stop_after:])


class Run:
    """The loop and the run folder of one recipe. ``step_key`` names the step in metrics rows and
    checkpoints (``epoch`` / ``iteration``), ``grid_prefix`` the evaluation grids (``samples/PREFIX-N.png``)."""

    def __init__(self, recipe: Recipe, out: str | Path, schedule: Schedule, step_key: str, grid_prefix: str,
                 tracker=None, log=print, processes: Processes = SINGLE, tracking=None):
        self.recipe, self.out, self.schedule = recipe, Path(out), schedule
        self.step_key, self.grid_prefix = step_key, grid_prefix
        self.processes = processes
        self.writes = processes.is_main
        self.tracker, self.log = tracker, processes.voice(log)
        self.metrics_path = self.out / "metrics.jsonl"
        self.tracking = tracking  # (runtime, project, config dict): run.tracker, started and finished by run()

    @property
    def counters(self) -> Counters:
        return self.recipe.counters

    # --------------------------------------------------------------------------------------- steps
    def timed_step(self, step) -> dict:
        """Run ``step() -> (stats, nfe)``, advance the counters by one step, its seconds and its NFE, and
        return the metrics row."""
        t0 = time.time()
        stats, nfe = step()
        c = self.counters
        c.step += 1
        c.train_seconds += self.processes.broadcast(time.time() - t0)  # one clock, so all stop together
        c.nfe += nfe
        return {self.step_key: c.step, "train_seconds": round(c.train_seconds, 2), "nfe": c.nfe, **stats}

    def grid_path(self) -> Path:
        return self.out / "samples" / f"{self.grid_prefix}-{self.counters.step:05d}.png"

    def evaluation_row(self, result: dict, images: np.ndarray, per_prompt: int) -> dict:
        """Save the evaluation grid (the first image of up to 64 prompts) and return the metrics row."""
        from PIL import Image
        if self.writes:
            self.grid_path().parent.mkdir(parents=True, exist_ok=True)
            grid_idx = np.arange(0, len(images), per_prompt)[:64]
            Image.fromarray(image_grid(images[grid_idx], columns=8)).save(self.grid_path())
        c = self.counters
        return {self.step_key: c.step, "eval_geneval": result["geneval"], "eval_geneval_se": result.get("geneval_se"),
                "eval_per_category": result["per_category"],
                **({"eval_rewards": result["rewards"]} if result.get("rewards") else {}),
                "eval_partial": result["partial"], **{f"eval_{key}": result.get(key) for key in QUALITY_MEASURES},
                "train_seconds": round(c.train_seconds, 2), "nfe": c.nfe}

    # --------------------------------------------------------------------------------------- state
    def save(self) -> Path | None:
        """A full checkpoint (by the main process; the state is the same on every process)."""
        if not self.writes:
            return None
        tensors, state = self.recipe.state_tensors()
        rng_t, rng_s = capture_rng(self.recipe.generators())
        c = self.counters
        state = {**state, "rng": rng_s,
                 "counters": {self.step_key: c.step, "train_seconds": c.train_seconds, "nfe": c.nfe}}
        return save_checkpoint(self.out, c.step, {**tensors, **rng_t}, state, self.schedule.keep_checkpoints)

    def restore(self, path: Path) -> None:
        self.apply_state(*load_checkpoint(path))

    def apply_state(self, tensors: dict, state: dict) -> None:
        """Every state of a loaded checkpoint: the recipe's, the RNGs, the counters."""
        self.recipe.load_state(tensors, state)
        restore_rng(self.recipe.generators(), tensors, state["rng"])
        c = state["counters"]
        counters = self.counters
        counters.step, counters.train_seconds, counters.nfe = c[self.step_key], c["train_seconds"], c["nfe"]

    # --------------------------------------------------------------------------------------- loop
    def run(self, resume: bool = False) -> dict:
        """:meth:`loop` with the run's tracker (``run.tracker``: W&B, TensorBoard) started before and finished
        after, when the recipe gave its runtime (``tracking``). The run folder's writer lock, taken when the folder
        was claimed or reopened (:mod:`dgpo.runtime.writer_lock`), is let go when the run ends, however it ends."""
        try:
            if self.tracking is None:
                return self.loop(resume)
            runtime, project, config = self.tracking
            self.tracker = runtime.start_tracking(project, config, self.out)
            result = self.loop(resume)
            runtime.finish_tracking()
            return result
        finally:
            if self.writes:
                writer_lock.release(self.out)

    def loop(self, resume: bool = False) -> dict:
        """The run, from its first or its latest checkpointed step to the end; returns the first, last and
        best evaluation rows."""
        c = self.counters
        if resume:  # the newest intact checkpoint; a damaged one is named and skipped
            found = load_latest_good(self.out, self.log)
            if found is None:
                raise UserError(f"--resume: {str(self.out)!r} has no intact checkpoint; start the run without --resume")
            ckpt, tensors, state = found
            self.apply_state(tensors, state)
            if self.writes:
                truncate_metrics(self.metrics_path, c.step, self.step_key)
            self.log(f"resumed from {ckpt} ({self.step_key} {c.step})")
        elif self.writes:
            self.metrics_path.unlink(missing_ok=True)
        self.processes.barrier()  # the metrics file is as the main process left it
        with PREEMPTION.deferred():  # a preemption signal ends the run at a safe point (dgpo.runtime.preemption)
            return self._loop(resume)

    def _loop(self, resume: bool) -> dict:
        s, c = self.schedule, self.counters
        evals = [r for r in read_metrics(self.metrics_path) if "eval_geneval" in r]
        self.check_memory("the start (the model loaded)")
        self.check_disk_space()
        if not evals:
            evals.append(self._evaluated(self.guarded_evaluation(self.recipe.initial_evaluation)))
        reached = lambda: s.target_reached([r["eval_geneval"] for r in evals])
        with self._progress_bar() as bar:  # closed however the loop ends, so a message starts on its own line
            self._steps(evals, bar, reached)
        if reached():
            self.log(f"{s.stop_after} evaluations in a row at or above the base + {s.stop_at_gain:g} "
                     f"(run.stop_at_gain): the run ends at {self.step_key} {c.step}")
        if evals[-1][self.step_key] != c.step or evals[-1].get("eval_interim"):  # the result at per_prompt
            evals.append(self.evaluation(interim=False))
        self.save()
        if self.writes:
            self.finish(evals)
        self.processes.barrier()
        return {"first": evals[0], "last": evals[-1], "best": max(evals, key=lambda r: r["eval_geneval"])}

    def _steps(self, evals: list[dict], bar, reached) -> None:
        """Steps until the run's end (steps, time budget or target), each logged, evaluated and checkpointed on
        the schedule; a preemption signal ends them at the safe point after a step."""
        s, c = self.schedule, self.counters
        budget = s.time_budget_min * 60
        while c.step < s.steps and not (budget and c.train_seconds >= budget) and not reached():
            before = c.train_seconds
            row = self.log_row(self.guarded_step())
            bar.update(min(c.train_seconds, budget) / 60 - min(before, budget) / 60 if budget else 1)
            bar.set_postfix(**{self.step_key: c.step}, **self.recipe.postfix(row),
                            eval=f"{evals[-1]['eval_geneval']:.3f}")
            timed = s.time_slot(c.train_seconds) > s.time_slot(evals[-1]["train_seconds"])
            if (s.eval_every and c.step % s.eval_every == 0) or timed:
                last = c.step >= s.steps or bool(budget and c.train_seconds >= budget)
                evals.append(self.evaluation(interim=not last))
            if c.step % s.checkpoint_every == 0:
                self.save()
            stop = PREEMPTION.take(self.processes)
            if stop:  # the safe point: the step, its evaluation and its checkpoint are done
                if c.step % s.checkpoint_every:
                    self.save()
                raise Preempted(stop, f"{self.step_key} {c.step}", self.out)

    def guarded_step(self) -> dict:
        """The recipe's step, its row with the process's peak memory so far (``peak_memory_gb``); past
        ``max_memory_gb``, or out of GPU memory, a UserError that names the recipe's memory levers."""
        at = f"{self.step_key} {self.counters.step + 1}"
        try:
            row = self.recipe.train_step()
        except torch.OutOfMemoryError:
            raise UserError(f"out of GPU memory at {at}: {self._memory_advice()}") from None
        row["peak_memory_gb"] = self.check_memory(at)
        return row

    def evaluation(self, interim: bool) -> dict:
        """The recipe's evaluation, logged; an interim one (not the run's last) at ``eval.interim_per_prompt``
        images per prompt where that is set, its row marked ``eval_interim``."""
        n = self.schedule.eval_interim_per_prompt if interim else 0
        row = self.guarded_evaluation(lambda: self.recipe.evaluate(n))
        return self._evaluated({**row, "eval_interim": True} if n else row)

    def guarded_evaluation(self, evaluate) -> dict:
        """An evaluation, under the same memory guard as a step (its sampler batch can be the run's peak)."""
        at = f"the evaluation after {self.step_key} {self.counters.step}"
        try:
            row = evaluate()
        except torch.OutOfMemoryError:
            raise UserError(f"out of GPU memory in {at}: {self._memory_advice()}") from None
        self.check_memory(at)
        return row

    def checkpoint_bytes(self) -> int:
        """What one checkpoint of this run holds: the recipe's state tensors (weights, optimiser moments, EMAs)."""
        tensors, _ = self.recipe.state_tensors()
        return sum(t.numel() * t.element_size() for t in tensors.values() if isinstance(t, torch.Tensor))

    def check_disk_space(self) -> None:
        """Before the first step: the run folder's filesystem has room for the next checkpoint beside the kept
        ones (a checkpoint is written whole before the oldest is pruned); else a UserError, before any work."""
        if not self.writes:
            return
        need = self.checkpoint_bytes() * 2 + (64 << 20)  # the next one and the final weights, and some room
        free = shutil.disk_usage(nearest_existing(self.out)).free  # the folder may be made later
        if free < need:
            raise UserError(f"{str(self.out)!r} has {free / 2**20:.0f} MiB free, and this run's checkpoints need "
                            f"about {need / 2**20:.0f} MiB: free some space, or give --out on another filesystem")

    def check_memory(self, at: str) -> float:
        """The largest process's peak memory so far (GiB); past ``max_memory_gb``, a UserError."""
        peak = round(self.processes.max(peak_memory_gb()), 3)
        limit = self.schedule.max_memory_gb
        if limit and peak > limit:
            raise UserError(f"peak memory {peak:.2f} GiB passed run.max_memory_gb={limit:g} at {at}: "
                            f"{self._memory_advice(', or raise the limit')}")
        return peak

    def _memory_advice(self, also: str = "") -> str:
        """The recipe's memory levers (and ``also``), then whether a checkpoint is there to resume."""
        levers = getattr(self.recipe, "memory_levers", "a smaller batch")
        kept = ("the last checkpoint is intact (--resume RUN continues from it)" if list_checkpoints(self.out)
                else "nothing was checkpointed yet")
        return f"{levers}{also}; {kept}"

    def _progress_bar(self):
        """Steps towards ``steps``; with a time budget, minutes of training towards the budget (what ends the
        run), so the bar's remaining time is the run's (evaluations included at the rate they occur)."""
        s, c = self.schedule, self.counters
        if s.time_budget_min:
            return tqdm(total=s.time_budget_min, initial=min(c.train_seconds / 60, s.time_budget_min),
                        desc=f"{self.recipe.label} training", unit="min", disable=not self.writes,
                        bar_format="{l_bar}{bar}| {n:.1f}/{total:.0f} min of training [{elapsed}<{remaining}{postfix}]")
        return tqdm(total=s.steps, initial=c.step, desc=f"{self.recipe.label} {self.step_key}s", disable=not self.writes)

    def _evaluated(self, row: dict) -> dict:
        self.log_row(row)
        quality = "".join(f", {head} {row[f'eval_{key}']:.2f}" for key, head in QUALITY_MEASURES.items()
                          if row.get(f"eval_{key}") is not None)
        self.log(f"{self.step_key} {row[self.step_key]}: {self.recipe.world.metric} {row['eval_geneval']:.3f}"
                 f"{quality} after {row['train_seconds']:.0f} s of training, {row['nfe']} NFE")
        return row

    def log_row(self, row: dict) -> dict:
        """Append a row to metrics.jsonl (and the tracker, if any); the main process writes."""
        if not self.writes:
            return row
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tracker is not None:
            self.tracker({k: v for k, v in flat_dict(row).items() if isinstance(v, (int, float))}, row[self.step_key])
        return row

    def finish(self, evals: list[dict]) -> None:
        """``final/`` (written beside, then renamed into place), the curve PNG and summary.md / summary.json."""
        final, tmp = self.out / "final", self.out / ".final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self.recipe.export(tmp)
        with_umask(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        self.recipe.plot(read_metrics(self.metrics_path), self.out)
        first_name, last_name = self.recipe.summary_names(evals[0], evals[-1])
        table = format_table({first_name: eval_result(evals[0]), last_name: eval_result(evals[-1])},
                             self.recipe.world.metric)
        gain = gain_against_noise(evals[0], evals[-1], self.recipe.world.metric)
        first_extra, last_extra = evals[0].get("eval_rewards") or {}, evals[-1].get("eval_rewards") or {}
        extra = "".join(f"\nevaluation-only reward {n}: {first_extra[n]:.3f} -> {v:.3f}"
                        for n, v in last_extra.items() if n in first_extra)
        (self.out / "summary.md").write_text(f"{table}\n\n{gain['sentence']}\n{extra}")
        (self.out / "summary.json").write_text(json.dumps({"first": evals[0], "last": evals[-1], "gain": gain},
                                                          indent=2))


def peak_memory_gb() -> float:
    """This process's peak memory so far in GiB: allocated GPU memory on CUDA, else the resident set (RSS)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2 ** 30
    import resource
    import sys
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2 ** 30 if sys.platform == "darwin" else 2 ** 20)


def plot_run(rows: list[dict], path: Path, step_key: str, panels: list[tuple[str, str]], eval_title: str,
             metric: str = "task metric") -> None:
    """One PNG: per-step curves (raw and a moving average over ~1/50 of the run), one panel per
    ``(key, title)``, then the evaluations' task metric (the world's ``metric``) against training wall-clock."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    train = [r for r in rows if "eval_geneval" not in r]
    evals = [r for r in rows if "eval_geneval" in r]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4.7 * (len(panels) + 1), 3.6))
    for ax, (key, title) in zip(axes[:-1], panels):
        if train:
            x = np.array([r[step_key] for r in train])
            y = np.array([r[key] for r in train])
            k = max(1, len(y) // 50)
            ax.plot(x, y, alpha=0.3, color="C0")
            ax.plot(x[k - 1:], np.convolve(y, np.ones(k) / k, mode="valid"), color="C0")
        ax.set(xlabel=step_key, ylabel=key, title=title)
    if evals:  # error bars: two standard errors of the evaluation noise, where the world reports one
        se = [r.get("eval_geneval_se") for r in evals]
        axes[-1].errorbar([r["train_seconds"] / 60 for r in evals], [r["eval_geneval"] for r in evals],
                          yerr=[2 * s for s in se] if all(s is not None for s in se) else None,
                          fmt="o-", color="C1", capsize=3)
    axes[-1].set(xlabel="training wall-clock (min)", ylabel=f"test {metric}", title=eval_title)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


