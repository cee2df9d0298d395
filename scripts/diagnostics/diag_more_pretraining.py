"""Diagnostic: does more flow-matching pretraining make the base draw what RL cannot teach it (sharp squares)?

Continues the flow-matching stage of the cached embedded base (`dgpo pretrain`'s stage 2, same data, recipe and
loss: :func:`dgpo.worlds.shapes_base.pretrain.train_flow`) for ``--steps`` more steps at ``--lr`` (warm-up + cosine) and saves
the result as a separate pipeline folder; the cached base is not touched. Then compare, e.g.::

    python scripts/diagnostics/diag_more_pretraining.py --steps 2000 --out runs/base-plus2000
    python scripts/diagnostics/diag_shapes.py --model runs/base-plus2000
    dgpo eval --model runs/base-plus2000 --per-prompt 64

A diagnostic of what caps DGPO on the shapes world (is the base's fidelity the cap?
``docs/experiments/what-limits-dgpo-on-shapes.md``), not a way to make a base: a base is made by
`dgpo pretrain` from its config.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch



def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000, help="extra flow-matching steps (default 2000)")
    ap.add_argument("--lr", type=float, default=3e-4, help="peak learning rate of the transformer (default 3e-4)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--out", required=True, help="folder for the continued pipeline (must not exist)")
    args = ap.parse_args(argv)
    if Path(args.out).exists():
        print(f"error: --out {args.out!r} exists: pick a new folder", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)

    from dgpo.cli import load_base_config
    from dgpo.models.handle import SD3Model, load_pipeline
    from dgpo.worlds.shapes_base.pretrain import encode_pool, ensure_base, render_pool, train_flow
    cfg = load_base_config()
    base = ensure_base(cfg)
    pipe = load_pipeline(base)
    model = SD3Model(pipe, max_sequence_length=cfg.model.t5_tokens)
    images, prompt_list, prompt_idx = render_pool(cfg)
    with torch.no_grad():
        latents = (encode_pool(pipe.vae, images) - (pipe.vae.config.shift_factor or 0.0)) * pipe.vae.config.scaling_factor
    flow = dataclasses.replace(cfg.flow, steps=args.steps, lr=args.lr, text_lr=cfg.flow.text_lr * args.lr / cfg.flow.lr)
    gen = torch.Generator().manual_seed(cfg.seed + 1)  # fresh batches, not a replay of the first stage's
    losses = train_flow(model, latents, prompt_list, prompt_idx, flow, cfg.model.shift, gen)
    pipe.save_pretrained(args.out)
    for name in ("pretrain_config.yaml", "USAGE.md"):
        if (base / name).is_file():
            (Path(args.out) / name).write_text((base / name).read_text())
    k = min(100, len(losses))
    print(f"{args.steps} more steps: loss {sum(losses[:k]) / k:.4f} (first {k}) -> "
          f"{sum(losses[-k:]) / k:.4f} (last {k}); saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
