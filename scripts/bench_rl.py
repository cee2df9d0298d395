"""RL efficiency benchmark: DGPO against Flow-GRPO, Diffusion-DPO and DiffusionNFT in the same trainer.

Every method is one run folder of :class:`dgpo.trainer.Trainer` (its own recipe from
``configs/<method>/shapes.yaml``) with the same cached base, train prompts, P×G, LoRA rank, seed,
evaluation protocol (test prompts, images per prompt, sampler, FD) and training wall-clock budget; each is
evaluated every ``--eval-minutes`` of training. Methods run one after another in this process (one torch
process on the machine at a time). Outputs, under ``--out``:

* ``bench_rl.json`` — every evaluation of every method, and the summary below;
* ``bench_rl.md`` — per method: final test shapes-geneval, per-category scores, quality FD, the peak score
  and when it came, the training reward (mean of the first → last tenth of the epochs), wall-clock and NFE to reach the target (``--target``, or ``--target-frac`` × the best
  final score among methods) and time-to-target as a ratio to DGPO's;
* ``bench_rl.png`` — test shapes-geneval against training wall-clock and against NFE, one curve per method;
* ``bench_rl/<label>/`` — the run folders (config, metrics.jsonl, sample grids, final LoRA).

Examples::

    python scripts/bench_rl.py                                   # 4 methods × 12 min of training
    python scripts/bench_rl.py --methods dgpo,flow_grpo --budget-minutes 5
    # A learning-rate sweep: labels name variants of a method, LABEL:key=value sets one run's config.
    python scripts/bench_rl.py --methods fg1=flow_grpo,fg3=flow_grpo --budget-minutes 4 \\
        --set fg1:optim.lr=1e-4 --set fg3:optim.lr=3e-4
    python scripts/bench_rl.py --report-only                     # rebuild table and plot from the run folders
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

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


def shared_settings(args, base: Path) -> list[str]:
    """What every method gets alike (applied after its recipe, before the user's --set)."""
    return [f"model.base={base}", f"run.time_budget_min={args.budget_minutes}", "run.epochs=1000000",
            f"run.seed={args.seed}", f"run.threads={args.threads}", "run.checkpoint_every=25",
            f"rollout.prompts_per_epoch={args.prompts}", f"rollout.group_size={args.group_size}",
            f"model.lora_rank={args.lora_rank}", f"model.lora_alpha={args.lora_rank}",
            "eval.every=1000000", f"eval.every_minutes={args.eval_minutes}", f"eval.per_prompt={args.per_prompt}",
            "eval.split=test", "eval.fd=true", "reward.name=shapes_partial"]


def run_method(label: str, method: str, overrides: list[str], out: Path, log) -> None:
    from dgpo.trainer import Trainer, load_train_config, prepare_run_dir
    run_dir = out / "bench_rl" / label
    cfg = load_train_config(REPO / "configs" / method / "shapes.yaml", [*overrides, f"run.out_dir={run_dir}"])
    cfg = prepare_run_dir(cfg, resume=False)
    log(f"== {label} ({method}): {cfg.run.time_budget_min} min of training -> {run_dir}")
    Trainer(cfg, log=log).run()


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


def summarise(curves: dict[str, list[dict]], methods: dict[str, str], target_frac: float,
              target: float | None = None, rewards: dict[str, list[float]] | None = None) -> dict:
    """Per method: final and peak score, time and NFE to the target (``target`` if given, else ``target_frac``
    of the best final score), the time-to-target ratio to DGPO's, and (given the per-epoch training rewards)
    the training reward's first and last tenth (:func:`reward_trend`)."""
    finals = {k: v[-1]["eval_geneval"] for k, v in curves.items() if v}
    explicit = target is not None
    if target is None:
        target = target_frac * max(finals.values()) if finals else float("nan")
    rows = {}
    for label, evals in curves.items():
        if not evals:
            continue
        hit = next((r for r in evals if r["eval_geneval"] >= target), None)
        last = evals[-1]
        peak = max(evals, key=lambda r: r["eval_geneval"])
        rows[label] = {"method": methods.get(label, label), "final": last["eval_geneval"],
                       "peak": peak["eval_geneval"], "peak_seconds": peak["train_seconds"],
                       "per_category": last["eval_per_category"], "fd": last.get("eval_fd"),
                       "epochs": last["epoch"], "train_seconds": last["train_seconds"], "nfe": last["nfe"],
                       "base": evals[0]["eval_geneval"],
                       "seconds_to_target": hit["train_seconds"] if hit else None,
                       "nfe_to_target": hit["nfe"] if hit else None,
                       "train_reward": reward_trend((rewards or {}).get(label, []))}
    # DGPO's row: the run labelled "dgpo", else the only run of method dgpo. No ratio when DGPO never reached the
    # target or reached it at epoch 0 (the base already scores the target: raise --target-frac).
    dgpo_rows = [r for k, r in rows.items() if k == "dgpo"] or [r for r in rows.values() if r["method"] == "dgpo"]
    ref = dgpo_rows[0]["seconds_to_target"] if len(dgpo_rows) == 1 else None
    for r in rows.values():
        s = r["seconds_to_target"]
        r["time_ratio_to_dgpo"] = (s / ref) if (s is not None and ref) else None
    return {"target": target, "target_frac": None if explicit else target_frac, "methods": rows}


def markdown(summary: dict) -> str:
    from dgpo.worlds import shapes
    cats = list(shapes.CATEGORIES)
    head = ["method", "base", "final", *cats, "FD", "peak (min)", "train reward", "epochs", "min", "NFE",
            "min to target", "NFE to target", "time / DGPO's"]
    how = ("set with --target" if summary["target_frac"] is None
           else f"= {summary['target_frac']:.0%} of the best final score")
    lines = [f"Target: {summary['target']:.3f} ({how}).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fmt = lambda v, f: "-" if v is None else format(v, f)
    for label, r in summary["methods"].items():
        name = label if label == r["method"] else f"{label} ({r['method']})"
        lines.append("| " + " | ".join([
            name, f"{r['base']:.3f}", f"{r['final']:.3f}", *(fmt(r["per_category"].get(c), ".3f") for c in cats),
            fmt(r["fd"], ".2f"), f"{r['peak']:.3f} ({r['peak_seconds'] / 60:.0f})",
            "-" if not r.get("train_reward") else "{:.3f} → {:.3f}".format(*r["train_reward"]), str(r["epochs"]), f"{r['train_seconds'] / 60:.1f}", f"{r['nfe']:.3g}",
            "not reached" if r["seconds_to_target"] is None else f"{r['seconds_to_target'] / 60:.1f}",
            "-" if r["nfe_to_target"] is None else f"{r['nfe_to_target']:.3g}",
            fmt(r["time_ratio_to_dgpo"], ".2f")]) + " |")
    return "\n".join(lines) + "\n"


def plot(curves: dict[str, list[dict]], methods: dict[str, str], target: float, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, evals in curves.items():
        if not evals:
            continue
        name = LABELS.get(label, label)
        y = [r["eval_geneval"] for r in evals]
        axes[0].plot([r["train_seconds"] / 60 for r in evals], y, "o-", label=name, markersize=3)
        axes[1].plot([r["nfe"] for r in evals], y, "o-", label=name, markersize=3)
    for ax, xl in zip(axes, ("training wall-clock (min)", "NFE (transformer evaluations, all samples)")):
        ax.axhline(target, color="gray", ls="--", lw=0.8)
        ax.set(xlabel=xl, ylabel="test shapes-geneval")
        ax.grid(alpha=0.3)
    axes[1].set_xscale("log")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated methods, each optionally label=method (default: all four)")
    p.add_argument("--budget-minutes", type=float, default=12.0,
                   help="training wall-clock per method, evaluation excluded (default 12: ~1 h for four)")
    p.add_argument("--eval-minutes", type=float, default=2.0, help="evaluate every N minutes of training (default 2)")
    p.add_argument("--per-prompt", type=int, default=16, help="evaluation images per test prompt (default 16)")
    p.add_argument("--prompts", type=int, default=8, help="P: prompts per epoch for every method (default 8)")
    p.add_argument("--group-size", type=int, default=8, help="G: samples per prompt for every method (default 8)")
    p.add_argument("--lora-rank", type=int, default=16, help="LoRA rank (= alpha) for every method (default 16)")
    p.add_argument("--seed", type=int, default=0, help="run seed for every method (default 0)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--target-frac", type=float, default=0.9,
                   help="target = this fraction of the best final score among methods (default 0.9)")
    p.add_argument("--target", type=float, default=None,
                   help="absolute target score (overrides --target-frac; pick one above the base's noise band)")
    p.add_argument("--base", default="", help="base pipeline folder (default: the cached embedded shapes base)")
    p.add_argument("--set", action="append", default=[], metavar="[LABEL:]KEY=VALUE",
                   help="config override for every run, or for one run with LABEL: (repeatable), "
                        "e.g. --set flow_grpo:optim.lr=1e-3")
    p.add_argument("--out", default=str(REPO / "docs" / "experiments" / "results"),
                   help="output folder (default docs/experiments/results)")
    p.add_argument("--report-only", action="store_true", help="only rebuild JSON/markdown/PNG from the run folders")
    args = p.parse_args(argv)

    methods = parse_methods(args.methods)
    shared, per = split_overrides(args.set, list(methods))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        from dgpo.errors import UserError
        from dgpo.trainer import load_train_config, resolve_base
        try:
            for label, method in methods.items():  # validate every run's config before the first one starts
                load_train_config(REPO / "configs" / method / "shapes.yaml", [*shared, *per[label]])
            base = Path(args.base) if args.base else resolve_base(load_train_config(REPO / "configs/dgpo/shapes.yaml"))[0]
            for label, method in methods.items():
                run_method(label, method, [*shared_settings(args, base), *shared, *per[label]], out, print)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    curves = {label: read_evals(out / "bench_rl" / label) for label in methods}
    rewards = {label: read_rewards(out / "bench_rl" / label) for label in methods}
    summary = summarise(curves, methods, args.target_frac, args.target, rewards)
    summary["settings"] = {"budget_minutes": args.budget_minutes, "eval_minutes": args.eval_minutes,
                           "per_prompt": args.per_prompt, "P": args.prompts, "G": args.group_size,
                           "lora_rank": args.lora_rank, "seed": args.seed, "set": args.set, "target": args.target,
                           "methods": methods}
    (out / "bench_rl.json").write_text(json.dumps({"summary": summary, "curves": curves}, indent=2))
    table = markdown(summary)
    (out / "bench_rl.md").write_text(table)
    plot(curves, methods, summary["target"], out / "bench_rl.png")
    print(table)
    print(f"wrote {out / 'bench_rl.json'}, {out / 'bench_rl.md'}, {out / 'bench_rl.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
