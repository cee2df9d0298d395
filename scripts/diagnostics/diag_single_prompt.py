"""Diagnostic: can an update rule raise ONE prompt's success rate from the model's own samples?

Drives the project's own :class:`dgpo.trainer.Trainer` on a single prompt (every group of every epoch is that
prompt) and prints the training success rate, averaged over blocks of epochs. Two update rules:

* ``--mode dgpo``: the trainer's configured objective (``configs/dgpo/shapes.yaml`` + ``--set``);
* ``--mode raft``: supervised flow matching on the epoch's successful samples only (reward > 0.5), σ from
  the shifted schedule above ``--t-min`` — "fine-tune on your own best samples", the simplest baseline.

Example (``docs/experiments/what-limits-dgpo-on-shapes.md``)::

    python scripts/diagnostics/diag_single_prompt.py --prompt "a photo of a red circle and a green triangle" --mode raft
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch



def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", default="a photo of a red circle and a green triangle", help="the one prompt")
    ap.add_argument("--mode", choices=("dgpo", "raft"), default="dgpo", help="update rule (see above)")
    ap.add_argument("--epochs", type=int, default=80, help="epochs (default 80)")
    ap.add_argument("--groups", type=int, default=2, help="groups of the prompt per epoch (default 2)")
    ap.add_argument("--group-size", type=int, default=16, help="G (default 16)")
    ap.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    ap.add_argument("--t-min", type=float, default=0.4, help="raft: lowest σ before the shift (default 0.4)")
    ap.add_argument("--levels", type=int, default=4, help="raft: noise levels per sample per step (default 4)")
    ap.add_argument("--every", type=int, default=10, help="print the mean success of every N epochs")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="trainer config override")
    ap.add_argument("--out", default="runs/diag-single-prompt", help="scratch run folder")
    args = ap.parse_args(argv)

    from dgpo.models.handle import flow_interpolate
    from dgpo.worlds.registry import make_world, register_world

    class SinglePromptWorld:
        """The shapes world reduced to one prompt, for training and testing alike."""

        name, metric = "single_prompt", "shapes-geneval"

        def __init__(self, prompt):
            self.prompt, self.shapes = prompt, make_world("shapes")

        def prompts(self, split):
            return [self.prompt]

        def check_prompts(self, prompts):
            self.shapes.check_prompts(prompts)

        def score(self, images, prompts, fd=True):
            return self.shapes.score(images, prompts, fd)

    from dgpo.sampling.ode import shift_sigmas
    from dgpo.trainer import Trainer, load_train_config
    from dgpo.worlds import shapes

    try:
        shapes.parse(args.prompt)
    except ValueError as e:
        raise SystemExit(f"--prompt: {e}") from None
    register_world("single_prompt", lambda: SinglePromptWorld(args.prompt))  # P groups of the one prompt
    cfg = load_train_config(None, ["world=single_prompt", f"rollout.prompts_per_epoch={args.groups}",
                                   f"rollout.group_size={args.group_size}", "reward.name=shapes_strict",
                                   f"optim.lr={args.lr}", f"run.out_dir={args.out}", *args.set])
    trainer = Trainer(cfg, log=lambda *a: None)
    Path(args.out).mkdir(parents=True, exist_ok=True)

    success = []
    for epoch in range(1, args.epochs + 1):
        if args.mode == "dgpo":
            success.append(trainer.epoch()["reward"])
        else:
            latents, images, embeds, flat, _ = trainer.rollout([args.prompt] * args.groups)
            rewards = trainer.score(images, flat)
            success.append(rewards.mean().item())
            good = (rewards > 0.5).nonzero().flatten()
            if len(good):
                x0 = latents[good]
                for _ in range(args.levels):
                    noise = torch.randn(x0.shape, generator=trainer.gen)
                    u = torch.rand(len(good), generator=trainer.gen)
                    sigma = shift_sigmas(u * (1 - args.t_min) + args.t_min, trainer.shift)
                    v = trainer.model.velocity(flow_interpolate(x0, noise, sigma), sigma, embeds.index(good))
                    (((v - (noise - x0)) ** 2).mean() / args.levels).backward()
                trainer.optimizer.step()
                trainer.optimizer.zero_grad(set_to_none=True)
        if epoch % args.every == 0:
            print(f"epochs {epoch - args.every + 1}-{epoch}: success {sum(success[-args.every:]) / args.every:.3f}",
                  flush=True)


if __name__ == "__main__":
    main()
