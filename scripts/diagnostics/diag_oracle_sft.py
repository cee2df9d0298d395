"""Diagnostic: how far does the DGPO adapter move the base when it is shown *perfect* samples?

A reference point for the RL demo. DGPO learns through the flow-matching error of a LoRA adapter on the
policy's own samples, weighted by their advantages; the best any reward could do is to show it only correct
images. This script trains the same adapter (rank, targets, AdamW, lr) by plain supervised flow matching on
fresh renders of the *train* prompts — the verifier's ground truth, each render scoring 1.0 — for a wall-clock
budget, then saves it in the diffusers LoRA format for ``dgpo eval``:

    L(θ) = E_{x₀ ~ renders(c), ε, σ} ‖(ε − x₀) − v_θ(x_σ, σ, c)‖²,   x_σ = (1 − σ)·x₀ + σ·ε   (SD3 Eq. 2),

σ from the base's logit-normal density on its shifted schedule, as in pretraining. It would bound what a reward can
teach if the limit were the quality of the signal; measured, it is no bound: DGPO, reweighting the model towards
its own successes, lifts the test score more than perfect renders do
(``docs/experiments/what-limits-dgpo-on-shapes.md``). With ``--full``
the whole transformer and both text encoders train instead (no adapter): whether the *architecture* can learn
what the renders show at all, e.g. the relation words of the position prompts (``--category position``).

    python scripts/diagnostics/diag_oracle_sft.py --model BASE --minutes 30 --out OUT   # then
    dgpo eval --model BASE --lora OUT/lora --per-prompt 32
    python scripts/diagnostics/diag_oracle_sft.py --model BASE --full --lr 1e-4 --category position --minutes 15 --out OUT2
    python scripts/diagnostics/diag_relations.py --model OUT2/pipeline --category position
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np



def render_batch(prompts: list[str], size: int, n: int, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """n fresh renders (n, S, S, 3) of prompts drawn uniformly from ``prompts``, and their prompts."""
    from dgpo.worlds import shapes
    chosen = [prompts[i] for i in rng.integers(len(prompts), size=n)]
    return np.stack([shapes.render(p, size=size, seed=int(s)) for p, s in zip(chosen, rng.integers(1 << 30, size=n))]), chosen


def flow_matching_loss(model, images: np.ndarray, prompts: list[str], gen, text_grad: bool = False):
    """‖(ε − x₀) − v_θ(x_σ, σ, c)‖² averaged over the batch, σ from the base's logit-normal density (shifted);
    ``text_grad`` lets the gradient reach the text encoders (full fine-tuning)."""
    import torch
    from dgpo.models.handle import flow_interpolate
    from dgpo.worlds.shapes_base.pretrain import FlowTrainConfig, sample_sigmas
    with torch.no_grad():
        x0 = model.encode_images(images)
    with torch.set_grad_enabled(text_grad):
        embeds = model.encode_prompts(prompts)
    noise = torch.randn(x0.shape, generator=gen)
    sigma = sample_sigmas(len(x0), FlowTrainConfig(), model.pipe.scheduler.config.shift, gen)
    v = model.velocity(flow_interpolate(x0, noise, sigma), sigma, embeds)
    return torch.nn.functional.mse_loss(v, noise - x0)


def train_on_renders(model, params, prompts: list[str], lr: float, batch: int, seconds: float, max_steps: int,
                     seed: int, text_grad: bool = False) -> list[dict]:
    """AdamW on :func:`flow_matching_loss` over fresh renders until ``seconds`` or ``max_steps`` (0 = no limit)
    run out; returns the loss curve (step, seconds, loss)."""
    import torch
    from tqdm import tqdm
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen, rng = torch.Generator().manual_seed(seed), np.random.default_rng(seed)
    modules = [model.transformer] + ([model.pipe.text_encoder, model.pipe.text_encoder_2] if text_grad else [])
    for m in modules:
        m.train()
    curve, start = [], time.perf_counter()
    bar = tqdm(desc="oracle SFT on renders", unit="step")
    while time.perf_counter() - start < seconds and (max_steps <= 0 or len(curve) < max_steps):
        images, chosen = render_batch(prompts, model.image_size, batch, rng)
        loss = flow_matching_loss(model, images, chosen, gen, text_grad)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        curve.append({"step": len(curve) + 1, "seconds": round(time.perf_counter() - start, 2), "loss": loss.item()})
        bar.update()
        bar.set_postfix(loss=f"{np.mean([c['loss'] for c in curve[-50:]]):.4f}")
    bar.close()
    for m in modules:
        m.eval()
    return curve


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="base pipeline folder (default: the cached embedded shapes base)")
    ap.add_argument("--minutes", type=float, default=30.0, help="training wall-clock budget (default 30)")
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many steps too (default 0: no limit)")
    ap.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3, as DGPO)")
    ap.add_argument("--lora-rank", type=int, default=16, help="LoRA rank (default 16, as DGPO)")
    ap.add_argument("--lora-targets", default="attention", choices=("attention", "attention_ff"),
                    help="layers with adapters (default attention, as DGPO)")
    ap.add_argument("--full", action="store_true",
                    help="train the whole transformer and both text encoders instead of an adapter; writes the "
                         "pipeline to OUT/pipeline (use --lr 1e-4, the pretraining's final rate)")
    ap.add_argument("--batch", type=int, default=64, help="renders per step (default 64 = DGPO's P x G)")
    ap.add_argument("--category", default="", help="train only on this category's train prompts (default: all)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0, help="seed of renders, noise and σ (default 0)")
    ap.add_argument("--out", required=True,
                    help="output folder (must not exist): lora/ (diffusers format) or pipeline/ (--full), curve.json")
    args = ap.parse_args(argv)

    import torch

    from dgpo.cli import load_model, resolve_model
    from dgpo.errors import UserError
    from dgpo.models.lora import LORA_TARGETS, add_lora, save_lora_diffusers
    from dgpo.worlds import shapes

    out = Path(args.out)
    if out.exists():
        print(f"error: {out} exists; pass a new --out folder", file=sys.stderr)
        return 2
    prompts = shapes.prompts("train")
    if args.category:
        if args.category not in shapes.CATEGORIES:
            print(f"error: unknown --category {args.category!r}; one of {', '.join(shapes.CATEGORIES)}",
                  file=sys.stderr)
            return 2
        prompts = [p for p in prompts if shapes.category(p) == args.category]
    try:
        base = resolve_model(args.model or None)
        model = load_model(base)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.full:
        modules = (model.transformer, model.pipe.text_encoder, model.pipe.text_encoder_2)
        params = [p for m in modules for p in m.parameters()]
        for p in params:
            p.requires_grad_(True)
    else:
        params = add_lora(model.transformer, rank=args.lora_rank, target_modules=LORA_TARGETS[args.lora_targets])
    curve = train_on_renders(model, params, prompts, args.lr, args.batch, args.minutes * 60, args.max_steps, args.seed,
                             text_grad=args.full)
    out.mkdir(parents=True)
    if args.full:
        model.pipe.save_pretrained(str(out / "pipeline"), safe_serialization=True)
        if (base / "pretrain_config.yaml").is_file():  # records the base's T5 token count for load_model
            shutil.copy(base / "pretrain_config.yaml", out / "pipeline")
        written = out / "pipeline"
    else:
        written = save_lora_diffusers(model.transformer, out / "lora")
    (out / "curve.json").write_text(json.dumps({"args": vars(args), "prompts": len(prompts), "curve": curve}))
    first, last = (np.mean([c["loss"] for c in part]) for part in (curve[:50], curve[-50:]))
    print(f"{len(curve)} steps in {curve[-1]['seconds'] / 60:.1f} min; loss, first / last 50 steps: {first:.4f} / "
          f"{last:.4f}; wrote {written}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
