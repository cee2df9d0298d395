"""What does each model draw for the same prompts and seeds? One labelled picture, a row per model.

Each ``--row NAME=FOLDER`` is a samples folder written by ``dgpo sample`` or ``tdm-r1 sample`` (``samples.jsonl``
beside the PNGs); every folder must hold the same prompts with the same seeds, in the same order, so a
column is one prompt and one initial noise drawn by every model. The first image of each of the first
``--columns`` prompts is shown, enlarged ``--scale`` times, with the prompt over its column.

Writes ``side_by_side.png`` and ``side_by_side.json`` (rows, folders, prompts, seeds) into ``--out``:

    dgpo sample --world shapes --split test --out S/base
    dgpo sample --world shapes --split test --lora runs/dgpo-shapes/final/lora --out S/dgpo
    tdm-r1 sample --lora runs/tdm-shapes/final/lora --nfe 4 --split test --out S/student
    python scripts/side_by_side.py --row base=S/base --row DGPO=S/dgpo --row "4-NFE student=S/student" --out S/grid
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from dgpo.errors import UserError


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--row", action="append", default=[], metavar="NAME=FOLDER", required=True,
                   help="a row: its label and a samples folder (repeatable, top to bottom)")
    p.add_argument("--out", required=True, help="output folder (new or empty; --overwrite replaces this script's files)")
    p.add_argument("--overwrite", action="store_true", help="replace what this script wrote at --out before")
    p.add_argument("--columns", type=int, default=8, help="prompts shown (default 8)")
    p.add_argument("--scale", type=int, default=4, help="enlargement of each image (default 4)")
    return p.parse_args(argv)


def first_image_per_prompt(folder: str, columns: int) -> tuple[np.ndarray, list[dict]]:
    """The first image of each of the first ``columns`` prompts of a samples folder, with their records."""
    from dgpo.sampling.samples_io import read_samples
    images, records = read_samples(folder)
    seen, keep = set(), []
    for i, rec in enumerate(records):
        if rec["prompt"] not in seen:
            seen.add(rec["prompt"])
            keep.append(i)
    keep = keep[:columns]
    return images[keep], [records[i] for i in keep]


def compose(rows: list[tuple[str, np.ndarray]], prompts: list[str], scale: int):
    """A PIL image: a label column on the left, a prompt line over each column, the images enlarged."""
    from PIL import Image, ImageDraw, ImageFont
    font = ImageFont.load_default()
    size = rows[0][1].shape[1] * scale
    pad, label_w, head_h = 4, 120, 28
    width = label_w + len(prompts) * (size + pad) + pad
    height = head_h + len(rows) * (size + pad) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, prompt in enumerate(prompts):
        words = prompt.removeprefix("a photo of ").split()
        half = (len(words) + 1) // 2
        x = label_w + c * (size + pad) + pad
        draw.text((x, 2), " ".join(words[:half]), fill=(0, 0, 0), font=font)
        draw.text((x, 14), " ".join(words[half:]), fill=(0, 0, 0), font=font)
    for r, (name, images) in enumerate(rows):
        y = head_h + r * (size + pad) + pad
        draw.text((4, y + size // 2 - 6), name, fill=(0, 0, 0), font=font)
        for c, im in enumerate(images):
            big = Image.fromarray(im).resize((size, size), Image.NEAREST)
            canvas.paste(big, (label_w + c * (size + pad) + pad, y))
    return canvas


def main(argv=None) -> int:
    from dgpo.runtime.output_dir import atomic_output_dir
    args = parse_args(argv)
    try:
        if args.columns < 1 or args.scale < 1:
            raise UserError(f"--columns and --scale must be at least 1, got {args.columns} and {args.scale}")
        rows, reference = [], None
        for spec in args.row:
            name, sep, folder = spec.partition("=")
            if not sep or not name or not folder:
                raise UserError(f"--row {spec!r}: expected NAME=FOLDER, e.g. --row base=samples/base")
            images, records = first_image_per_prompt(folder, args.columns)
            shown = [(r["prompt"], r.get("seed")) for r in records]
            if reference is None:
                reference = shown
            elif shown != reference:
                raise UserError(f"--row {name}: {folder!r} does not hold the same prompts and seeds as the first row "
                                f"(sample every model with the same --split/--prompts, --seed and --per-prompt)")
            rows.append((name, images, folder))
        picture = compose([(n, im) for n, im, _ in rows], [p for p, _ in reference], args.scale)
        with atomic_output_dir(args.out, "side_by_side.py", args.overwrite) as tmp:
            picture.save(tmp / "side_by_side.png")
            (tmp / "side_by_side.json").write_text(json.dumps(
                {"rows": [{"name": n, "folder": str(f)} for n, _, f in rows],
                 "columns": [{"prompt": p, "seed": s} for p, s in reference]}, indent=2))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {Path(args.out) / 'side_by_side.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
