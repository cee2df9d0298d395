"""Benchmark a TDM student against its teacher on the shapes world: quality and speed.

Rows: the teacher at its default steps with CFG, the teacher at each student's step count K (with CFG), and
each student at its K NFE and at the fewer of ``--student-nfe`` (an evenly spaced subset of its trained noise
levels), all on the same test prompts and seeds. Several students (``--lora`` or ``--student`` given more than
once, e.g. students trained at K = 4, 2 and 1) share the teacher's rows and seeds. For each: shapes-geneval
(overall and per category), mean partial score, quality FD, and images per second end to end (text encoding +
sampling + decoding of one batch of ``--batch-size`` images, timed ``--speed-repeats`` times with the rows
interleaved; the median is kept, so the load of a shared machine hits every row alike), with the three pieces timed
separately: the sampling loop's speed-up is what distillation changes, text encoding and decoding cost every row
the same (``dgpo.sampling.speed``).

With ``--seed-sets N`` every row is evaluated on the same N disjoint seed sets: its numbers are the means over
them (± their standard deviation), and its gain is the paired difference against the first row, the teacher, set
by set — what separates a student from its teacher when both move with the seeds alike.

Writes ``NAME.json``, ``NAME.md`` (a markdown table) and ``NAME_grid.png`` (one column per row above,
one row per test prompt, same seed) into ``--out-dir``:

    python scripts/bench_tdm.py --lora runs/tdm-shapes/final/lora
    python scripts/bench_tdm.py --lora RUN/final/lora --per-prompt 64 --seed-sets 4    # the students' benchmark
    python scripts/bench_tdm.py --lora K4/final/lora --lora K2/final/lora --lora K1/final/lora --student-nfe 4,2,1
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="teacher pipeline folder (default: the embedded shapes base)")
    p.add_argument("--lora", action="append", default=[], help="a student's LoRA folder, its sampler.json "
                   "giving its noise levels (default runs/tdm-shapes/final/lora); repeat for several students")
    p.add_argument("--student", action="append", default=[], help="a full student pipeline folder "
                   "(`student.mode=full` writes RUN/final/pipeline; RUN/final/sampler.json gives the noise levels); "
                   "repeatable, and combinable with --lora")
    p.add_argument("--teacher-steps", type=int, default=20, help="teacher's default Euler steps (default 20)")
    p.add_argument("--teacher-cfg", type=float, default=1.5, help="teacher's CFG scale (default 1.5)")
    p.add_argument("--student-nfe", default="4,2,1", help="step counts each student is also sampled at, below its "
                   "own K, comma-separated (default 4,2,1)")
    p.add_argument("--split", choices=["train", "test", "all"], default="test", help="prompts (default test)")
    p.add_argument("--per-prompt", type=int, default=16, help="images per prompt (default 16: ±0.025 noise)")
    p.add_argument("--seed", type=int, default=1000, help="seed of the first image (default 1000)")
    p.add_argument("--seed-sets", type=int, default=1, choices=range(1, 65), metavar="N",
                   help="disjoint seed sets, each of --per-prompt images per prompt (set j starts at seed + j·10⁷; the "
                        "same sets for every row): each row's mean ± std over the sets, and its paired difference "
                        "against the first row (default 1)")
    p.add_argument("--batch-size", type=int, default=64, help="images per sampler batch (default 64)")
    p.add_argument("--speed-repeats", type=int, default=5, choices=range(1, 101), metavar="N", help="timed batches per row, interleaved; images/s is "
                   "batch size / their median (default 5)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, for comparable timings)")
    p.add_argument("--out-dir", default="runs/bench_tdm", help="output folder (default runs/bench_tdm)")
    p.add_argument("--name", default="tdm_shapes_bench", help="output file stem (default tdm_shapes_bench)")
    p.add_argument("--overwrite", action="store_true", help="replace NAME.* written by an earlier run")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from dgpo.cli import load_model, resolve_model
    from dgpo.errors import UserError
    from dgpo.evaluation.evaluate import SamplerConfig, evaluate_images, format_table, generate
    from dgpo.sampling.samples_io import image_grid
    from dgpo.sampling.ode import sample_ode
    from dgpo.sampling.speed import median_breakdown, timed_generation
    from dgpo.worlds import shapes
    from tdm_r1.student import generate_student, sample_student, subset_boundaries
    from dgpo.runtime.metrics import paired, seed_set_start
    from dgpo.runtime.output_dir import check_report_outputs, write_report_json
    try:
        out = Path(args.out_dir)
        paths = {kind: out / f"{args.name}{kind}" for kind in (".json", ".md", "_grid.png")}
        check_report_outputs(paths[".json"], [paths[".md"], paths["_grid.png"]], "bench_tdm", args.overwrite)
        base = resolve_model(args.model)
        teacher = load_model(base)
        if not args.lora and not args.student:
            args.lora = ["runs/tdm-shapes/final/lora"]
        students = [load_lora_student(base, folder) for folder in args.lora]
        students += [load_full_student(folder) for folder in args.student]
        labels = [s["label"] for s in students]
        for i, s in enumerate(students):  # two students from folders of one name: numbered in the table
            if labels.count(s["label"]) > 1:
                s["label"] = f"{s['label']} #{labels[:i + 1].count(s['label'])}"
        nfes = [int(x) for x in args.student_nfe.split(",") if x.strip()]
    except (UserError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    prompts = shapes.prompts(args.split)
    flat = [p for p in prompts for _ in range(args.per_prompt)]

    def teacher_run(steps):
        sampler = SamplerConfig(steps, args.teacher_cfg)
        return lambda ps, n, seed: generate(teacher, ps, n, sampler, seed, args.batch_size, progress=False)[0]

    def teacher_loop(steps):
        return lambda e, x: sample_ode(teacher, e, x, steps, args.teacher_cfg, "euler")

    # name -> (NFE per image, model, generation of the whole set, the bare sampling loop for the timing)
    cfg_factor = 2 if args.teacher_cfg > 1 else 1
    rows = {f"teacher ({args.teacher_steps} steps, CFG {args.teacher_cfg})":
            (args.teacher_steps * cfg_factor, teacher, teacher_run(args.teacher_steps), teacher_loop(args.teacher_steps))}
    for k in sorted({len(s["boundaries"]) for s in students}, reverse=True):
        rows[f"teacher ({k} steps, CFG {args.teacher_cfg})"] = (k * cfg_factor, teacher, teacher_run(k), teacher_loop(k))
    for s in students:
        k, model, label = len(s["boundaries"]), s["model"], s["label"]
        for n in sorted({k, *(n for n in nfes if n < k)}, reverse=True):
            b = subset_boundaries(s["boundaries"], n)
            name = f"TDM student ({n} NFE)" if len(students) == 1 else f"student {label}, K={k} ({n} NFE)"
            rows[name] = (n, model,
                          lambda ps, m, seed, b=b, model=model: generate_student(model, ps, b, m, seed, args.batch_size,
                                                                                 progress=False)[0],
                          lambda e, x, b=b, model=model: sample_student(model, e, x, b))
    results, images_of = {}, {}
    for name, (nfe, _, run, _) in rows.items():
        sets, seconds = [], 0.0
        for j in range(args.seed_sets):
            print(f"sampling {len(flat)} images: {name}, seed set {j} ...", flush=True)
            t0 = time.perf_counter()
            with torch.no_grad():
                images = run(prompts, args.per_prompt, seed_set_start(args.seed, j))
            seconds += time.perf_counter() - t0
            sets.append(evaluate_images(images, flat))
            images_of.setdefault(name, images)  # the grid shows the first set
        r = over_sets(sets)
        r.update(nfe=nfe, seconds=round(seconds, 3))
        results[name] = r
        print(f"{name}: shapes-geneval {r['geneval']:.3f}, FD {r['fd']:.2f}, sharpness {r['sharpness']:.2f}, "
              f"edge width {r['edge_width']:.2f}")
    first = next(iter(results.values()))
    for r in results.values():  # each row against the first (the teacher), seed set by seed set
        r["paired_vs_first"] = paired([s["geneval"] for s in first["sets"]], [s["geneval"] for s in r["sets"]])
        r["fd_ratio_vs_first"] = round(r["fd"] / first["fd"], 3) if first["fd"] else None
    # Speed: one batch of batch_size images (test prompts cycled), timed piece by piece (text encoding,
    # sampling loop, VAE decode; dgpo.sampling.speed) --speed-repeats times with the rows interleaved, median
    # per row — a shared machine's load then hits every row alike.
    speed_prompts = (prompts * (args.batch_size // len(prompts) + 1))[:args.batch_size]
    runs = {name: [] for name in rows}
    with torch.no_grad():
        for name, (_, model, _, loop) in rows.items():  # warm-up (caches the CFG branch's empty prompt)
            timed_generation(model, speed_prompts, args.seed, loop)
        for _ in range(args.speed_repeats):
            for name, (_, model, _, loop) in rows.items():
                runs[name].append(timed_generation(model, speed_prompts, args.seed, loop)[1])
    for name, r in results.items():
        med = median_breakdown(runs[name])
        r["batch_seconds"] = [round(x["total_s"], 4) for x in runs[name]]
        r["breakdown_seconds"] = {key: round(v, 4) for key, v in med.items()}
        r["images_per_second"] = round(args.batch_size / med["total_s"], 2)
        print(f"{name}: {r['images_per_second']:.1f} images/s (median of {args.speed_repeats} batches of "
              f"{args.batch_size}: text {med['text_s']:.3f} s, loop {med['loop_s']:.3f} s, decode {med['decode_s']:.3f} s)")
    ref = next(iter(results.values()))
    for r in results.values():
        r["speedup_vs_teacher"] = round(r["images_per_second"] / ref["images_per_second"], 2)
        r["loop_speedup_vs_teacher"] = round(ref["breakdown_seconds"]["loop_s"] / r["breakdown_seconds"]["loop_s"], 2)

    meta = {"base": str(base), "students": [{k: s[k] for k in ("label", "folder", "kind", "boundaries")} for s in students],
            "split": args.split,
            "per_prompt": args.per_prompt, "seed": args.seed, "seed_sets": args.seed_sets, "batch_size": args.batch_size, "speed_repeats": args.speed_repeats, "threads": args.threads,
            "device": "cuda" if torch.cuda.is_available() else "cpu"}
    try:
        write_report_json(list(paths.values()), {"settings": meta, "results": finite_or_none(results)}, "bench_tdm",
                          args.overwrite)
    except UserError as e:  # the folder changed during the work
        print(f"error: {e}", file=sys.stderr)
        return 2
    speed = ["", f"Speed: one batch of {args.batch_size} images, median of {args.speed_repeats} (seconds: text "
             "encoding, sampling loop, VAE decode).", "",
             "| model | NFE | images/s | speed-up | text s | loop s | decode s | loop speed-up |",
             "|---|---|---|---|---|---|---|---|"]
    speed += [f"| {n} | {r['nfe']} | {r['images_per_second']:.1f} | {r['speedup_vs_teacher']:.1f}× | "
              f"{r['breakdown_seconds']['text_s']:.3f} | {r['breakdown_seconds']['loop_s']:.3f} | "
              f"{r['breakdown_seconds']['decode_s']:.3f} | {r['loop_speedup_vs_teacher']:.1f}× |"
              for n, r in results.items()]
    sets_table = ["", f"Over {args.seed_sets} seed set(s) of {args.per_prompt} images per prompt (mean ± std; the paired "
                  f"difference against the first row, set by set):", "",
                  "| model | shapes-geneval | vs first row (paired) | FD | FD / first row's | sharpness | edge width |",
                  "|---|---|---|---|---|---|---|"]
    def pm(mean: float, std: float, digits: int, sign: str = "") -> str:  # mean ± std (one set: the mean alone)
        return f"{mean:{sign}.{digits}f}" + ("" if math.isnan(std) else f" ± {std:.{digits}f}")
    sets_table += [f"| {n} | {pm(r['geneval'], r['geneval_std'], 3)} | "
                   f"{pm(r['paired_vs_first']['mean'], r['paired_vs_first']['std'], 3, '+')} | "
                   f"{pm(r['fd'], r['fd_std'], 2)} | {r['fd_ratio_vs_first']} | {r['sharpness']:.3f} | "
                   f"{r['edge_width']:.2f} |" for n, r in results.items()]
    table = format_table(results) + "\n" + "\n".join(sets_table) + "\n" + "\n".join(speed) + "\n"
    paths[".md"].write_text(table)
    # Side by side: one row per prompt (first image of each), one column per model.
    shown = np.arange(0, len(flat), args.per_prompt)[:16]
    tiles = np.stack([images_of[n][i] for i in shown for n in results])
    from PIL import Image
    Image.fromarray(image_grid(tiles, columns=len(results))).save(paths["_grid.png"])
    print(table)
    print(f"columns of {paths['_grid.png']}: {list(results)}")
    return 0


def student_label(folder: str) -> str:
    """A student's name in the table: its run folder's (RUN/final/lora or RUN/final/pipeline → RUN), else the folder's."""
    path = Path(folder).resolve()
    return path.parents[1].name if path.parent.name == "final" else path.name


def load_lora_student(base, folder: str) -> dict:
    """A LoRA student on the teacher's pipeline: its model, noise levels (its sampler.json) and label."""
    from dgpo.cli import load_model
    from dgpo.errors import UserError
    if not Path(folder).exists() and (ROOT / folder).exists():  # the default, run from elsewhere
        folder = str(ROOT / folder)
    if not (Path(folder) / "pytorch_lora_weights.safetensors").is_file():
        raise UserError(f"--lora {folder!r} has no pytorch_lora_weights.safetensors: run `tdm-r1 distill` first or "
                        f"pass RUN/final/lora")
    return student_entry(load_model(base, folder), folder, "lora")


def load_full_student(folder: str) -> dict:
    """A fully fine-tuned student: its own pipeline folder (RUN/final/pipeline; RUN/final/sampler.json)."""
    from dgpo.cli import load_model
    from dgpo.errors import UserError
    if not (Path(folder) / "model_index.json").is_file():
        raise UserError(f"--student {folder!r} is not a saved pipeline (no model_index.json): pass "
                        f"RUN/final/pipeline of a `tdm-r1 distill --set student.mode=full` run")
    return student_entry(load_model(folder), folder, "full")


def student_entry(model, folder: str, kind: str) -> dict:
    """A loaded student as the benchmark's rows use it: its model, folder, kind, label and noise levels (its
    sampler.json; without one, the scheduler's 4-step levels)."""
    from tdm_r1.student import default_boundaries, read_sampler_file
    saved = read_sampler_file(folder)
    return {"model": model, "folder": folder, "kind": kind, "label": student_label(folder),
            "boundaries": saved["boundaries"] if saved else default_boundaries(model, 4)}


def finite_or_none(x):
    """``x`` with every NaN or infinite float replaced by None (strict JSON), recursively."""
    if isinstance(x, dict):
        return {k: finite_or_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [finite_or_none(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x


def over_sets(sets: list[dict]) -> dict:
    """One row from its seed sets' evaluations: the mean of shapes-geneval, partial, FD, sharpness, edge width and
    every category over the sets, the standard deviations of shapes-geneval and FD (nan for one set), and the sets themselves."""
    from dgpo.runtime.metrics import spread
    geneval, fd = spread([s["geneval"] for s in sets]), spread([s["fd"] for s in sets])
    categories = sets[0]["per_category"]
    sharp = {k: float(np.mean([s[k] for s in sets])) for k in ("sharpness", "edge_width") if k in sets[0]}
    return {**sets[0], "geneval": geneval["mean"], "geneval_std": geneval["std"], "fd": fd["mean"], "fd_std": fd["std"],
            "partial": float(np.mean([s["partial"] for s in sets])), **sharp,
            "per_category": {c: float(np.mean([s["per_category"][c] for s in sets])) for c in categories},
            "sets": [{k: s[k] for k in ("geneval", "partial", "fd", *sharp, "per_category")} for s in sets]}


if __name__ == "__main__":
    sys.exit(main())
