"""Where an RL epoch's time goes, against the limit: the transformer's own throughput.

Every method (DGPO, Flow-GRPO, Diffusion-DPO, DiffusionNFT) is built exactly as ``scripts/bench_rl.py`` builds
it — its recipe ``configs/<method>/shapes.yaml``, then bench_rl's ``shared_settings`` with bench_rl's own
defaults (P, G, LoRA rank, seed 0), then ``--set`` — as a :class:`dgpo.trainer.Trainer` in a temporary run
folder. Its epochs are run by ``Trainer.train_step`` alone, so nothing evaluates (the evaluation cadence is
also set off): ``--warmup`` epochs untimed, then ``--epochs`` timed. Per timed epoch:

* **seconds** — the wall clock around ``train_step`` (device synchronised), and the trainer's own phase times
  from its metrics row: ``rollout_s`` (sampling *and* the VAE decode of the images), ``reward_s`` (scoring and
  group advantages), ``update_s`` (every optimiser step on the batch, EMAs included); what is left is
  ``other_s`` (prompt sampling, the batch's bookkeeping);
* **NFE** — transformer evaluations as the trainer counts them (``dgpo.runtime.runtime.TransformerCalls``: one
  per sample per transformer call, CFG's doubled batch counting twice): ``rollout_nfe`` is the row's, and the
  update's is the epoch's total (the counters' ``nfe`` step) − ``rollout_nfe``;
* **the calls** — a census of the same transformer calls (a forward pre-hook beside the trainer's counter), each
  filed by phase (the trainer's ``rollout`` and ``update`` are wrapped on the instance to say which is running),
  batch size, whether gradients are on (a grad-enabled call is backpropagated by every method: it is timed as
  forward + backward) and whether the LoRA adapters are on (a reference model with adapters off is cheaper).

**The limit.** After the epochs each kind of call seen is timed alone on the same model and trainer (LoRA
attached, the run's autocast): random latents (batch, *``model.latent_shape``*), random timesteps, token
embeddings of the shape ``model.encode_prompts`` gives (random values), ``--repeats`` calls after two of
warm-up, the median kept: ``t_k`` seconds per call of kind k, a throughput of ``b_k / t_k`` NFE per second at
its batch ``b_k``. A phase's limit is the time its transformer evaluations would take at those throughputs:

    limit = Σ_k NFE_k / throughput_k = Σ_k calls_k · t_k,
    share above the limit = 1 − limit / actual = 1 − NFE / (throughput × seconds)   (one kind of call),

per phase (rollout, update; the reward has no transformer call, its share is 1) and per epoch (the limit of all
its calls against its wall clock): the time spent in Python, the sampler's arithmetic, the VAE decode, the
reward, optimiser steps and data movement. The numbers are the means over the timed epochs (a share is taken of
the means). On a shared or busy machine the limit's median can land above an epoch's calls' own time; measure
on a quiet machine.

Writes ``NAME.json`` (every epoch, every kind of call and its timing), ``NAME.md`` (the settings and the
machine, then one table) and ``NAME.png`` (a stacked bar per method: each phase's limit and the time above it)
into ``--out-dir``; files of those names that it did not write are refused, its own only with ``--overwrite``.

    python scripts/profile_epoch.py                                  # 4 methods, shipped base, 1 thread, 5 epochs
    python scripts/profile_epoch.py --methods dgpo,flow_grpo --epochs 10 --name profile_dgpo_fg
    python scripts/profile_epoch.py --methods dgpo --set optim.micro_batch=16 --name dgpo_mb16   # a variant
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import NamedTuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOOL = "profile_epoch"
PHASES = ("rollout", "reward", "update")


# ------------------------------------------------------------------------------------------- bench_rl's set-up

def load_bench_rl():
    """``scripts/bench_rl.py`` as a module: its methods, labels, recipe paths and ``shared_settings``."""
    path = REPO / "scripts" / "bench_rl.py"
    spec = importlib.util.spec_from_file_location("bench_rl", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def profile_arguments(bench, threads: int) -> argparse.Namespace:
    """bench_rl's defaults for ``shared_settings``, with ``threads`` and the evaluation off: ``eval.every`` is
    already 10⁶ epochs there, and the timed cadence (``eval.every_minutes``, the early one) is set to 0 here
    (the epochs run through ``train_step`` alone, which never evaluates; these keep the config saying so)."""
    args = bench.parse_args([])  # bench_rl's defaults: a default changed there is the profile's too
    args.threads = threads
    args.eval_minutes, args.early_eval_minutes, args.per_prompt = 0, 0, 1
    return args


def method_overrides(bench, methods: dict[str, str], sets: list[str], base: Path, threads: int
                     ) -> dict[str, tuple[str, list[str]]]:
    """Each run's ``label -> (method, config overrides)``, as bench_rl's ``run_method`` gets them: its
    ``shared_settings`` (seed: the first of its ``--seeds``; budget: its ``--cap-minutes``, DGPO's; the budget
    moves only a time-scheduled learning rate), then the ``--set`` for every run, then those for this label."""
    args = profile_arguments(bench, threads)
    seed = int(args.seeds.split(",")[0])
    shared, per = bench.split_overrides(sets, list(methods))
    settings = bench.shared_settings(args, base, seed, args.cap_minutes)
    return {label: (method, [*settings, *shared, *per[label]]) for label, method in methods.items()}


def recipe_path(bench, method: str) -> Path:
    """A method's recipe, where bench_rl reads it."""
    return bench.REPO / "configs" / method / "shapes.yaml"


# ------------------------------------------------------------------------------------------- the call census

class CallKind(NamedTuple):
    """One kind of transformer call: its batch (samples per call; CFG's doubled batch is one call of 2B),
    whether gradients are on (then it is backpropagated) and whether the LoRA adapters are on. (A named tuple:
    ``load_script`` runs this file without registering it as a module, which a dataclass would need.)"""

    batch: int
    grad: bool
    adapters: bool

    def describe(self) -> str:
        return f"{'fwd+bwd' if self.grad else 'fwd'}×{self.batch}{'' if self.adapters else ' (LoRA off)'}"


def samples_in_call(args, kwargs) -> int:
    """The samples a transformer call is made on, as :class:`dgpo.runtime.runtime.TransformerCalls` counts them."""
    x = kwargs.get("hidden_states", args[0] if args else None)
    return len(x) if isinstance(x, (list, tuple)) else int(x.shape[0])


def first_lora_layer(backbone: torch.nn.Module):
    """A LoRA-wrapped layer of ``backbone`` (peft's tuner layer): its ``disable_adapters`` says whether the
    adapters are off (``dgpo.models.lora.adapters_disabled`` turns them off on every layer at once)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    return next((m for m in backbone.modules() if isinstance(m, BaseTunerLayer)), None)


class CallCensus:
    """Every transformer call the trainer counts, filed by phase and :class:`CallKind`, epoch by epoch.

    A forward pre-hook on the backbone beside the trainer's own counter: it records a call while the trainer
    counts (``trainer.calls.counting``: inside an epoch), in the phase that is running. The phase comes from the
    trainer's ``rollout`` and ``update``, wrapped on this instance only (calls outside both: phase "other")."""

    def __init__(self, trainer):
        self.trainer, self.phase = trainer, "other"
        self.epoch: Counter = Counter()
        self.lora = first_lora_layer(trainer.model.transformer)
        self._hook = trainer.model.transformer.register_forward_pre_hook(self._record, with_kwargs=True)
        for name in ("rollout", "update"):
            setattr(trainer, name, self._in_phase(name, getattr(trainer, name)))

    def _in_phase(self, phase: str, method):
        def wrapped(*args, **kwargs):
            self.phase = phase
            try:
                return method(*args, **kwargs)
            finally:
                self.phase = "other"
        return wrapped

    def _record(self, module, args, kwargs) -> None:
        if self.trainer.calls.counting:
            adapters = self.lora is not None and not self.lora.disable_adapters
            self.epoch[self.phase, CallKind(samples_in_call(args, kwargs), torch.is_grad_enabled(), adapters)] += 1

    def take_epoch(self) -> Counter:
        """The calls since the last take, ``{(phase, kind): calls}``, and a fresh count."""
        calls, self.epoch = self.epoch, Counter()
        return calls

    def close(self) -> None:
        self._hook.remove()
        for name in ("rollout", "update"):
            vars(self.trainer).pop(name, None)


def nfe_of(calls: Counter, phase: str) -> int:
    """Transformer evaluations of ``phase`` in a census: Σ calls × batch."""
    return sum(n * kind.batch for (p, kind), n in calls.items() if p == phase)


# ------------------------------------------------------------------------------------------- the epochs

def synchronize(device) -> None:
    from dgpo.sampling.generation import synchronize as sync
    sync(device)


def timed_epoch(trainer, census: CallCensus) -> dict:
    """One epoch by ``train_step``: its wall clock, the trainer's phase seconds and NFE, and its calls."""
    device = trainer.model.device
    nfe_before = trainer.counters.nfe
    census.take_epoch()
    synchronize(device)
    t0 = time.perf_counter()
    row = trainer.train_step()
    synchronize(device)
    epoch_s = time.perf_counter() - t0
    calls = census.take_epoch()
    nfe = trainer.counters.nfe - nfe_before
    rollout_nfe = int(row.get("rollout_nfe", 0))
    phases = {f"{p}_s": float(row.get(f"{p}_s", 0.0)) for p in PHASES}
    return {"epoch_s": epoch_s, **phases, "other_s": epoch_s - sum(phases.values()),
            "nfe": nfe, "rollout_nfe": rollout_nfe, "update_nfe": nfe - rollout_nfe,
            "skipped": bool(row.get("skipped", 0.0)), "calls": calls}


# ------------------------------------------------------------------------------------------- the limit

@contextmanager
def adapters_state(model, on: bool):
    """The LoRA as a kind of call had it: on (as attached), or off (the frozen base)."""
    from dgpo.models.lora import adapters_disabled
    with (nullcontext() if on else adapters_disabled(model.transformer)):
        yield


def random_inputs(model, batch: int, gen: torch.Generator):
    """Inputs of one transformer call at ``batch``: fp32 latents of the handle's ``latent_shape``, timesteps
    in [0, 1000), and token embeddings of the shape the handle's text encoding gives (random values; the
    pooled part kept as encoded: some families store metadata there)."""
    from dgpo.models.handle import PromptEmbeds
    with torch.no_grad():
        encoded = model.encode_prompts([""])
    device = model.device
    latents = torch.randn((batch, *model.latent_shape), generator=gen).to(device)
    timestep = (torch.rand(batch, generator=gen) * 1000.0).to(device)
    tokens = torch.randn((batch, *encoded.tokens.shape[1:]), generator=gen).to(device, encoded.tokens.dtype)
    return latents, timestep, PromptEmbeds(tokens, encoded.pooled.repeat_interleave(batch, 0))


def one_call(model, kind: CallKind, inputs) -> None:
    """The transformer call of ``kind`` (grad: forward and a backward into the LoRA, as an update makes it)."""
    latents, timestep, embeds = inputs
    if kind.grad:
        v = model.velocity_at_timestep(latents, timestep, embeds)
        v.float().square().mean().backward()
    else:
        with torch.no_grad():
            model.velocity_at_timestep(latents, timestep, embeds)


def seconds_per_call(trainer, kind: CallKind, repeats: int, warmup: int = 2) -> list[float]:
    """``repeats`` timed calls of ``kind`` alone (after ``warmup``) on the trainer's model, under the run's
    autocast, the device synchronised around each; the LoRA's gradients are dropped afterwards."""
    model, device = trainer.model, trainer.model.device
    inputs = random_inputs(model, kind.batch, torch.Generator().manual_seed(kind.batch))
    times = []
    with trainer.runtime.autocast(), adapters_state(model, kind.adapters):
        for i in range(warmup + repeats):
            synchronize(device)
            t0 = time.perf_counter()
            one_call(model, kind, inputs)
            synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    for p in trainer.params:
        p.grad = None
    return times


def measure_limits(trainer, kinds: set[CallKind], repeats: int) -> dict[CallKind, dict]:
    """Per kind of call: the repeats' seconds, their median ``t`` and the throughput ``batch / t`` (NFE/s)."""
    out = {}
    for kind in sorted(kinds, key=lambda k: (-k.batch, not k.grad, not k.adapters)):
        times = seconds_per_call(trainer, kind, repeats)
        median = statistics.median(times)
        out[kind] = {"seconds": times, "seconds_per_call": median, "nfe_per_second": kind.batch / median}
    return out


def limit_seconds(calls: Counter, timing: dict[CallKind, dict], phase: str | None = None) -> float:
    """limit = Σ_k NFE_k / throughput_k = Σ_k calls_k · t_k, over ``phase``'s calls (every call: None)."""
    return sum(n * timing[kind]["seconds_per_call"] for (p, kind), n in calls.items() if phase in (None, p))


def share_above(limit: float, actual: float) -> float | None:
    """1 − limit / actual: the share of ``actual`` seconds not spent in the transformer's own evaluations
    (None for a phase that took no time)."""
    return 1.0 - limit / actual if actual > 0 else None


# ------------------------------------------------------------------------------------------- one method

def build_trainer(method: str, overrides: list[str], out: Path, bench):
    """The method's trainer as bench_rl builds it (``Trainer`` on ``prepare_run_dir``), in ``out``."""
    from dgpo.trainer import Trainer, load_train_config, prepare_run_dir
    cfg = load_train_config(recipe_path(bench, method), [*overrides, f"run.out_dir={out}"])
    return Trainer(prepare_run_dir(cfg, resume=False), log=lambda *a: None)


def call_order(item) -> tuple:
    """Census entries in reading order: rollout, update, other; larger batches first, grad first."""
    (phase, kind), _ = item
    return (("rollout", "update", "other").index(phase), -kind.batch, not kind.grad, not kind.adapters)


def epoch_record(epoch: dict, timing: dict[CallKind, dict]) -> dict:
    """An epoch's seconds and NFE (the trainer's), its census's NFE per phase, each phase's limit and the
    share above it; the census as a list."""
    calls = epoch["calls"]
    limits = {p: limit_seconds(calls, timing, p) for p in PHASES}
    limit = limit_seconds(calls, timing)
    record = {k: v for k, v in epoch.items() if k != "calls"}
    record.update({f"{p}_limit_s": limits[p] for p in PHASES})
    record.update(limit_s=limit, census_rollout_nfe=nfe_of(calls, "rollout"), census_update_nfe=nfe_of(calls, "update"),
                  census_other_nfe=nfe_of(calls, "other"),
                  share_above={**{p: share_above(limits[p], epoch[f"{p}_s"]) for p in PHASES},
                               "epoch": share_above(limit, epoch["epoch_s"])},
                  calls=[{"phase": p, **kind._asdict(), "calls": n} for (p, kind), n in sorted(calls.items(), key=call_order)])
    return record


def mean_record(epochs: list[dict]) -> dict:
    """The means over the timed epochs, and the shares above the limit of those means: per phase
    1 − limit/actual, and for the epoch 1 − (all calls' limit) / (wall clock)."""
    keys = ("epoch_s", *(f"{p}_s" for p in PHASES), "other_s", "nfe", "rollout_nfe", "update_nfe",
            *(f"{p}_limit_s" for p in PHASES), "limit_s")
    mean = {k: sum(e[k] for e in epochs) / len(epochs) for k in keys}
    mean["share_above"] = {**{p: share_above(mean[f"{p}_limit_s"], mean[f"{p}_s"]) for p in PHASES},
                           "epoch": share_above(mean["limit_s"], mean["epoch_s"])}
    return mean


def profile_method(label: str, method: str, overrides: list[str], args, bench) -> dict:
    """Warm-up and timed epochs of one method, then its limit; the method's part of the report."""
    with tempfile.TemporaryDirectory(prefix=f"profile-{label}-") as tmp:
        trainer = build_trainer(method, overrides, Path(tmp) / "run", bench)
        census = CallCensus(trainer)
        try:
            for _ in range(args.warmup):
                timed_epoch(trainer, census)
            epochs = [timed_epoch(trainer, census) for _ in range(args.epochs)]
            kinds = {kind for e in epochs for _, kind in e["calls"]}
            timing = measure_limits(trainer, kinds, args.repeats)
            cfg = trainer.cfg
            settings = {"P": cfg.rollout.prompts_per_epoch, "G": cfg.rollout.group_size, "steps": cfg.rollout.steps,
                        "guidance_scale": cfg.rollout.guidance_scale, "micro_batch": cfg.optim.micro_batch,
                        "steps_per_epoch": cfg.optim.steps_per_epoch, "lora_rank": cfg.model.lora_rank,
                        "mixed_precision": cfg.model.mixed_precision, "device": str(trainer.model.device),
                        "torch_threads": torch.get_num_threads(), "overrides": overrides}
        finally:
            census.close()
            trainer.close()
            del trainer
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    records = [epoch_record(e, timing) for e in epochs]
    per_epoch_calls: Counter = Counter()
    for e in epochs:
        per_epoch_calls.update(e["calls"])
    kinds = [{"phase": p, **kind._asdict(), "describe": kind.describe(), "calls_per_epoch": n / len(epochs),
              "nfe_per_epoch": n * kind.batch / len(epochs), **timing[kind]}
             for (p, kind), n in sorted(per_epoch_calls.items(), key=call_order)]
    return {"method": method, "label": bench.LABELS.get(method, method), "settings": settings,
            "mean": mean_record(records), "epochs": records, "call_kinds": kinds}


# ------------------------------------------------------------------------------------------- the report

def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def percent(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f} %"


def throughput_cell(kinds: list[dict]) -> str:
    """'rollout fwd×128: 2100; update fwd+bwd×64: 650, …' — NFE per second at each kind of call."""
    parts = {}
    for k in kinds:
        parts.setdefault(k["phase"], []).append(f"{k['describe']}: {k['nfe_per_second']:.0f}")
    return "; ".join(f"{phase} {', '.join(items)}" for phase, items in parts.items())


def markdown(report: dict) -> str:
    """The settings and the machine, then one table: a row per method (means over the timed epochs)."""
    s, m = report["settings"], report["machine"]
    lines = [f"# Where an epoch's time goes, against the transformer's throughput ({TOOL})", "",
             f"- base: `{s['base']}`; methods as `scripts/bench_rl.py` configures them"
             f"{'; --set ' + ' '.join(s['set']) if s['set'] else ''}",
             f"- {s['warmup']} warm-up + {s['epochs']} timed epochs per method (means below); the limit: each kind of "
             f"transformer call timed alone, median of {s['repeats']} after 2 of warm-up",
             f"- machine: {m['platform']}, {m['processor']}, {m['cpu_count']} CPUs, GPU: {m['gpu'] or 'none'}; "
             f"torch {m['torch']}, {m['torch_threads']} thread(s); python {m['python']}", "",
             "Seconds are per epoch; NFE = transformer evaluations (samples per call, CFG's doubled batch twice); "
             "limit = Σ NFE / throughput at the phase's own calls; above = 1 − limit / actual.", "",
             "| method | epoch s | rollout s | reward s | update s | other s | rollout NFE | update NFE | "
             "rollout limit s | update limit s | epoch limit s | above: rollout | above: update | above: epoch | "
             "throughput (NFE/s) |",
             "|---|" + "---:|" * 13 + "---|"]
    for label, r in report["methods"].items():
        a, share = r["mean"], r["mean"]["share_above"]
        lines.append(f"| {label} ({r['label']}) | {a['epoch_s']:.2f} | {a['rollout_s']:.2f} | {a['reward_s']:.2f} | "
                     f"{a['update_s']:.2f} | {a['other_s']:.2f} | {a['rollout_nfe']:.0f} | {a['update_nfe']:.0f} | "
                     f"{a['rollout_limit_s']:.2f} | {a['update_limit_s']:.2f} | {a['limit_s']:.2f} | "
                     f"{percent(share['rollout'])} | {percent(share['update'])} | {percent(share['epoch'])} | "
                     f"{throughput_cell(r['call_kinds'])} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """A stacked bar per method: each phase's limit (dark) and its time above the limit (light), then the
    epoch's other seconds; the bar's height is the epoch's mean wall clock."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = list(report["methods"])
    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * len(labels), 4.5))
    segments = [("rollout", "C0"), ("reward", "C1"), ("update", "C2")]
    bottom = [0.0] * len(labels)
    for phase, colour in segments:
        for part, alpha, name in (("limit", 1.0, "limit"), ("above", 0.35, "above the limit")):
            if phase == "reward" and part == "limit":  # the reward makes no transformer call
                continue
            heights = []
            for label in labels:
                a = report["methods"][label]["mean"]
                limit = min(a[f"{phase}_limit_s"], a[f"{phase}_s"])
                heights.append(limit if part == "limit" else max(a[f"{phase}_s"] - limit, 0.0))
            ax.bar(labels, heights, bottom=bottom, color=colour, alpha=alpha, label=f"{phase}: {name}")
            bottom = [b + h for b, h in zip(bottom, heights)]
    other = [max(report["methods"][label]["mean"]["other_s"], 0.0) for label in labels]
    ax.bar(labels, other, bottom=bottom, color="0.6", alpha=0.5, label="other (outside the phases)")
    ax.set(ylabel="seconds per epoch (mean)", title="an epoch's time: the transformer's limit vs the rest")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def progress_line(label: str, r: dict) -> str:
    a, share = r["mean"], r["mean"]["share_above"]
    return (f"{label}: epoch {a['epoch_s']:.2f} s (rollout {a['rollout_s']:.2f}, reward {a['reward_s']:.2f}, update "
            f"{a['update_s']:.2f}); limit {a['limit_s']:.2f} s; above the limit: rollout {percent(share['rollout'])}, "
            f"update {percent(share['update'])}, epoch {percent(share['epoch'])}")


# ------------------------------------------------------------------------------------------- the command

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="dgpo,flow_grpo,diffusion_dpo,nft",
                   help="comma-separated methods, each optionally label=method, as bench_rl takes them (default: all four)")
    p.add_argument("--epochs", type=int, default=5, help="timed epochs per method (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed epochs before them (default 1)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per kind of transformer call for the limit; "
                   "the median is kept (default 5)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; 0 = torch's default)")
    p.add_argument("--base", default="", help="base pipeline folder (default: the embedded shapes base, as bench_rl)")
    p.add_argument("--set", action="append", default=[], metavar="[LABEL:]KEY=VALUE",
                   help="config override after bench_rl's settings, for every run or for one with LABEL: (repeatable)")
    p.add_argument("--out-dir", default="runs/profile_epoch", help="output folder (default runs/profile_epoch)")
    p.add_argument("--name", default=TOOL, help=f"output file stem (default {TOOL})")
    p.add_argument("--overwrite", action="store_true", help="replace NAME.* written by an earlier run of this script")
    args = p.parse_args(argv)
    if args.epochs < 1 or args.warmup < 0 or args.repeats < 1 or args.threads < 0:
        p.error("--epochs and --repeats must be >= 1, --warmup and --threads >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from dgpo.errors import UserError
    from dgpo.runtime.output_dir import check_report_outputs, report_files, write_report_json
    bench = load_bench_rl()
    files = report_files(args.out_dir, args.name)
    try:
        check_report_outputs(files[0], files[1:], TOOL, args.overwrite)
        methods = bench.parse_methods(args.methods)
        base = Path(args.base) if args.base else bench.default_base()
        runs = method_overrides(bench, methods, args.set, base, args.threads)
        from dgpo.trainer import load_train_config
        for method, overrides in runs.values():  # every config checked before the first trainer is built
            load_train_config(recipe_path(bench, method), overrides)
        results = {}
        for i, (label, (method, overrides)) in enumerate(runs.items(), 1):
            print(f"[{i}/{len(runs)}] {label} ({method}): {args.warmup} warm-up + {args.epochs} timed epochs, "
                  f"then each kind of transformer call alone ...", flush=True)
            results[label] = profile_method(label, method, overrides, args, bench)
            print(progress_line(label, results[label]), flush=True)
        report = {"settings": {"base": str(base), "methods": methods, "epochs": args.epochs, "warmup": args.warmup,
                               "repeats": args.repeats, "threads": args.threads, "set": args.set},
                  "machine": machine(), "methods": results}
        write_report_json(files, report, TOOL, args.overwrite, default=_json_value)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    files[1].write_text(markdown(report))
    plot(report, files[2])
    print(files[1].read_text())
    print(f"wrote {', '.join(str(f) for f in files)}")
    return 0


def _json_value(x):
    """JSON for what ``json`` has no type for (numpy and torch scalars)."""
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


if __name__ == "__main__":
    sys.exit(main())
