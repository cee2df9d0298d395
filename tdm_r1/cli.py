"""The ``tdm-r1`` command: distil a few-step student with TDM, reinforce it with TDM-R1, convert a published
student, and sample it.

``tdm-r1 distill [CONFIG]`` follows ``dgpo train``'s run-folder conventions; ``tdm-r1 sample`` takes the
options of ``dgpo sample`` (with ``--nfe`` for the number of student steps) and writes the same folder.
Bad input ends with one line naming the problem and the fix (exit status 2).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

from dgpo.cli import (_add_model_args, _add_out_args, _add_prompt_args, _prompts_from_args, add_config_args,  # noqa: E402
                      add_run_args, load_model, resolve_model, run_command, train_command)
from dgpo.cli_args import OneLineParser, at_least  # noqa: E402
from dgpo.errors import UserError  # noqa: E402
from dgpo.recipes import recipe  # noqa: E402
from dgpo.runtime.preemption import preemptible  # noqa: E402

DEFAULT_DISTILL_CONFIG = recipe("tdm/shapes.yaml")
DEFAULT_R1_CONFIG = recipe("tdm_r1/shapes_released.yaml")  # the released code's choices


@preemptible  # SIGTERM / SIGUSR1: a checkpoint at the next safe point, exit status 75
def cmd_distill(args) -> None:
    from tdm_r1.config import DistillConfig, load_distill_config
    from tdm_r1.distill import Distiller
    train_command(args, Distiller, lambda: DistillConfig, load_distill_config, DEFAULT_DISTILL_CONFIG, "tdm-r1 distill")


@preemptible
def cmd_train(args) -> None:
    from tdm_r1.config import ReinforceConfig
    from tdm_r1.reinforce import Reinforcer
    train_command(args, Reinforcer, lambda: ReinforceConfig, load_r1_config, DEFAULT_R1_CONFIG, "tdm-r1 train")


def load_r1_config(path, overrides=()):
    """A TDM-R1 config: ``r1.enabled`` is what `tdm-r1 train` means, whatever the file says."""
    from tdm_r1.config import load_distill_config
    return load_distill_config(path, [*overrides, "r1.enabled=true"])


def cmd_surrogate(args) -> None:
    import json
    from dgpo.runtime.output_dir import atomic_output_dir, check_output
    from dgpo.plugins import load_plugins
    from tdm_r1.reinforce import Reinforcer
    from tdm_r1.surrogate_training import train_surrogate
    if args.updates < 1 or args.eval_every < 1:
        raise UserError(f"--updates and --eval-every must be at least 1, got {args.updates} and {args.eval_every}")
    out = check_output(args.out, "tdm-r1 surrogate", args.overwrite)  # before the work, not after it
    load_plugins(args.plugin)
    cfg = load_r1_config(args.config or DEFAULT_R1_CONFIG, [*args.set, f"run.out_dir={out}"])
    if cfg.r1.reward_source != "surrogate":
        raise UserError("tdm-r1 surrogate trains TDM-R1's surrogate: r1.reward_source=direct has none (remove it)")
    distiller = Reinforcer(cfg)  # the student (from r1.init_run) stays frozen: only the surrogate trains
    processes = distiller.processes  # on several processes (accelerate launch) each rolls out its rows
    if processes.distributed and processes.is_main:
        print(f"training the surrogate ({processes.world} processes)")
    rows = train_surrogate(distiller, args.updates, args.eval_every, args.eval_prompts, args.per_prompt,
                           progress=processes.is_main)
    processes.close()
    if not processes.is_main:  # one writer
        return
    with atomic_output_dir(out, "tdm-r1 surrogate", args.overwrite) as tmp:
        distiller.surrogate.save(tmp / "surrogate_lora")
        (tmp / "ranking.json").write_text(json.dumps({"evaluations": rows, "config": args.config or
                                                      str(DEFAULT_R1_CONFIG), "set": args.set}, indent=2))
    ks = sorted(rows[-1]["kendall_tau"])
    print("| update | " + " | ".join(f"τ at step {k}" for k in ks) + " | mean |")
    print("|---" * (len(ks) + 2) + "|")
    for row in rows:
        print(f"| {row['update']} | " + " | ".join(f"{row['kendall_tau'][k]:.2f}" for k in ks)
              + f" | {row['mean']:.2f} |")
    print(f"surrogate: {out / 'surrogate_lora'} (tdm-r1 train --set surrogate.init=...); ranking: {out / 'ranking.json'}")


def cmd_convert(args) -> None:
    from dgpo.runtime.output_dir import atomic_output_dir, check_output
    from tdm_r1.published import convert_published_student, read_ema_parameters, released_levels
    out = check_output(args.out, "tdm-r1 convert", args.overwrite)  # before the work, not after it
    tensors = read_ema_parameters(args.checkpoint)  # a bad file fails before the pipeline loads
    base = resolve_model(args.model)
    model = load_model(base)
    levels = released_levels(args.steps, args.flow_shift)
    with atomic_output_dir(out, "tdm-r1 convert", args.overwrite) as tmp:
        convert_published_student(tensors, model, tmp, args.rank, args.alpha, levels=levels, base=base.resolve(),
                                  shown_as=out.resolve(), source=repr(args.checkpoint))
    print(f"wrote {out}: a {args.steps}-step student at levels {[round(x, 4) for x in levels]}; start TDM-R1 from it "
          f"with --set r1.init_lora={out}, or sample it with tdm-r1 sample --model {args.model} --lora {out}")


def student_boundaries(model, nfe: int, boundaries: str | None, lora: str | None) -> list[float]:
    """--boundaries, else those saved with the LoRA (when its K equals --nfe), else the scheduler's K levels."""
    from tdm_r1.student import check_boundaries, default_boundaries, read_sampler_file
    if boundaries:
        try:
            values = [float(x) for x in boundaries.split(",")]
        except ValueError:
            raise UserError(f"--boundaries {boundaries!r}: expected comma-separated numbers, e.g. 1,0.8,0.5,0.2") from None
        if len(values) != nfe:
            raise UserError(f"--boundaries has {len(values)} levels but --nfe is {nfe}")
        return check_boundaries(values)
    saved = read_sampler_file(lora) if lora else None
    if saved and len(saved["boundaries"]) == nfe:
        return check_boundaries(saved["boundaries"])
    return default_boundaries(model, nfe)


def cmd_sample(args) -> None:
    from dgpo.runtime.output_dir import check_output
    from dgpo.sampling.samples_io import write_samples
    from tdm_r1.student import generate_student, pipeline_sigmas
    if args.nfe < 1:
        raise UserError(f"--nfe must be at least 1, got {args.nfe}")
    check_output(args.out, "tdm-r1 sample", args.overwrite)  # before the work, not after it
    prompts = _prompts_from_args(args)
    from tdm_r1.student import read_sampler_file
    settings = read_sampler_file(args.lora) if args.lora else None  # the size the student was trained at
    if args.lora and settings is None and not args.boundaries:
        raise UserError(f"LoRA folder {args.lora!r} has no sampler.json, so it is not a few-step student (a DGPO LoRA "
                        f"samples with `dgpo sample --lora`); pass --boundaries to sample it in {args.nfe} steps anyway")
    model = load_model(resolve_model(args.model), args.lora, (settings or {}).get("height", 0))
    boundaries = student_boundaries(model, args.nfe, args.boundaries, args.lora)
    images, records = generate_student(model, prompts, boundaries, args.per_prompt, args.seed, args.batch_size)
    meta = {"steps": args.nfe, "guidance_scale": 1.0, "solver": "euler", "sigmas": pipeline_sigmas(model, boundaries)}
    write_samples(args.out, images, [{**r, **meta} for r in records], tool="tdm-r1 sample", overwrite=args.overwrite)
    print(f"wrote {len(images)} images to {args.out}")


def build_parser() -> argparse.ArgumentParser:
    from tdm_r1.config import DistillConfig, ReinforceConfig
    from dgpo.config import describe, to_dict

    def keys(cls, recipe, load) -> list[str]:  # ``--help``'s key list, at the values of the default recipe
        return [f"(values: configs/{recipe.parent.name}/{recipe.name}, the default recipe)",
                *describe(cls, values=to_dict(load(recipe)))]

    def distill_keys() -> list[str]:  # TDM's sections
        from tdm_r1.config import load_distill_config
        return keys(DistillConfig, DEFAULT_DISTILL_CONFIG, load_distill_config)

    def config_keys() -> list[str]:  # TDM-R1's commands: TDM's sections and TDM-R1's
        return keys(ReinforceConfig, DEFAULT_R1_CONFIG, load_r1_config)

    parser = OneLineParser(
        prog="tdm-r1", description="Few-step students for flow-matching text-to-image models: TDM distillation "
        "(arXiv 2503.06674), TDM-R1 reinforcement with a non-differentiable reward (arXiv 2603.07700), K-step "
        "sampling, and published students converted to start from. Run `tdm-r1 distill` with no arguments for "
        "the shapes demo.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("distill", help="distil a K-NFE student from the base with TDM",
                       description="TDM: a LoRA student (K Euler steps at fixed noise levels, no CFG) is trained so "
                       "that its diffused trajectory points match the teacher's marginals, using a fake score (a second "
                       "LoRA on the teacher's backbone). The run folder holds config.yaml, metrics.jsonl, samples/, "
                       "checkpoints/, final/lora with sampler.json + USAGE.md (the stock diffusers call), curves.png "
                       "and summary.md.", config_keys=distill_keys)
    add_run_args(p, DEFAULT_DISTILL_CONFIG, "optim.generator_lr=1e-4 or run.time_budget_min=5")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("train", help="reinforce a TDM student with a non-differentiable reward (TDM-R1)",
                       description="TDM-R1: the TDM loop plus a stepwise surrogate reward (a third LoRA on the "
                       "backbone, trained with DGPO's group loss on the student's own deterministic trajectories, "
                       "every point labelled with its final image's reward) whose guided x̂₀ gives the student a "
                       "reward direction. The student is only ever regressed onto x̂₀ targets: no denoising loss "
                       "touches it. Starts from the student of a `tdm-r1 distill` run (r1.init_run). Same run "
                       "folder as `tdm-r1 distill`.", config_keys=config_keys)
    add_run_args(p, DEFAULT_R1_CONFIG, "r1.init_run=runs/tdm-shapes or surrogate.lr=3e-4")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("surrogate", help="train a stepwise surrogate reward alone on a frozen student's rollouts",
                       description="Train TDM-R1's surrogate reward (a LoRA trained with DGPO's group loss on "
                       "the points of the student's deterministic trajectories, each labelled with its final "
                       "image's reward) without touching the student, and report how well its implicit reward "
                       "orders fresh trajectory points by their true rewards: Kendall's τ per step, averaged over "
                       "prompts (0 = chance). Writes OUT/surrogate_lora (tdm-r1 train can start from it: --set "
                       "surrogate.init=OUT/surrogate_lora) and OUT/ranking.json.",
                       config_keys=config_keys)
    add_config_args(p, DEFAULT_R1_CONFIG, "surrogate.lr=3e-4 or r1.init_run=runs/tdm-shapes",
                    "; r1.init_run names the student")
    p.add_argument("--updates", type=at_least(1), default=200, help="surrogate updates (default 200)")
    p.add_argument("--eval-every", type=at_least(1), default=50, help="measure the ranking every N updates (default 50)")
    p.add_argument("--eval-prompts", type=at_least(1), default=8, help="train prompts the ranking is measured on (default 8)")
    p.add_argument("--per-prompt", type=at_least(1), default=16, help="fresh rollouts per evaluation prompt (default 16)")
    _add_out_args(p, "output folder (surrogate_lora/, ranking.json); must be new or empty")
    p.add_argument("--plugin", action="append", default=[], metavar="FILE.py|MODULE",
                   help="import a plug-in first: a file or module that registers a reward (dgpo.plugins)")
    p.set_defaults(func=cmd_surrogate)

    p = sub.add_parser("convert", help="convert a published TDM student (an EMA checkpoint) into a LoRA folder",
                       description="Convert the released TDM-R1 code's student checkpoint (torch.save of "
                       "{'ema_parameters': [LoRA tensors in PEFT order]}, rank 32, alpha 64, the joint attention's "
                       "projections) into a diffusers LoRA folder with its sampler.json, for the pipeline it was "
                       "trained on (SD3.5-Medium, from a local folder). Start TDM-R1 from it with --set "
                       "r1.init_lora=OUT; sample it with tdm-r1 sample --lora OUT. Read with torch.load("
                       "weights_only=True): no code in the file runs.")
    p.add_argument("checkpoint", help="the published EMA checkpoint (e.g. ema.ckpt)")
    p.add_argument("--model", required=True, help="the saved SD3 pipeline folder the student was trained on")
    p.add_argument("--rank", type=at_least(1), default=32, help="LoRA rank of the checkpoint (default 32)")
    p.add_argument("--alpha", type=float, default=64.0, help="LoRA alpha of the checkpoint (default 64)")
    p.add_argument("--steps", type=at_least(1), default=4, help="student steps (default 4)")
    p.add_argument("--flow-shift", type=float, default=3.0,
                   help="flow shift of the released DPM-Solver sampler, which sets the student's levels (default 3)")
    _add_out_args(p, "output LoRA folder (new or empty)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("sample", help="sample a K-step student into a folder (PNGs, samples.jsonl, grid.png)",
                       description="Like `dgpo sample`, with the student's sampler: --nfe Euler steps at the noise "
                       "levels saved with the LoRA (sampler.json), --boundaries, or the scheduler's own K levels; no "
                       "CFG. Image k uses seed S + k.")
    _add_model_args(p)
    _add_prompt_args(p)
    _add_out_args(p, "output folder (new or empty; written all at once)")
    p.add_argument("--nfe", "--steps", dest="nfe", type=at_least(1), default=4, help="student steps (default 4)")
    p.add_argument("--boundaries", help="comma-separated noise levels σ_0=1 > … > σ_{K-1} (default: saved with --lora)")
    p.add_argument("--seed", type=at_least(0), default=0, help="seed of the first image; image k uses seed + k (default 0)")
    p.add_argument("--per-prompt", type=at_least(1), default=1, help="images per prompt (default 1)")
    p.add_argument("--batch-size", type=at_least(1), default=128, help="images per sampler batch (default 128)")
    p.set_defaults(func=cmd_sample)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
