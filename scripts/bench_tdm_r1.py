"""TDM-R1 benchmark: reinforcing a 4-NFE student, against the alternatives, from one shared student.

From one finished ``tdm-r1 distill`` run (``--student RUN``; its distillation is not counted), every row trains
for the same ``--minutes`` of training wall-clock on the same base (the student's teacher) and reward (the world's
verifier):

* ``r1`` — TDM-R1 on the student with our recipe (``configs/tdm_r1/shapes.yaml``);
* ``r1_released`` — TDM-R1 with the released code's choices (``tdm-r1 train``'s default,
  ``configs/tdm_r1/shapes_released.yaml``, which says where each comes from and where it departs);
* ``dgpo_student`` — DGPO applied directly to the student's weights (``dgpo train`` with ``model.merge_lora`` =
  the student and its own 4-NFE sigmas, CFG 1), its recipe as on the teacher: loss levels σ ≥ 0.57 (t_min 0.4
  before the shift) and KL 1 to the student;
* ``dgpo_student_full`` / ``dgpo_student_full_kl`` — the same over every σ (t_min 0: the student's σ = 0.5 step
  and its last one, where direct RL is said to blur a few-step student), with KL 0 / the recipe's KL 1;
* ``flow_grpo_student`` — Flow-GRPO on the student (``configs/flow_grpo/shapes.yaml``): SDE rollouts through the
  student's 4 steps, every step trained;
* ``dm_dgpo_student`` — the paper's direct-RL baseline, TDM + RL (``r1.reward_source=direct``,
  :mod:`tdm_r1.direct_rl`): the released recipe's distribution matching and CFG update of the student, and beside it
  DGPO's own step on the student with ``configs/dgpo/shapes.yaml``'s keys — no surrogate;
* ``r1_heldout`` — TDM-R1 with the released recipe (the one that gains most), trained on the train prompts of
  every category but ``--heldout``, evaluated on all: does the gain carry over to categories it never trained on?
* ``dgpo_teacher`` — DGPO on the full-length teacher (``configs/dgpo/shapes.yaml``), 20 steps with CFG.

Every row is evaluated on its live weights: the TDM-R1 rows run with ``student.ema_decay=0`` (their recipe's
default evaluates and exports the student's EMA, which lags ~50 iterations at 0.98; the DGPO rows have no EMA);
``--set r1:student.ema_decay=0.98`` restores it. Every model — the student, the teacher and each row's result — is
evaluated on the test prompts at
``--final-per-prompt`` images per prompt with ``--seed-sets`` disjoint seed sets (set j: image k has seed
1000 + j·10,000,000 + k; the same sets for every model), and each row's gain is its *paired* difference against
its start (student or teacher) set by set: mean ± standard deviation over the sets. The sampling loop's time
per image is measured for the teacher (20 steps, CFG) and the student (4 NFE), one batch timed ``--speed-repeats``
times, interleaved, median kept (``dgpo.sampling.speed``).

Resumable: a finished run is read, an interrupted one continues from its newest checkpoint, and every model's
evaluation is stored under ``OUT/bench_tdm_r1/evals/``; run the same command again to continue.
Writes ``bench_tdm_r1.json``, ``bench_tdm_r1.md`` (the table), ``bench_tdm_r1.png`` (curves) and
``bench_tdm_r1_grid.png`` (the same prompts and seeds, a column per model) into ``--out`` (each call rewrites
its own; a file of those names that it did not write is refused, and left as it is):

    tdm-r1 distill --out runs/tdm-shapes                        # the shared student, once
    python scripts/bench_tdm_r1.py --student runs/tdm-shapes --out OUT
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

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
#: image-sharpness measures beside FD (dgpo.worlds.sharpness): blur from direct RL on a few-step student shows here
SHARPNESS = ("sharpness", "edge_width")
#: row → (label, recipe file, what it trains): TDM-R1 rows ("r1", a `tdm-r1 train` recipe) start from the student's
#: TDM run; RL rows ("student" or "teacher", a `dgpo train` recipe with its method) train the student's weights at
#: its own 4 levels, CFG 1, or the 20-step teacher; the last item is the row's own config overrides.
ROWS = {
    "r1": ("TDM-R1 on the student", "configs/tdm_r1/shapes.yaml", "r1", []),
    "r1_released": ("TDM-R1, the released code's recipe", "configs/tdm_r1/shapes_released.yaml", "r1", []),
    "dgpo_student": ("DGPO on the student's weights (σ ≥ 0.57, KL 1)", "configs/dgpo/shapes.yaml", "student", []),
    "dgpo_student_full": ("DGPO on the student, every σ, no KL", "configs/dgpo/shapes.yaml", "student",
                          ["objective.t_min=0", "objective.kl_weight=0"]),
    "dgpo_student_full_kl": ("DGPO on the student, every σ, KL 1", "configs/dgpo/shapes.yaml", "student",
                             ["objective.t_min=0"]),
    "flow_grpo_student": ("Flow-GRPO on the student (its 4 steps)", "configs/flow_grpo/shapes.yaml", "student", []),
    "dm_dgpo_student": ("TDM + DGPO on the student (distribution matching kept beside)",
                        "configs/tdm_r1/shapes_released.yaml", "r1", [
                            # the paper's direct-RL baseline (tdm_r1.direct_rl): the released recipe's TDM update
                            # beside DGPO's own step on the student, its keys those of configs/dgpo/shapes.yaml:
                            # clean samples, u ~ U[0.4, 1] shifted by 2 (σ ≥ 0.57), M = 4, β 100, KL 1 to the
                            # start, per-group std; lr 1e-3 halved for the student LoRA's scale 2 (DGPO's: 1)
                            "r1.reward_source=direct", "surrogate.k_draw=last", "surrogate.t_min=0.57",
                            "surrogate.tau_shift=2", "surrogate.tau_margin=0", "surrogate.draws_per_update=4",
                            "surrogate.beta=100", "surrogate.normalization=group_size", "surrogate.clip_range=0",
                            "surrogate.kl_weight=1", "surrogate.lr=5e-4", "advantage.std=group"]),
    "r1_heldout": ("TDM-R1 (released recipe), held-out categories", "configs/tdm_r1/shapes_released.yaml", "r1", []),
    "dgpo_teacher": ("DGPO on the teacher", "configs/dgpo/shapes.yaml", "teacher", []),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", required=True, help="a finished `tdm-r1 distill` run folder (its final/lora and "
                   "final/lora/sampler.json are the shared starting student)")
    p.add_argument("--r1-config", default=None, help="TDM-R1's recipe for the r1 row (default "
                   "configs/tdm_r1/shapes.yaml, whose student is configs/tdm/shapes.yaml's; a student of "
                   "configs/tdm/shapes_scheduler_levels.yaml takes configs/tdm_r1/shapes_scheduler_levels.yaml); "
                   "r1_released and r1_heldout run configs/tdm_r1/shapes_released.yaml")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows (default all: {','.join(ROWS)})")
    p.add_argument("--minutes", type=float, default=30.0, help="training wall-clock of every row (default 30)")
    p.add_argument("--heldout", default="color_attr,position",
                   help="categories r1_heldout never trains on (default color_attr,position)")
    p.add_argument("--eval-minutes", type=float, default=5.0, help="curve evaluations every N minutes (default 5)")
    p.add_argument("--per-prompt", type=int, default=16, help="images per test prompt of the curves (default 16)")
    p.add_argument("--final-per-prompt", type=int, default=64,
                   help="images per test prompt of each model's final evaluation (default 64)")
    p.add_argument("--seed-sets", type=int, default=4, help="disjoint seed sets of the final evaluations (default 4)")
    p.add_argument("--speed-repeats", type=int, default=5, help="timed batches per model (default 5)")
    p.add_argument("--speed-batch", type=int, default=32, help="images per timed batch (default 32)")
    p.add_argument("--seed", type=int, default=0, help="run seed of every row (default 0)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--set", action="append", default=[], metavar="ROW:KEY=VALUE",
                   help="a config override for one row (repeatable), e.g. r1:surrogate.lr=3e-4")
    p.add_argument("--out", required=True, help="output folder (run folders under OUT/bench_tdm_r1/)")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------- the runs

def run_row(row: str, args, base: Path, student: dict, run_dir: Path, overrides: list[str], log) -> None:
    from dgpo.runtime.run_folder import finish_run, reopen_run, start_run
    _, recipe, trains, own = ROWS[row]
    shared = [f"run.out_dir={run_dir}", f"run.time_budget_min={args.minutes}", f"run.seed={args.seed}",
              f"run.threads={args.threads}", "eval.every=1000000", f"eval.every_minutes={args.eval_minutes}",
              f"eval.per_prompt={args.per_prompt}", "eval.interim_per_prompt=0", *own]
    if trains == "r1":
        from tdm_r1.cli import load_r1_config
        from tdm_r1.reinforce import recipe_of
        if args.r1_config and row == "r1":
            recipe = args.r1_config
        # live weights, as every DGPO row is evaluated (TDM-R1's own default evaluates its student's EMA)
        extra = [f"teacher.base={base}", f"r1.init_run={args.student}", "run.iterations=1000000",
                 "student.ema_decay=0", *shared]
        if row == "r1_heldout":
            extra.append(f"r1.categories={json.dumps(trained_categories(args.heldout))}")
        cfg = load_r1_config(REPO / recipe, [*extra, *overrides])
        finish_run(run_dir, lambda: recipe_of(cfg)(start_run(cfg, "bench_tdm_r1", overwrite=run_dir.exists()), log=log).run(),
                   lambda: recipe_of(cfg)(reopen_run(type(cfg), run_dir), log=log).run(resume=True), log)
        return
    from dgpo.train_config import train_config_class
    from dgpo.trainer import Trainer, load_train_config
    extra = [f"model.base={base}", "run.epochs=1000000", *shared]
    if trains == "student":
        sigmas = json.dumps(student["sigmas"])
        extra += [f"model.merge_lora={student['lora']}", f"rollout.sigmas={sigmas}", "rollout.guidance_scale=1.0",
                  f"eval.sampler.sigmas={sigmas}", "eval.sampler.guidance_scale=1.0"]
    cfg = load_train_config(REPO / recipe, [*extra, *overrides])
    finish_run(run_dir, lambda: Trainer(start_run(cfg, "bench_tdm_r1", overwrite=run_dir.exists()), log=log).run(),
               lambda: Trainer(reopen_run(train_config_class(), run_dir), log=log).run(resume=True), log)


def trained_categories(heldout: str) -> list[str]:
    from dgpo.worlds import shapes
    held = [c for c in heldout.split(",") if c]
    unknown = [c for c in held if c not in shapes.CATEGORIES]
    if unknown:
        raise SystemExit(f"--heldout: {unknown} are not categories; choose from {list(shapes.CATEGORIES)}")
    return [c for c in shapes.CATEGORIES if c not in held]


# ------------------------------------------------------------------------------------------- the models

def models_of(rows: list[str], base: Path, student: dict, runs: Path) -> dict:
    """name → (how to build it, NFE per image, its start's name). A model is built by
    ``build() -> (FlowModel, sample(model, prompts, per_prompt, seed) -> images)``."""
    from dgpo.cli import load_model
    from dgpo.evaluation.evaluate import SamplerConfig, generate
    from tdm_r1.student import generate_student

    def teacher(lora=None):
        return lambda: (load_model(base, lora),
                        lambda m, ps, n, s: generate(m, ps, n, SamplerConfig(), s, progress=False)[0])

    def few_step(lora, extra=None, boundaries=None):
        def build():
            m = load_model(base, lora)
            if extra:
                m.fuse_lora(extra)
            b = boundaries or student["boundaries"]
            return m, lambda mm, ps, n, s: generate_student(mm, ps, b, n, s, progress=False)[0]
        return build

    out = {"teacher": (teacher(), 40, None), "student": (few_step(student["lora"]), len(student["boundaries"]), None)}
    for row in rows:
        lora = runs / row / "final" / "lora"
        trains = ROWS[row][2]
        if trains == "teacher":
            out[row] = (teacher(lora), 40, "teacher")
        elif trains == "student":  # the RL LoRA on top of the merged student
            out[row] = (few_step(student["lora"], extra=lora), len(student["boundaries"]), "student")
        else:
            from tdm_r1.student import read_sampler_file
            saved = read_sampler_file(lora) if lora.exists() else None
            out[row] = (few_step(lora, boundaries=saved["boundaries"] if saved else None),
                        len(student["boundaries"]), "student")
    return out


def evaluate_sets(name: str, build, args, evals_dir: Path, log) -> dict:
    """Every seed set's evaluation of one model (stored, so a rerun reads it)."""
    from dgpo.evaluation.evaluate import evaluate_images
    from dgpo.runtime.metrics import seed_set_start
    from dgpo.worlds import shapes
    path = evals_dir / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    model, sample = build()
    prompts = shapes.prompts("test")
    flat = [p for p in prompts for _ in range(args.final_per_prompt)]
    sets = []
    for j in range(args.seed_sets):
        with torch.no_grad():
            images = sample(model, prompts, args.final_per_prompt, seed_set_start(1000, j))
        r = evaluate_images(images, flat)
        sets.append({k: r[k] for k in ("geneval", "per_category", "partial", "fd", *SHARPNESS) if k in r})
        log(f"{name}, seed set {j}: shapes-geneval {r['geneval']:.3f}, FD {r['fd']:.2f}, sharpness "
            f"{r.get('sharpness', float('nan')):.2f}, edge width {r.get('edge_width', float('nan')):.2f}")
    result = {"sets": sets, "per_prompt": args.final_per_prompt}
    evals_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(path)
    return result


def claim(lock: Path) -> bool:
    """Take ``lock`` for this process (a file holding its pid, created exclusively); False while another live
    process holds it. A lock whose process has died is taken over."""
    import os
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text() or "0")
                os.kill(pid, 0)
                return False  # alive: another process is evaluating this model
            except (ValueError, ProcessLookupError, FileNotFoundError):
                lock.unlink(missing_ok=True)  # its process died: take it over
                continue
            except PermissionError:
                return False
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def evaluate_all(models: dict, args, evals_dir: Path, log, poll_s: float = 30.0) -> dict:
    """Every model's evaluations: read when stored, made when no other process is making them (a lock per
    model under ``evals_dir``), else waited for after the rest — so several bench processes (e.g. one per row)
    can share one OUT and each model is evaluated once."""
    import time
    evals, waiting = {}, list(models)
    while waiting:
        deferred = []
        for name in waiting:
            path, lock = evals_dir / f"{name}.json", evals_dir / f"{name}.lock"
            if path.is_file():
                evals[name] = json.loads(path.read_text())
            elif claim(lock):
                try:
                    evals[name] = evaluate_sets(name, models[name][0], args, evals_dir, log)
                finally:
                    lock.unlink(missing_ok=True)
            else:
                deferred.append(name)
        if deferred and deferred == waiting:
            log(f"waiting for another bench process to evaluate {', '.join(deferred)}")
            time.sleep(poll_s)
        waiting = deferred
    return {n: evals[n] for n in models}


def draw_grid(models: dict, path: Path, prompts_shown: int = 8, seed: int = 1000) -> None:
    """A column per model, a row per test prompt (its first ``prompts_shown``), the same seeds for every model:
    drawn afresh each time, so a rerun that reads every evaluation back still writes it."""
    from PIL import Image
    from dgpo.sampling.samples_io import image_grid
    from dgpo.worlds import shapes
    prompts = shapes.prompts("test")[:prompts_shown]
    columns = []
    for name, (build, _, _) in models.items():
        model, sample = build()
        with torch.no_grad():
            columns.append(sample(model, prompts, 1, seed))
    tiles = np.stack([col[i] for i in range(len(prompts)) for col in columns])
    Image.fromarray(image_grid(tiles, columns=len(columns))).save(path)
    print(f"columns of {path}: {list(models)}")


def loop_seconds(teacher_build, student_build, boundaries: list[float], args) -> dict:
    """Median seconds of the sampling loop per image of the teacher (20 Euler steps, CFG 1.5) and the student
    (its K steps, no CFG): one batch each, the two interleaved ``--speed-repeats`` times."""
    from dgpo.sampling.ode import sample_ode
    from dgpo.sampling.speed import median_breakdown, timed_generation
    from dgpo.worlds import shapes
    from tdm_r1.student import sample_student
    prompts = (shapes.prompts("test") * args.speed_batch)[:args.speed_batch]
    teacher, student = teacher_build()[0], student_build()[0]
    loops = {"teacher": (teacher, lambda e, x: sample_ode(teacher, e, x, 20, 1.5, "euler")),
             "student": (student, lambda e, x: sample_student(student, e, x, boundaries))}
    runs = {name: [] for name in loops}
    with torch.no_grad():
        for model, loop in loops.values():  # warm-up
            timed_generation(model, prompts, 0, loop)
        for _ in range(args.speed_repeats):
            for name, (model, loop) in loops.items():
                runs[name].append(timed_generation(model, prompts, 0, loop)[1])
    return {name: median_breakdown(r)["loop_s"] / args.speed_batch for name, r in runs.items()}


# ------------------------------------------------------------------------------------------- the report

def summarise(evals: dict[str, dict], starts: dict[str, str | None], heldout: list[str]) -> dict:
    """Per model: mean ± std over seed sets of shapes-geneval, FD, sharpness and edge width (the last two where
    every set has them: evaluations stored before they existed do not); per trained model the paired gain against
    its start, its FD and sharpness as ratios to its start's (and, for r1_heldout, the paired gain on the held-out
    categories alone)."""
    from dgpo.runtime.metrics import paired, spread
    out = {}
    for name, e in evals.items():
        g = [s["geneval"] for s in e["sets"]]
        row = {"geneval": spread(g), "fd": spread([s["fd"] for s in e["sets"]]), "start": starts.get(name)}
        row.update({k: spread([s[k] for s in e["sets"]]) for k in SHARPNESS if all(k in s for s in e["sets"])})
        start = starts.get(name)
        if start and start in evals:
            row["gain"] = paired([s["geneval"] for s in evals[start]["sets"]], g)
            row["fd_ratio"] = row["fd"]["mean"] / spread([s["fd"] for s in evals[start]["sets"]])["mean"]
            for k in SHARPNESS:
                if k in row and all(k in s for s in evals[start]["sets"]):
                    row[f"{k}_ratio"] = row[k]["mean"] / spread([s[k] for s in evals[start]["sets"]])["mean"]
            if name == "r1_heldout" and heldout:
                held = lambda sets: [float(np.mean([s["per_category"][c] for c in heldout])) for s in sets]
                row["heldout_gain"] = paired(held(evals[start]["sets"]), held(e["sets"]))
        out[name] = row
    return out


def markdown(summary: dict, loop_s: dict, meta: dict) -> str:
    lines = [f"{meta['seed_sets']} seed sets × {meta['final_per_prompt']} images per test prompt; mean ± std over "
             f"the sets; gain = the paired difference against the start, set by set. {meta['minutes']:g} minutes of "
             "training per row.", "",
             "| model | NFE | shapes-geneval | gain vs start | FD | FD / start's | sharpness (/ start's) | "
             "edge width (/ start's) | loop s per image |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in summary.items():
        gain = f"{r['gain']['mean']:+.3f} ± {r['gain']['std']:.3f}" if "gain" in r else "-"
        if "heldout_gain" in r:
            gain += f" (held-out categories {r['heldout_gain']['mean']:+.3f} ± {r['heldout_gain']['std']:.3f})"
        ratio = f"{r['fd_ratio']:.2f}" if "fd_ratio" in r else "-"
        loop = loop_s.get(name) or loop_s.get(r["start"] or "")
        sharp = [f"{r[k]['mean']:.3f}" + (f" ({r[k + '_ratio']:.2f})" if k + "_ratio" in r else "") if k in r else "-"
                 for k in SHARPNESS]
        lines.append(f"| {ROWS[name][0] if name in ROWS else name} | {meta['nfe'][name]} | {r['geneval']['mean']:.3f} ± "
                     f"{r['geneval']['std']:.3f} | {gain} | {r['fd']['mean']:.2f} | {ratio} | "
                     f"{sharp[0]} | {sharp[1]} | {'-' if loop is None else f'{loop:.4f}'} |")
    if "teacher" in loop_s and "student" in loop_s:
        lines += ["", f"Sampling loop: the student takes {loop_s['teacher'] / loop_s['student']:.1f}× less time per "
                  "image than the teacher at 20 steps with CFG."]
    return "\n".join(lines) + "\n"


def plot_curves(runs: Path, rows: list[str], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from dgpo.runtime.metrics import read_metrics
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for row in rows:
        evals = [r for r in read_metrics(runs / row / "metrics.jsonl") if "eval_geneval" in r]
        if evals:
            ax.plot([r["train_seconds"] / 60 for r in evals], [r["eval_geneval"] for r in evals], "o-",
                    markersize=3, label=ROWS[row][0])
    ax.set(xlabel="training wall-clock (min)", ylabel="test shapes-geneval (curve protocol)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from dgpo.errors import UserError
    from dgpo.runtime.output_dir import check_report_outputs, report_files, write_report_json
    from dgpo.runtime.run_folder import read_run_config
    from tdm_r1.config import DistillConfig
    from tdm_r1.distill import resolve_teacher
    from tdm_r1.student import read_sampler_file
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        print(f"error: --rows: {unknown} are not rows; choose from {list(ROWS)}", file=sys.stderr)
        return 2
    per_row: dict[str, list[str]] = {r: [] for r in rows}
    for item in args.set:
        row, _, rest = item.partition(":")
        if row not in per_row or "=" not in rest:
            print(f"error: --set {item!r}: expected ROW:KEY=VALUE with ROW one of {rows}", file=sys.stderr)
            return 2
        per_row[row].append(rest)
    out = Path(args.out)
    runs = out / "bench_tdm_r1"
    report = report_files(out, "bench_tdm_r1", (".json", ".md", ".png", "_grid.png"))
    heldout = [c for c in args.heldout.split(",") if c] if "r1_heldout" in rows else []
    try:
        # its own report is rewritten on every call (the benchmark resumes); a file it did not write, never
        check_report_outputs(report[0], report[1:], "bench_tdm_r1", overwrite=True, flag="--out")
        lora = Path(args.student) / "final" / "lora"
        saved = read_sampler_file(lora) if lora.is_dir() else None
        if saved is None:
            raise UserError(f"--student {args.student!r}: no final/lora with sampler.json; pass a finished "
                            f"`tdm-r1 distill` run folder")
        student = {"lora": str(lora), "boundaries": saved["boundaries"], "sigmas": saved["sigmas"]}
        base = resolve_teacher(read_run_config(DistillConfig, args.student))  # the student's teacher: every row's base
        if heldout:
            trained_categories(args.heldout)
        for row in rows:
            run_row(row, args, base, student, runs / row, per_row[row], print)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    models = models_of(rows, base, student, runs)
    evals = evaluate_all(models, args, runs / "evals", print)
    starts = {name: start for name, (_, _, start) in models.items()}
    summary = summarise(evals, starts, heldout)
    loop_s = loop_seconds(models["teacher"][0], models["student"][0], student["boundaries"], args)
    meta = {"student": args.student, "base": str(base), "rows": rows, "minutes": args.minutes, "heldout": heldout,
            "seed_sets": args.seed_sets, "final_per_prompt": args.final_per_prompt, "per_prompt": args.per_prompt,
            "eval_minutes": args.eval_minutes, "seed": args.seed, "set": args.set,
            "nfe": {name: nfe for name, (_, nfe, _) in models.items()}, "threads": args.threads}
    try:
        write_report_json(report, {"settings": meta, "summary": summary, "loop_seconds": loop_s,
                                   "evaluations": evals}, "bench_tdm_r1", overwrite=True, flag="--out")
    except UserError as e:  # the folder changed while it trained
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = markdown(summary, loop_s, meta)
    report[1].write_text(table)
    plot_curves(runs, rows, report[2])
    draw_grid(models, report[3])
    print(table)
    print(f"wrote {out / 'bench_tdm_r1.json'}, {out / 'bench_tdm_r1.md'}, {out / 'bench_tdm_r1.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
