"""How noisy is shapes-geneval, and is a gain larger than that noise?

Evaluates the base and every ``--lora`` on the test prompts with ``--seed-sets`` disjoint sets of seeds
(set j: image k gets seed ``--seed + j·10,000,000 + k``, so every image of every set draws its own noise),
the same sets for every model. Reports, per model, the mean and the standard deviation over the sets of
shapes-geneval (and the partial score; with ``--fd`` the FD and the sharpness beside it) — the evaluation
noise at that many images per prompt — and, per LoRA, the *paired* difference LoRA − base set by set: its
mean, its standard deviation and the ratio mean / (std / √n). A gain is worth quoting when it is several
paired standard errors.

Writes ``NAME.json``, ``NAME.md`` and ``NAME.png`` (each set's score, base and LoRAs, paired) into
``--out-dir``:

    python scripts/eval_noise.py --model BASE --lora RUN/final/lora --seed-sets 4 --per-prompt 64
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from dgpo.runtime.metrics import (QUALITY_MEASURES, SEED_SET_STRIDE, paired, seed_set_start,  # noqa: E402
                                  spread)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="base pipeline folder (default: the embedded shapes base)")
    p.add_argument("--lora", action="append", default=[], help="a LoRA folder to compare with the base (repeatable)")
    p.add_argument("--seed-sets", type=int, default=4, help="disjoint seed sets (default 4; at least 2)")
    p.add_argument("--per-prompt", type=int, default=64, help="images per test prompt per set (default 64)")
    p.add_argument("--seed", type=int, default=1000, help="first seed of set 0 (default 1000)")
    p.add_argument("--fd", action="store_true",
                   help="also compute the quality FD of every set, and the sharpness beside it")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    p.add_argument("--out-dir", default="runs/eval_noise", help="output folder (default runs/eval_noise)")
    p.add_argument("--name", default="eval_noise", help="output file stem (default eval_noise)")
    p.add_argument("--overwrite", action="store_true", help="replace NAME.* written by an earlier run")
    return p.parse_args(argv)


def mean_std(m: dict, key: str) -> str:
    """A table cell: mean ± std over the seed sets, or "-" when the measure was not taken."""
    return f"{m[key]['mean']:.3f} ± {m[key]['std']:.3f}" if key in m else "-"


def table(result: dict) -> str:
    n = result["seed_sets"]
    lines = [f"{n} seed sets × {result['per_prompt']} images per test prompt; mean ± std over the sets.", "",
             f"| model | shapes-geneval | partial | {' | '.join(QUALITY_MEASURES.values())} | "
             "paired Δ geneval vs base (mean ± std) | Δ / sem |", "|---|---|---|---|---|---|---|---|"]
    for name, m in result["models"].items():
        quality = " | ".join(mean_std(m, key) for key in QUALITY_MEASURES)
        d = m.get("paired_geneval")
        delta = f"{d['mean']:+.3f} ± {d['std']:.3f}" if d else "-"
        ratio = f"{d['ratio']:.1f}" if d else "-"
        lines.append(f"| {name} | {mean_std(m, 'geneval')} | {mean_std(m, 'partial')} | {quality} | "
                     f"{delta} | {ratio} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.6))
    names = list(result["models"])
    for j in range(result["seed_sets"]):
        ax.plot(range(len(names)), [result["models"][n]["per_set"]["geneval"][j] for n in names], "o-", alpha=0.6,
                label=f"seed set {j}")
    ax.set_xticks(range(len(names)), names, rotation=15)
    ax.set(ylabel="test shapes-geneval", title="the same seed sets for every model (paired)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    from dgpo.cli import load_model, resolve_model
    from dgpo.errors import UserError
    from dgpo.evaluation.evaluate import EvalConfig, SamplerConfig, evaluate_model
    from dgpo.runtime.output_dir import check_report_outputs, write_report_json
    try:
        if args.seed_sets < 2:
            raise UserError("--seed-sets must be at least 2 (a spread needs two sets)")
        out = Path(args.out_dir)
        paths = {ext: out / f"{args.name}.{ext}" for ext in ("json", "md", "png")}
        check_report_outputs(paths["json"], [paths["md"], paths["png"]], "eval_noise", args.overwrite)
        if args.threads:
            import torch
            torch.set_num_threads(args.threads)
        base = resolve_model(args.model)
        models = {"base": None, **{str(lora): lora for lora in args.lora}}
        result = {"base": str(base), "seed_sets": args.seed_sets, "per_prompt": args.per_prompt,
                  "seed": args.seed, "set_stride": SEED_SET_STRIDE, "models": {}}
        for name, lora in models.items():
            model = load_model(base, lora)
            measures = ["geneval", "partial", *(QUALITY_MEASURES if args.fd else [])]
            per_set: dict[str, list[float]] = {key: [] for key in measures}
            for j in range(args.seed_sets):
                cfg = EvalConfig(per_prompt=args.per_prompt, seed=seed_set_start(args.seed, j), fd=args.fd)
                r, _, _ = evaluate_model(model, cfg, SamplerConfig(), progress=False)
                for key in per_set:
                    per_set[key].append(r[key])
                print(f"{name}, seed set {j}: shapes-geneval {r['geneval']:.3f}", flush=True)
            entry = {key: spread(v) for key, v in per_set.items()}
            entry["per_set"] = per_set
            if lora is not None:
                entry["paired_geneval"] = paired(result["models"]["base"]["per_set"]["geneval"], per_set["geneval"])
            result["models"][name] = entry
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        write_report_json(list(paths.values()), result, "eval_noise", args.overwrite)
    except UserError as e:  # the folder changed during the work
        print(f"error: {e}", file=sys.stderr)
        return 2
    paths["md"].write_text(table(result))
    plot(result, paths["png"])
    print(table(result))
    print(f"wrote {paths['json']}, {paths['md']}, {paths['png']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
