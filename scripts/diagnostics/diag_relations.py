"""Diagnostic: does a model fail two-object prompts by leaving an object out, or by relating them wrongly?

For position prompts ("a photo of a A left of a B") and colour-attribution prompts ("a photo of a red A and a
blue B"), samples K images per prompt with the evaluation sampler and splits the strict score into
- presence: the fraction of images with at least one A and one B (any colours), and
- relation (position: some A and B in the prompt's relation; colour attribution: some A in colour 1 and some B
  in colour 2), as a fraction of the images where both are present — the conditional that tells whether the
  model knows what the relation word means.
For calibration it also reports how often each relation holds by chance between the two objects of renders of
the two-object prompts (random layouts): a relation conditional at that level means the model ignores the word.
Reports train and test prompts separately, as JSON with ``--out``.

    python scripts/diagnostics/diag_relations.py --model BASE --lora RUN/final/lora --per-prompt 32 --out OUT.json
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


CATEGORIES = ("position", "color_attr")
TOOL = "diag_relations"


def relation_report(images: np.ndarray, prompt: str) -> dict:
    """Presence of both named shapes, the relation's rate given presence, and the strict score of ``images``."""
    from dgpo.worlds import shapes
    parsed = shapes.parse(prompt)
    if parsed.category not in CATEGORIES:
        raise ValueError(f"{prompt!r} is a {parsed.category} prompt; this diagnostic reads {' and '.join(CATEGORIES)}")
    present = related = 0
    for image in images:
        objects = shapes.detect(image)
        a, b = ([o for o in objects if o.shape == s] for s in parsed.shapes)
        if not (a and b):
            continue
        present += 1
        if parsed.category == "position":
            related += any(shapes.relation_holds(x, y, parsed.relation, image.shape[0]) for x in a for y in b)
        else:
            related += all(any(o.color == c for o in group) for group, c in zip((a, b), parsed.colors))
    return {"prompt": prompt, "category": parsed.category, "images": len(images), "both_present": present / len(images),
            "relation_given_both": related / present if present else None,
            "strict": float(shapes.score_batch(images, prompt).mean())}


def chance_relations(renders_per_prompt: int = 100, size: int = 32) -> dict[str, float]:
    """How often "A {relation} B" holds between the objects of two-object renders (layouts are random)."""
    from dgpo.worlds import shapes
    relations = ("left of", "right of", "above", "below")
    hits, n = dict.fromkeys(relations, 0), 0
    for prompt in shapes.prompts("all"):
        if shapes.category(prompt) != "two_object":
            continue
        parsed = shapes.parse(prompt)
        for seed in range(renders_per_prompt):
            objects = shapes.detect(shapes.render(prompt, size, seed))
            a, b = ([o for o in objects if o.shape == s] for s in parsed.shapes)
            n += 1
            for r in relations:
                hits[r] += any(shapes.relation_holds(x, y, r, size) for x in a for y in b)
    return {r: h / n for r, h in hits.items()}


def summarise(reports: list[dict]) -> dict:
    """Means of presence, relation-given-presence and strict score over a list of per-prompt reports."""
    cond = [r["relation_given_both"] for r in reports if r["relation_given_both"] is not None]
    return {"prompts": len(reports), "both_present": float(np.mean([r["both_present"] for r in reports])),
            "relation_given_both": float(np.mean(cond)) if cond else None,
            "strict": float(np.mean([r["strict"] for r in reports]))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="base pipeline folder (default: the cached embedded shapes base)")
    ap.add_argument("--lora", action="append", default=[], help="LoRA folder(s) to compare with the base (repeatable)")
    ap.add_argument("--category", action="append", choices=CATEGORIES, default=[],
                    help="prompt categories to read (default: both)")
    ap.add_argument("--per-prompt", type=int, default=32, help="images per prompt (default 32)")
    ap.add_argument("--seed", type=int, default=1000, help="seed of the first image (default 1000, as evaluation)")
    ap.add_argument("--cfg", type=float, default=1.5, help="CFG scale (default 1.5, as evaluation)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", default="", help="write the per-prompt reports and summaries as JSON here")
    ap.add_argument("--overwrite", action="store_true", help="replace an --out file this script wrote before")
    args = ap.parse_args(argv)

    import torch

    from dgpo.cli import load_model, resolve_model
    from dgpo.errors import UserError
    from dgpo.evaluation.evaluate import SamplerConfig, generate
    from dgpo.runtime.output_dir import check_json_output, write_json_output
    from dgpo.worlds import shapes
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.out:  # before the work: a file it may not write is refused first
            check_json_output(args.out, TOOL, args.overwrite)
        base = resolve_model(args.model or None)
        models = {"base": load_model(base)} | {lora: load_model(base, lora) for lora in args.lora}
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sampler = SamplerConfig(steps=20, guidance_scale=args.cfg, solver="euler")
    test = set(shapes.prompts("test"))
    chance = chance_relations()
    print("chance that a relation holds between two randomly placed objects:",
          ", ".join(f"{r} {p:.2f}" for r, p in chance.items()), flush=True)
    reports, summaries = [], []
    for name, model in models.items():
        for category in args.category or CATEGORIES:
            for prompt in (p for p in shapes.prompts("all") if shapes.category(p) == category):
                images, _ = generate(model, [prompt], args.per_prompt, sampler, args.seed, progress=False)
                reports.append({"model": name, "split": "test" if prompt in test else "train",
                                **relation_report(images, prompt)})
            for split in ("train", "test"):
                s = summarise([r for r in reports if (r["model"], r["category"], r["split"]) == (name, category, split)])
                summaries.append({"model": name, "category": category, "split": split, **s})
                rel = "–" if s["relation_given_both"] is None else f"{s['relation_given_both']:.3f}"
                print(f"{name}: {category} ({split}, {s['prompts']} prompts): both present {s['both_present']:.3f}, "
                      f"relation given both {rel}, strict {s['strict']:.3f}", flush=True)
    if args.out:
        try:
            write_json_output(args.out, {"chance": chance, "summaries": summaries, "reports": reports}, TOOL,
                              args.overwrite)
        except UserError as e:  # the folder changed during the work
            print(f"error: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
