"""RL efficiency benchmark: DGPO against Flow-GRPO, Diffusion-DPO and DiffusionNFT in the same trainer.

Every method is one run folder of :class:`dgpo.trainer.Trainer` (its own recipe from
``configs/<method>/shapes.yaml``) with the same base, train prompts, P×G, LoRA rank, seed, evaluation
protocol (test prompts, images per prompt, sampler, FD) and evaluation schedule (every ``--early-eval-minutes``
of training for the first ``--early-minutes``, where the ratios at low targets are decided, then every
``--eval-minutes``). Methods run one after another in this process (one torch process on the machine at a time).

**Time to target** (the default protocol). The target is the base's score + ``--target-gain`` (default 0.15);
a run reaches it when two consecutive evaluations are at or above it (``run.stop_at_gain``, ``run.stop_after``),
and its time to target is the training time of the first of those two. DGPO runs first, until it reaches the
target or for ``--cap-minutes`` (60); every other method then runs until it reaches the target or for
``--budget-factor`` (4) × DGPO's time to target on the same seed, capped at ``--cap-minutes`` (a method that
stops short reports "> its budget"). Each seed of ``--seeds`` is a full set of runs; ratios are per seed.
Each finished run's final LoRA is evaluated again at ``--final-per-prompt`` (64) images per test prompt, the
base once likewise. The benchmark resumes: a finished run is read, an interrupted one continues from its last
checkpoint, so it can be run in pieces (stop it, run the same command again). ``--runs`` trains only the
named runs, so one benchmark can be split over processes or machines that share ``--out`` (each run in one of
them; a method other than DGPO starts only once DGPO's run on its seed has finished, since that sets its
budget).

``--budget-minutes M`` instead gives every method a fixed M minutes of training with no early end (the
target is then ``--target`` or ``--target-frac`` × the best final score), as the first benchmark ran.

Outputs, under ``--out`` (each call rewrites its own; a file of those names that it did not write is refused, and
left as it is):

* ``bench_rl.json`` — every evaluation of every run, the summary below, and ``targets``: for every run, the training
  minutes and NFE at which it first reaches each target from the base + 0.02 to the base + 0.20 in steps of 0.01
  (by the same rule as the target's; a target it never reaches gives its last evaluation's, marked ``"bound": true``), and their
  ratios to DGPO's on the same seed, each marked measured, a lower or upper bound, or unresolved;
* ``bench_rl.md`` — per run: final test shapes-geneval (curve protocol and ``--final-per-prompt``), per
  category, quality FD, the peak and when it came, the training reward (mean of the first → last tenth of the
  epochs), wall-clock and NFE to the target, and each as a ratio to DGPO's on the same seed (NFE's is the same on
  any machine, so runs split over machines compare by it); then, with the evaluation noise, a row per target gain
  (+0.02 … +0.20) of every run's minutes to it and their ratio to DGPO's ("> x" and "≥ x×" lower bounds), and the
  same for NFE;
* ``bench_rl.png`` — test shapes-geneval against training wall-clock and against NFE, one curve per run;
* ``bench_rl_targets.png`` — the time ratio and the NFE ratio to DGPO (log axis) against the target gain, a line
  per run, bounds drawn as open triangles;
* ``bench_rl/<label>[-seed<k>]/`` — the run folders (config, metrics.jsonl, sample grids, final LoRA).

Examples::

    python scripts/bench_rl.py --seeds 0,1                       # the time-to-target protocol, 4 methods
    # The ratio-against-target curve measured to + 0.20: every run until it holds + 0.20, the baselines up to 4
    # hours (resumable: run the same command again after an interruption; one thread per lane).
    python scripts/bench_rl.py --seeds 0,1 --target-gain 0.20 --cap-minutes 240 --budget-factor 100 --threads 1
    python scripts/bench_rl.py --methods dgpo,flow_grpo --budget-minutes 5     # fixed budget
    # A learning-rate sweep: labels name variants of a method, LABEL:key=value sets one run's config.
    python scripts/bench_rl.py --methods fg1=flow_grpo,fg3=flow_grpo --budget-minutes 4 \\
        --set fg1:optim.lr=1e-4 --set fg3:optim.lr=3e-4
    # Split over two processes (same --seeds and --out: the folder names depend on them). DGPO first: its time
    # to target sets the others' budgets; then the rest, one list per process.
    python scripts/bench_rl.py --seeds 0,1 --runs dgpo-seed0 & python scripts/bench_rl.py --seeds 0,1 --runs dgpo-seed1; wait
    python scripts/bench_rl.py --seeds 0,1 --runs flow_grpo-seed0,diffusion_dpo-seed0,nft-seed0 &
    python scripts/bench_rl.py --seeds 0,1 --runs flow_grpo-seed1,diffusion_dpo-seed1,nft-seed1
    python scripts/bench_rl.py --report-only                     # rebuild tables and plots from the run folders
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parents[1]

METHODS = ("dgpo", "flow_grpo", "diffusion_dpo", "nft")
LABELS = {"dgpo": "DGPO", "flow_grpo": "Flow-GRPO", "diffusion_dpo": "Diffusion-DPO", "nft": "DiffusionNFT"}


def parse_methods(text: str) -> dict[str, str]:
    """'dgpo,fg=flow_grpo' → {label: method}."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        label, _, method = item.partition("=") if "=" in item else (item, "", item)
        if method not in METHODS:
            raise SystemExit(f"--methods: {method!r} is not a method; choose from {list(METHODS)} "
                             f"(optionally as label=method)")
        if label in out:
            raise SystemExit(f"--methods: label {label!r} is used twice")
        out[label] = method
    if not out:
        raise SystemExit("--methods: name at least one method")
    return out


def split_overrides(items: list[str], labels: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """--set values: 'key=value' for every run, 'label:key=value' for one run."""
    shared, per = [], {label: [] for label in labels}
    for item in items:
        head = item.split("=", 1)[0]
        if ":" in head:
            label, rest = item.split(":", 1)
            if label not in per:
                raise SystemExit(f"--set {item!r}: {label!r} is not one of the runs {labels}")
            per[label].append(rest)
        else:
            shared.append(item)
    return shared, per


def shared_settings(args, base: Path, seed: int, budget_minutes: float) -> list[str]:
    """What every method gets alike (applied after its recipe, before the user's --set)."""
    stop = [f"run.stop_at_gain={args.target_gain}", "run.stop_after=2"] if args.budget_minutes is None else []
    return [f"model.base={base}", f"run.time_budget_min={budget_minutes}", "run.epochs=1000000",
            f"run.seed={seed}", f"run.threads={args.threads}", "run.checkpoint_every=25", *stop,
            f"rollout.prompts_per_epoch={args.prompts}", f"rollout.group_size={args.group_size}",
            f"model.lora_rank={args.lora_rank}", f"model.lora_alpha={args.lora_rank}",
            "eval.every=1000000", f"eval.every_minutes={args.eval_minutes}", f"eval.per_prompt={args.per_prompt}",
            f"eval.early_every_minutes={args.early_eval_minutes}", f"eval.early_minutes={args.early_minutes}",
            "eval.interim_per_prompt=0", "eval.split=test", "eval.fd=true", "reward.name=shapes_partial"]


def run_name(label: str, seed: int, seeds: list[int]) -> str:
    """A run's folder name: the method's label, with the seed when there are several."""
    return label if len(seeds) == 1 else f"{label}-seed{seed}"


def select_runs(runs: dict[str, tuple], names: str, out: Path, dgpo_label: str | None, seeds: list[int]) -> list[str]:
    """The run names ``--runs`` asks to train (all of them for ``""``), in the benchmark's order.

    A name must be one of this benchmark's runs. A run of another method needs DGPO's run on its seed finished
    (``final/``) or trained before it here: DGPO's time to target sets its budget, and an unfinished DGPO run
    would give it the cap.
    """
    if not names:
        return list(runs)
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in runs]
    if unknown:
        raise SystemExit(f"--runs: {', '.join(unknown)} is not a run of this benchmark (its runs: {', '.join(runs)})")
    for name in wanted:
        label, method, seed = runs[name]
        dgpo_name = run_name(dgpo_label, seed, seeds) if dgpo_label else None
        if method != "dgpo" and dgpo_name and dgpo_name not in wanted \
                and not (out / "bench_rl" / dgpo_name / "final").is_dir():
            raise SystemExit(f"--runs: {name} needs {dgpo_name} finished first (DGPO's time to target sets its "
                             f"budget); run {dgpo_name} before it, or in the same --runs")
    return [n for n in runs if n in wanted]


def run_method(label: str, method: str, overrides: list[str], run_dir: Path, log) -> None:
    """Train one run to its end (:func:`dgpo.runtime.run_folder.finish_run`: finished runs are read, interrupted ones
    continue, one without a checkpoint starts again)."""
    from dgpo.runtime.run_folder import finish_run, reopen_run
    from dgpo.train_config import train_config_class
    from dgpo.trainer import Trainer, load_train_config, prepare_run_dir

    def start():
        cfg = load_train_config(REPO / "configs" / method / "shapes.yaml", [*overrides, f"run.out_dir={run_dir}"])
        log(f"{label} ({method}): up to {cfg.run.time_budget_min:g} min of training -> {run_dir}")
        Trainer(prepare_run_dir(cfg, resume=False, overwrite=run_dir.exists()), log=log).run()

    finish_run(run_dir, start, lambda: Trainer(reopen_run(train_config_class(), run_dir), log=log).run(resume=True), log)


def evaluate_final(base: Path, lora: Path | None, per_prompt: int, path: Path, log) -> dict:
    """shapes-geneval at ``per_prompt`` images per test prompt of the base (``lora`` None) or base + LoRA,
    cached in ``path``."""
    if path.is_file():
        return json.loads(path.read_text())
    from dgpo.cli import load_model
    from dgpo.evaluation.evaluate import EvalConfig, SamplerConfig, evaluate_model
    log(f"evaluating {lora or 'the base'} at {per_prompt} images per test prompt")
    result, _, _ = evaluate_model(load_model(base, str(lora) if lora else None), EvalConfig(per_prompt=per_prompt),
                                  SamplerConfig())
    result = {k: v for k, v in result.items() if k != "per_prompt"}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(path)
    return result


def read_evals(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r for r in (json.loads(l) for l in path.read_text().splitlines() if l.strip()) if "eval_geneval" in r]


def read_rewards(run_dir: Path) -> list[float]:
    """The mean training reward of every epoch (on-policy rollouts on train prompts), in epoch order."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = (json.loads(l) for l in path.read_text().splitlines() if l.strip())
    return [r["reward"] for r in rows if "reward" in r and "eval_geneval" not in r]


def reward_trend(rewards: list[float]) -> tuple[float, float] | None:
    """(mean of the first, mean of the last) tenth of the epochs' training rewards (≥ 1 epoch each), or None.

    Whether a method learns on its own training prompts, apart from the (noisier, square-dominated) test
    score. Comparable within a method; across methods only where the rollouts match (NFT's are CFG-free).
    """
    if not rewards:
        return None
    n = max(1, len(rewards) // 10)
    return float(sum(rewards[:n]) / n), float(sum(rewards[-n:]) / n)


def time_to_target(evals: list[dict], target: float, confirm: int = 1) -> dict | None:
    """The first evaluation after the base's that starts ``confirm`` consecutive evaluations at or above
    ``target`` (the run reached the target there and stayed), or None."""
    scores = [r["eval_geneval"] for r in evals]
    for i in range(1, len(evals) - confirm + 1):
        if all(x >= target for x in scores[i:i + confirm]):
            return evals[i]
    return None


TARGET_GAINS = tuple(round(0.01 * k, 2) for k in range(2, 21))  # the base + 0.02, + 0.03, … + 0.20


def reached_at(evals: list[dict], target: float, confirm: int = 2) -> dict:
    """Training minutes and NFE at which a run first reaches ``target``, by :func:`time_to_target`'s rule: the first
    of ``confirm`` consecutive evaluations (after the base's) at or above it.

    ``first_evaluation`` is True when that is the run's first evaluation after the base's: the run got there at or
    before it, and its evaluation cadence hides how much before (the time is bounded above). A run that never
    reaches the target gives a lower bound instead: its last evaluation's minutes and NFE, with ``bound`` True.
    """
    hit = time_to_target(evals, target, confirm)
    at = hit if hit is not None else evals[-1]
    return {"minutes": at["train_seconds"] / 60, "nfe": at["nfe"], "bound": hit is None,
            "first_evaluation": hit is not None and len(evals) > 1 and hit is evals[1]}


def ratio_to_dgpo(run: dict, dgpo: dict) -> dict | None:
    """A run's minutes and NFE to a target over DGPO's on the same seed (two :func:`reached_at` results), and what
    kind of number the ratio is.

    Each time is measured, at most its value (reached at the run's first evaluation) or at least its value (never
    reached: the run's last evaluation). The ratio is "measured" when both times are; "lower" (≥ it) when the run's
    time is measured or at least and DGPO's is measured or at most, not both measured; "upper" (≤ it) when the run's
    is at most and DGPO's measured; "unresolved" (no value) when both are at most: both reached the target at their
    first evaluation, and the cadence hides which got there first. None when DGPO never reached the target: the
    ratio is undefined.
    """
    if dgpo["bound"] or not dgpo["minutes"] or not dgpo["nfe"]:
        return None
    run_at_most, dgpo_at_most = run["first_evaluation"], dgpo["first_evaluation"]
    if run_at_most and dgpo_at_most:
        return {"time": None, "nfe": None, "kind": "unresolved"}
    kind = ("upper" if run_at_most else "lower" if (run["bound"] or dgpo_at_most) else "measured")
    return {"time": run["minutes"] / dgpo["minutes"], "nfe": run["nfe"] / dgpo["nfe"], "kind": kind}


def evaluation_noise(curves: dict[str, list[dict]]) -> float | None:
    """The mean standard error of one evaluation's score over fresh images (the rows' ``eval_geneval_se``) across
    every run's evaluations; None when the rows do not carry it (older runs)."""
    ses = [r["eval_geneval_se"] for evals in curves.values() for r in evals if r.get("eval_geneval_se") is not None]
    return sum(ses) / len(ses) if ses else None


def targets_report(curves: dict[str, list[dict]], methods: dict[str, str], seeds: dict[str, int | None],
                   confirm: int = 2, per_prompt: int | None = None, gains: tuple[float, ...] = TARGET_GAINS) -> dict:
    """The report's ``targets`` section: for every run, where it reached the base's score + each gain in ``gains``
    (:func:`reached_at`, keyed ``"0.02"`` …), and its ratio to DGPO's run on the same seed
    (:func:`ratio_to_dgpo`; DGPO's own run and gains DGPO never reached have none). The base's score is the first
    run's first evaluation, as :func:`summarise` takes it; ``per_prompt`` (images per test prompt of the
    evaluations) and the evaluation noise (:func:`evaluation_noise`) come with it."""
    runs = {name: evals for name, evals in curves.items() if evals}
    base = next(iter(runs.values()))[0]["eval_geneval"] if runs else None
    keys = [f"{g:.2f}" for g in gains]
    at = {name: {k: reached_at(evals, base + g, confirm) for k, g in zip(keys, gains)} for name, evals in runs.items()}
    out = {}
    for name in runs:
        ref = dgpo_run_on_seed({k: methods.get(k, k) for k in runs}, seeds, seeds.get(name))
        ratios = {} if ref in (None, name) else {k: ratio_to_dgpo(at[name][k], at[ref][k]) for k in keys}
        out[name] = {"method": methods.get(name, name), "seed": seeds.get(name), "dgpo_run": ref, "at": at[name],
                     "ratio_to_dgpo": {k: v for k, v in ratios.items() if v is not None}}
    return {"base": base, "gains": list(gains), "confirm": confirm, "per_prompt": per_prompt,
            "evaluation_se": evaluation_noise(runs), "runs": out}


def straight_line_minutes(evals: list[dict], target: float) -> float | None:
    """Training minutes at which the least-squares line through a run's evaluations (score against training
    time) reaches ``target``; None for a flat or falling line. An extrapolation, for runs stopped short of the
    target: it says how far off they were, not when they would have got there."""
    if len(evals) < 3:
        return None
    t = [r["train_seconds"] / 60 for r in evals]
    y = [r["eval_geneval"] for r in evals]
    tm, ym = sum(t) / len(t), sum(y) / len(y)
    var = sum((a - tm) ** 2 for a in t)
    slope = sum((a - tm) * (b - ym) for a, b in zip(t, y)) / var if var else 0.0
    if slope <= 0:
        return None
    return tm + (target - ym) / slope


def dgpo_run_on_seed(methods: dict[str, str], seeds: dict[str, int | None], seed: int | None) -> str | None:
    """The run that ratios on ``seed`` refer to: the run of method dgpo labelled "dgpo" with that seed, else the only
    run of method dgpo with that seed; None when there is none, or several and none labelled "dgpo"."""
    same_seed = [k for k, m in methods.items() if m == "dgpo" and seeds.get(k) == seed]
    named = [k for k in same_seed if k.split("-seed")[0] == "dgpo"] or same_seed
    return named[0] if len(named) == 1 else None


def summarise(curves: dict[str, list[dict]], methods: dict[str, str], target_frac: float,
              target: float | None = None, rewards: dict[str, list[float]] | None = None,
              target_gain: float | None = None, confirm: int = 1, seeds: dict[str, int] | None = None,
              budgets: dict[str, float] | None = None, finals: dict[str, dict] | None = None,
              running: set[str] | frozenset = frozenset()) -> dict:
    """Per run: final and peak score, time and NFE to the target, the time-to-target ratio to DGPO's on the same
    seed, and (given the per-epoch training rewards) the training reward's first and last tenth
    (:func:`reward_trend`). The target: the base's score + ``target_gain`` if given, else ``target``, else
    ``target_frac`` of the best final score; reached as :func:`time_to_target` with ``confirm``. ``budgets``
    (minutes each run was allowed) and ``finals`` (each run's final evaluation at more images) are reported. A
    run that used its budget without reaching the target gets a lower bound on its ratio (budget / DGPO's time);
    a run in ``running`` (not finished yet) gets neither "> budget" nor a bound."""
    last_scores = {k: v[-1]["eval_geneval"] for k, v in curves.items() if v}
    bases = [v[0]["eval_geneval"] for v in curves.values() if v]
    how = "gain"
    if target_gain is not None:
        target = (bases[0] + target_gain) if bases else float("nan")
    elif target is not None:
        how = "absolute"
    else:
        how, target = "frac", (target_frac * max(last_scores.values()) if last_scores else float("nan"))
    seeds, budgets, finals = seeds or {}, budgets or {}, finals or {}
    rows = {}
    for label, evals in curves.items():
        if not evals:
            continue
        hit = time_to_target(evals, target, confirm)
        last = evals[-1]
        peak = max(evals, key=lambda r: r["eval_geneval"])
        rows[label] = {"method": methods.get(label, label), "seed": seeds.get(label), "final": last["eval_geneval"],
                       "peak": peak["eval_geneval"], "peak_seconds": peak["train_seconds"],
                       "per_category": last["eval_per_category"], "fd": last.get("eval_fd"),
                       "epochs": last["epoch"], "train_seconds": last["train_seconds"], "nfe": last["nfe"],
                       "base": evals[0]["eval_geneval"], "budget_minutes": budgets.get(label),
                       "final_eval": finals.get(label), "running": label in running,
                       "seconds_to_target": hit["train_seconds"] if hit else None,
                       "nfe_to_target": hit["nfe"] if hit else None,
                       "train_reward": reward_trend((rewards or {}).get(label, []))}
    # No ratio when DGPO never reached the target or reached it at once.
    run_methods, run_seeds = {k: d["method"] for k, d in rows.items()}, {k: d["seed"] for k, d in rows.items()}
    for label, r in rows.items():
        ref_name = dgpo_run_on_seed(run_methods, run_seeds, r["seed"])
        ref = rows[ref_name]["seconds_to_target"] if ref_name else None
        ref_nfe = rows[ref_name]["nfe_to_target"] if ref_name else None
        s, n = r["seconds_to_target"], r["nfe_to_target"]
        r["time_ratio_to_dgpo"] = (s / ref) if (s is not None and ref) else None
        r["nfe_ratio_to_dgpo"] = (n / ref_nfe) if (n is not None and ref_nfe) else None  # the same on any machine
        spent = s is None and not r["running"] and r["budget_minutes"]
        r["time_ratio_above"] = (r["budget_minutes"] * 60 / ref) if (spent and ref) else None
        r["nfe_ratio_above"] = (r["nfe"] / ref_nfe) if (spent and ref_nfe) else None
        line = straight_line_minutes(curves[label], target) if spent else None
        r["straight_line_minutes"] = line
        r["straight_line_ratio"] = (line * 60 / ref) if (line and ref) else None
    return {"target": target, "target_how": how, "target_gain": target_gain,
            "target_frac": target_frac if how == "frac" else None, "confirm": confirm, "methods": rows}


def markdown(summary: dict) -> str:
    from dgpo.worlds import shapes
    cats = list(shapes.CATEGORIES)
    rows = summary["methods"]
    with_finals = any(r.get("final_eval") for r in rows.values())
    head = ["run", "base", "final", *(["final (64)", "FD (64)"] if with_finals else []), *cats, "FD",
            "peak (min)", "train reward", "epochs", "min", "NFE", "min to target", "NFE to target", "time / DGPO's",
            "NFE / DGPO's"]
    how = {"gain": f"= the base + {summary.get('target_gain')}", "absolute": "set with --target",
           "frac": f"= {summary.get('target_frac') or 0:.0%} of the best final score"}[summary.get("target_how", "frac")]
    reached = ("reached when two consecutive evaluations are at or above it; the time is the first of them"
               if summary.get("confirm", 1) == 2 else "reached at the first evaluation at or above it")
    lines = [f"Target: {summary['target']:.3f} ({how}; {reached}).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fmt = lambda v, f: "-" if v is None else format(v, f)
    for label, r in rows.items():
        name = label if label.split("-seed")[0] == r["method"] else f"{label} ({r['method']})"
        fe = r.get("final_eval") or {}
        finals = [fmt(fe.get("geneval"), ".3f"), fmt(fe.get("fd"), ".2f")] if with_finals else []
        if r["seconds_to_target"] is not None:
            to_target = f"{r['seconds_to_target'] / 60:.1f}"
        elif r.get("running"):
            to_target = "running"
        elif r.get("budget_minutes"):
            to_target = f"> {r['budget_minutes']:.0f}"
        else:
            to_target = "not reached"
        lines.append("| " + " | ".join([
            name, f"{r['base']:.3f}", f"{r['final']:.3f}", *finals,
            *(fmt(r["per_category"].get(c), ".3f") for c in cats),
            fmt(r["fd"], ".2f"), f"{r['peak']:.3f} ({r['peak_seconds'] / 60:.0f})",
            "-" if not r.get("train_reward") else "{:.3f} → {:.3f}".format(*r["train_reward"]), str(r["epochs"]),
            f"{r['train_seconds'] / 60:.1f}", f"{r['nfe']:.3g}", to_target,
            "-" if r["nfe_to_target"] is None else f"{r['nfe_to_target']:.3g}",
            f"> {r['time_ratio_above']:.2f}" if r.get("time_ratio_above") else fmt(r["time_ratio_to_dgpo"], ".2f"),
            f"> {r['nfe_ratio_above']:.2f}" if r.get("nfe_ratio_above") else fmt(r.get("nfe_ratio_to_dgpo"), ".2f")])
            + " |")
    short = [(label, r) for label, r in rows.items() if r.get("straight_line_minutes")]
    if short:
        lines += ["", "Runs that spent their budget short of the target: where a straight line through their evaluations "
                  "(score against training minutes) would reach it, an extrapolation:"]
        lines += [f"- {label}: {r['straight_line_minutes']:.0f} min"
                  + (f" ({r['straight_line_ratio']:.1f}× DGPO's time on its seed)" if r.get("straight_line_ratio") else "")
                  for label, r in short]
    return "\n".join(lines) + "\n"


def format_reached(at: dict, quantity: str) -> str:
    """One :func:`reached_at` result as a table cell: "12.0" measured, "≤ 3.1" reached at the run's first
    evaluation (at or before it), "> 60.1" never reached (its last evaluation, a lower bound)."""
    value = format(at[quantity], ".1f" if quantity == "minutes" else ".3g")
    return f"> {value}" if at["bound"] else f"≤ {value}" if at["first_evaluation"] else value


def format_ratio(ratio: dict | None, quantity: str) -> str:
    """One :func:`ratio_to_dgpo` result as "2.50×", "≥ 2.50×", "≤ 0.50×", "?" (unresolved), or "" (undefined)."""
    if ratio is None:
        return ""
    if ratio["kind"] == "unresolved":
        return "?"
    sign = {"measured": "", "lower": "≥ ", "upper": "≤ "}[ratio["kind"]]
    return f"{sign}{ratio['time' if quantity == 'minutes' else 'nfe']:.2f}×"


def targets_table(targets: dict, quantity: str) -> list[str]:
    """Markdown rows: one per target gain, a column per run with its ``quantity`` ("minutes" or "nfe") to the target
    and, for runs other than DGPO's, the ratio to DGPO's on the same seed in brackets."""
    runs = targets["runs"]
    head = ["gain", "target", *runs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for gain in targets["gains"]:
        key = f"{gain:.2f}"
        cells = []
        for r in runs.values():
            ratio = format_ratio(r["ratio_to_dgpo"].get(key), quantity)
            cells.append(format_reached(r["at"][key], quantity) + (f" ({ratio})" if ratio else ""))
        lines.append("| " + " | ".join([f"+{key}", f"{targets['base'] + gain:.3f}", *cells]) + " |")
    return lines


def targets_markdown(targets: dict) -> str:
    """The ``targets`` section as markdown: the rule and the evaluation noise, then the minutes table and the NFE
    table (:func:`targets_table`)."""
    if not targets["runs"]:
        return "No run has evaluated yet: no time to each target.\n"
    rule = ("two consecutive evaluations at or above it; the time is the first of them" if targets["confirm"] == 2
            else f"{targets['confirm']} consecutive evaluations at or above it; the time is the first of them")
    per_prompt = f"{targets['per_prompt']} images per test prompt" if targets.get("per_prompt") else "its protocol"
    se = targets.get("evaluation_se")
    noise = (f"Evaluation noise: one evaluation's score has a standard error of {se:.3f} over fresh images (the mean "
             f"over the runs' evaluations, at {per_prompt}), so two evaluations differ by about {se * 2 ** 0.5:.3f} "
             "by chance alone." if se is not None else f"The evaluations used {per_prompt}.")
    lines = ["## Time to each target", "",
             f"Targets: the base's score {targets['base']:.3f} + each gain; a run reaches one at {rule}.", "",
             noise, "",
             "Cells: the run's training minutes to the target and, in brackets, their ratio to DGPO's on the same "
             "seed. \"> x\": never reached; x is its last evaluation, a lower bound, and the ratio \"≥ x×\" is one "
             "too. \"≤ x\": reached at its first evaluation, so at or before it (its evaluation cadence bounds the "
             "time above); a ratio to such a DGPO time is a lower bound \"≥ x×\", a baseline's such time over a "
             "measured DGPO time an upper bound \"≤ x×\", and \"?\" when both are (the cadence hides which got "
             "there first). No ratio where DGPO never reached the target.", "",
             *targets_table(targets, "minutes"), "",
             "NFE (transformer evaluations) to each target, the same on any machine, and its ratio to DGPO's:", "",
             *targets_table(targets, "nfe")]
    return "\n".join(lines) + "\n"


def plot_targets(targets: dict, path: Path) -> None:
    """Time ratio and NFE ratio to DGPO (log axis) against the target gain, a line per run other than DGPO's:
    filled circles measured, open upward triangles with an arrow lower bounds, open downward triangles upper
    bounds (unresolved and undefined ratios are not drawn)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    runs = targets["runs"]
    colours = {m: f"C{i}" for i, m in enumerate(dict.fromkeys(r["method"] for r in runs.values()))}
    markers = {"measured": "o", "lower": "^", "upper": "v"}
    drawn = False
    for name, r in runs.items():
        points = [(float(k), v) for k, v in r["ratio_to_dgpo"].items() if v["kind"] in markers]
        if not points:
            continue
        base_label, _, seed = name.partition("-seed")
        colour = colours[r["method"]]
        for ax, quantity in zip(axes, ("time", "nfe")):
            ax.plot([g for g, _ in points], [v[quantity] for _, v in points], color=colour, lw=1,
                    ls="--" if seed not in ("", "0") else "-",
                    label=LABELS.get(base_label, base_label) + (f", seed {seed}" if seed else ""))
            for gain, v in points:
                filled = v["kind"] == "measured"
                ax.plot(gain, v[quantity], marker=markers[v["kind"]], color=colour, markersize=6,
                        markerfacecolor=colour if filled else "none")
                if v["kind"] == "lower":
                    ax.annotate("", xy=(gain, v[quantity] * 1.35), xytext=(gain, v[quantity] * 1.05),
                                arrowprops=dict(arrowstyle="->", color=colour, lw=0.8))
        drawn = True
    kinds = [Line2D([], [], ls="", marker="o", color="gray", label="measured"),
             Line2D([], [], ls="", marker="^", color="gray", markerfacecolor="none", label="lower bound (≥)"),
             Line2D([], [], ls="", marker="v", color="gray", markerfacecolor="none", label="upper bound (≤)")]
    for ax, what in zip(axes, ("training minutes", "NFE")):
        ax.axhline(1.0, color="gray", ls=":", lw=0.8)
        ax.set(xlabel="target gain over the base", ylabel=f"{what} to target / DGPO's (same seed)")
        if drawn:
            ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    if drawn:
        handles, _ = axes[0].get_legend_handles_labels()
        axes[0].legend(handles=handles + kinds, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(curves: dict[str, list[dict]], methods: dict[str, str], target: float, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colours = {m: f"C{i}" for i, m in enumerate(dict.fromkeys(methods.get(k, k) for k in curves))}
    for label, evals in curves.items():
        if not evals:
            continue
        base_label, _, seed = label.partition("-seed")
        name = LABELS.get(base_label, base_label) + (f", seed {seed}" if seed else "")
        style = dict(color=colours[methods.get(label, label)], ls="--" if seed not in ("", "0") else "-",
                     marker="o", markersize=3, label=name)
        y = [r["eval_geneval"] for r in evals]
        axes[0].plot([r["train_seconds"] / 60 for r in evals], y, **style)
        axes[1].plot([r["nfe"] for r in evals], y, **style)
    for ax, xl in zip(axes, ("training wall-clock (min)", "NFE (transformer evaluations, all samples)")):
        ax.axhline(target, color="gray", ls="--", lw=0.8)
        ax.set(xlabel=xl, ylabel="test shapes-geneval")
        ax.grid(alpha=0.3)
    axes[1].set_xscale("log")
    if any(curves.values()):  # a report before any run has evaluated draws empty axes
        axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def budget_minutes(args, method: str, dgpo_dir: Path | None) -> float:
    """Minutes of training a run may take: ``--budget-minutes`` if given; else DGPO the cap, any other method
    ``--budget-factor`` × DGPO's time to target on its seed (the cap when DGPO did not reach it)."""
    if args.budget_minutes is not None:
        return args.budget_minutes
    evals = read_evals(dgpo_dir) if (method != "dgpo" and dgpo_dir is not None) else []
    hit = time_to_target(evals, evals[0]["eval_geneval"] + args.target_gain, confirm=2) if evals else None
    if hit is None:
        return args.cap_minutes
    return min(args.cap_minutes, round(args.budget_factor * hit["train_seconds"] / 60, 2))


def default_base() -> Path:
    """The embedded shapes base every method starts from: DGPO's recipe's ``model.base_config``, resolved."""
    from dgpo.trainer import load_train_config, resolve_base
    return resolve_base(load_train_config(REPO / "configs/dgpo/shapes.yaml"))[0]


def read_budget(run_dir: Path) -> float | None:
    import yaml
    path = run_dir / "config.yaml"
    return yaml.safe_load(path.read_text())["run"]["time_budget_min"] if path.is_file() else None


def parse_args(argv=None) -> argparse.Namespace:
    """The benchmark's command line, its defaults filled in as the protocol chosen sets them."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated methods, each optionally label=method (default: all four)")
    p.add_argument("--seeds", default="0", help="comma-separated run seeds; each is a full set of runs (default 0)")
    p.add_argument("--seed", type=int, default=None, help="one run seed (the same as --seeds N)")
    p.add_argument("--target-gain", type=float, default=0.15,
                   help="target = the base's score + this (default 0.15); each run ends when two consecutive "
                        "evaluations reach it")
    p.add_argument("--budget-factor", type=float, default=4.0,
                   help="every method but DGPO trains up to this × DGPO's time to target on its seed (default 4)")
    p.add_argument("--cap-minutes", type=float, default=60.0, help="no run trains longer than this (default 60)")
    p.add_argument("--final-per-prompt", type=int, default=64,
                   help="images per test prompt of each run's final evaluation, and the base's (default 64)")
    p.add_argument("--budget-minutes", type=float, default=None,
                   help="instead: a fixed training budget per method, no early end and no final evaluation")
    p.add_argument("--eval-minutes", type=float, default=None,
                   help="evaluate every N minutes of training (default 3; 2 with --budget-minutes)")
    p.add_argument("--early-eval-minutes", type=float, default=None,
                   help="in the first --early-minutes of training, evaluate this often instead, where the time "
                        "ratios at low targets are decided (evaluation time is never training time; default 0.5; "
                        "0 = off, and off with --budget-minutes)")
    p.add_argument("--early-minutes", type=float, default=5.0,
                   help="how long the early cadence lasts, in minutes of training (default 5)")
    p.add_argument("--per-prompt", type=int, default=None,
                   help="images per test prompt of the curves' evaluations (default 32; 16 with --budget-minutes)")
    p.add_argument("--prompts", type=int, default=8, help="P: prompts per epoch for every method (default 8)")
    p.add_argument("--group-size", type=int, default=8, help="G: samples per prompt for every method (default 8)")
    p.add_argument("--lora-rank", type=int, default=16, help="LoRA rank (= alpha) for every method (default 16)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--target-frac", type=float, default=0.9,
                   help="with --budget-minutes: target = this fraction of the best final score (default 0.9)")
    p.add_argument("--target", type=float, default=None,
                   help="with --budget-minutes: an absolute target score (overrides --target-frac)")
    p.add_argument("--base", default="", help="base pipeline folder (default: the embedded shapes base)")
    p.add_argument("--set", action="append", default=[], metavar="[LABEL:]KEY=VALUE",
                   help="config override for every run, or for one run with LABEL: (repeatable), "
                        "e.g. --set flow_grpo:optim.lr=1e-3")
    p.add_argument("--out", default="runs/bench_rl",
                   help="output folder (default runs/bench_rl; a later run with the same folder continues it)")
    p.add_argument("--runs", default="",
                   help="train only these runs (comma-separated folder names, e.g. nft-seed0,dgpo-seed1), to split "
                        "the benchmark over processes sharing --out; the report reads every run's folder")
    p.add_argument("--report-only", action="store_true", help="only rebuild the JSON, markdown and PNGs from the run folders")
    args = p.parse_args(argv)
    fixed = args.budget_minutes is not None
    args.eval_minutes = args.eval_minutes or (2.0 if fixed else 3.0)
    args.per_prompt = args.per_prompt or (16 if fixed else 32)
    if args.early_eval_minutes is None:
        args.early_eval_minutes = 0.0 if fixed else 0.5
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    fixed = args.budget_minutes is not None
    try:
        seeds = [args.seed] if args.seed is not None else [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--seeds: {args.seeds!r} is not a comma-separated list of integers")

    methods = parse_methods(args.methods)
    shared, per = split_overrides(args.set, list(methods))
    out = Path(args.out)
    from dgpo.errors import UserError
    from dgpo.runtime.output_dir import check_report_outputs, report_files, write_report_json
    report = report_files(out, "bench_rl", (".json", ".md", ".png", "_targets.png"))
    try:  # its own report is rewritten on every call (the benchmark resumes); a file it did not write, never
        check_report_outputs(report[0], report[1:], "bench_rl", overwrite=True, flag="--out")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    runs = {run_name(label, seed, seeds): (label, method, seed) for seed in seeds for label, method in
            sorted(methods.items(), key=lambda item: item[1] != "dgpo")}  # DGPO first: it sets the others' budget
    dgpo_label = "dgpo" if methods.get("dgpo") == "dgpo" else next((k for k, m in methods.items() if m == "dgpo"), None)
    final_name = f"final_eval_{args.final_per_prompt}.json"
    to_train = select_runs(runs, args.runs, out, dgpo_label, seeds)
    if not args.report_only:
        from dgpo.trainer import load_train_config
        try:
            for label, method in methods.items():  # validate every run's config before the first one starts
                load_train_config(REPO / "configs" / method / "shapes.yaml", [*shared, *per[label]])
            base = Path(args.base) if args.base else default_base()
            for name in to_train:
                label, method, seed = runs[name]
                run_dir = out / "bench_rl" / name
                dgpo_dir = out / "bench_rl" / run_name(dgpo_label, seed, seeds) if dgpo_label else None
                minutes = budget_minutes(args, method, dgpo_dir)
                run_method(label, method, [*shared_settings(args, base, seed, minutes), *shared, *per[label]],
                           run_dir, print)
                if not fixed:
                    evaluate_final(base, run_dir / "final" / "lora", args.final_per_prompt, run_dir / final_name, print)
            if not fixed:
                evaluate_final(base, None, args.final_per_prompt, out / "bench_rl" / f"base_eval_{args.final_per_prompt}.json",
                               print)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    folders = {name: out / "bench_rl" / name for name in runs}
    curves = {name: read_evals(d) for name, d in folders.items()}
    rewards = {name: read_rewards(d) for name, d in folders.items()}
    finals = {name: json.loads((d / final_name).read_text()) for name, d in folders.items() if (d / final_name).is_file()}
    run_methods, run_seeds = {name: r[1] for name, r in runs.items()}, {name: r[2] for name, r in runs.items()}
    summary = summarise(curves, run_methods, args.target_frac, args.target, rewards,
                        target_gain=None if fixed else args.target_gain, confirm=1 if fixed else 2, seeds=run_seeds,
                        budgets={name: read_budget(d) for name, d in folders.items()}, finals=finals,
                        running={name for name, d in folders.items() if d.is_dir() and not (d / "final").is_dir()})
    base_final = out / "bench_rl" / f"base_eval_{args.final_per_prompt}.json"
    summary["base_final_eval"] = json.loads(base_final.read_text()) if base_final.is_file() else None
    summary["settings"] = {"budget_minutes": args.budget_minutes, "eval_minutes": args.eval_minutes,
                           "early_eval_minutes": args.early_eval_minutes, "early_minutes": args.early_minutes,
                           "per_prompt": args.per_prompt, "final_per_prompt": args.final_per_prompt,
                           "P": args.prompts, "G": args.group_size, "lora_rank": args.lora_rank, "seeds": seeds,
                           "set": args.set, "target": args.target, "target_gain": args.target_gain,
                           "budget_factor": args.budget_factor, "cap_minutes": args.cap_minutes, "methods": methods}
    targets = targets_report(curves, run_methods, run_seeds, summary["confirm"], args.per_prompt)
    try:
        write_report_json(report, {"summary": summary, "targets": targets, "curves": curves}, "bench_rl",
                          overwrite=True, flag="--out")
    except UserError as e:  # the folder changed while it trained
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = markdown(summary)
    if summary["base_final_eval"]:
        b = summary["base_final_eval"]
        table += (f"\nThe base at {args.final_per_prompt} images per test prompt: {b['geneval']:.3f}"
                  f" (FD {b.get('fd', float('nan')):.2f}).\n")
    table += "\n" + targets_markdown(targets)
    report[1].write_text(table)
    plot(curves, run_methods, summary["target"], report[2])
    plot_targets(targets, report[3])
    print(table)
    print(f"wrote {', '.join(str(path) for path in report)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
