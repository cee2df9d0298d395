"""Diagnostic: what does a model draw for single-object prompts, as the verifier sees it?

For each prompt (default: the three single-object prompts, "a photo of a square" being the test split's one),
samples K images with the evaluation sampler and prints the strict success rate, how the verifier classified
the detected objects (square / circle / triangle / other) and the quartiles of their fill ratio
area / (w·h) — the quantity the verifier thresholds (square ≥ 0.88, circle ≥ 0.66, triangle ≥ 0.35;
``docs/shapes.md``). It tells whether a model's failures are missing objects or shapes drawn just below a
threshold (e.g. squares with rounded corners read as circles). Writes the numbers as JSON with ``--out``; ``--steps/--cfg/--solver``
change the sampler (does a failure come from the sampler or from the model?).

    python scripts/diagnostics/diag_shapes.py --lora runs/dgpo-shapes/final/lora --per-prompt 64
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

import numpy as np


SINGLE_OBJECT = ["a photo of a square", "a photo of a circle", "a photo of a triangle"]
TOOL = "diag_shapes"


def shape_report(images: np.ndarray, prompt: str) -> dict:
    """Success rate, detected-shape histogram and fill-ratio quartiles of ``images`` for ``prompt``."""
    from dgpo.worlds import shapes
    kinds, fills = Counter(), []
    for image in images:
        for obj in shapes.detect(image):
            x0, y0, x1, y1 = obj.bbox
            kinds[obj.shape] += 1
            fills.append(obj.area / ((x1 - x0) * (y1 - y0)))
    return {"prompt": prompt, "images": len(images), "success": float(shapes.score_batch(images, prompt).mean()),
            "detected": dict(kinds), "empty_images": int(sum(not shapes.detect(im) for im in images)),
            "fill_quartiles": [round(float(q), 3) for q in np.percentile(fills, [25, 50, 75])] if fills else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="base pipeline folder (default: the cached embedded shapes base)")
    ap.add_argument("--lora", action="append", default=[], help="LoRA folder(s) to compare with the base (repeatable)")
    ap.add_argument("--prompt", action="append", default=[], help="prompt(s) (default: the three single-object ones)")
    ap.add_argument("--per-prompt", type=int, default=64, help="images per prompt (default 64)")
    ap.add_argument("--seed", type=int, default=1000, help="seed of the first image (default 1000, as evaluation)")
    ap.add_argument("--steps", type=int, default=20, help="sampler steps (default 20, as evaluation)")
    ap.add_argument("--cfg", type=float, default=1.5, help="CFG scale (default 1.5, as evaluation)")
    ap.add_argument("--solver", default="euler", choices=("euler", "dpmpp"), help="ODE solver (default euler, as evaluation)")
    ap.add_argument("--out", default="", help="write the reports as JSON here")
    ap.add_argument("--overwrite", action="store_true", help="replace an --out file this script wrote before")
    args = ap.parse_args(argv)

    from dgpo.cli import load_model, resolve_model
    from dgpo.errors import UserError
    from dgpo.evaluation.evaluate import SamplerConfig, generate
    from dgpo.runtime.output_dir import check_json_output, write_json_output
    from dgpo.worlds import shapes
    prompts = args.prompt or SINGLE_OBJECT
    try:
        if args.out:  # before the work: a file it may not write is refused first
            check_json_output(args.out, TOOL, args.overwrite)
        sampler = SamplerConfig(steps=args.steps, guidance_scale=args.cfg, solver=args.solver)
        for p in prompts:
            shapes.parse(p)
        base = resolve_model(args.model or None)
        models = {"base": load_model(base)} | {lora: load_model(base, lora) for lora in args.lora}
    except (UserError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    reports = []
    for name, model in models.items():
        for prompt in prompts:
            images, _ = generate(model, [prompt], args.per_prompt, sampler, args.seed, progress=False)
            r = {"model": name, **shape_report(images, prompt)}
            reports.append(r)
            print(f"{name}: {prompt!r}: success {r['success']:.3f}, detected {r['detected']}, "
                  f"empty {r['empty_images']}, fill quartiles {r['fill_quartiles']}", flush=True)
    if args.out:
        try:
            write_json_output(args.out, {"reports": reports}, TOOL, args.overwrite)
        except UserError as e:  # the folder changed during the work
            print(f"error: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
