"""The ``dgpo`` command: pretrain the embedded base, sample, evaluate (and train, see ``dgpo train``).

Every command accepts ``--set key.sub=value`` overrides where it reads a config, prints a clear one-line
error (exit status 2) for bad input, and writes its outputs atomically.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

from dgpo.cli_args import OneLineParser, at_least, finite  # noqa: E402
from dgpo.errors import UserError  # noqa: E402
from dgpo.models.lora_io import check_lora_folder  # noqa: E402  (light: no torch)
from dgpo.runtime.preemption import PREEMPTED_STATUS, PREEMPTION, Preempted, preemptible  # noqa: E402  (light: no torch)

from dgpo.recipes import recipe, recipe_name, recipes_dir  # noqa: E402

DEFAULT_BASE_CONFIG = recipe("base/shapes_grammar_fidelity0.5.yaml")  # its base is shipped pretrained
DEFAULT_TRAIN_CONFIG = recipe("dgpo/shapes.yaml")


# ------------------------------------------------------------------------------------------- helpers

def load_base_config(path: str | Path | None = None, overrides=()):
    from dgpo.worlds.shapes_base.pretrain import load_pretrain_config
    return load_pretrain_config(path or DEFAULT_BASE_CONFIG, overrides)


def resolve_model(model_dir: str | None, log=print) -> Path:
    """``--model`` as given, or the embedded shapes base (shipped; a non-shipped default would be pretrained
    on first use, then cached)."""
    if model_dir:
        return Path(model_dir)
    from dgpo.worlds.shapes_base.pretrain import ensure_base
    return ensure_base(load_base_config(), log=log)


def load_model(model_dir: str | Path, lora: str | None = None, resolution: int = 0):
    """A :class:`FlowModel` over a saved pipeline for inference (at ``resolution`` pixels, 0: the pipeline's
    own), with optional LoRA weights fused into the backbone (diffusers ``fuse_lora`` + ``unload_lora_weights``:
    the same function, without the adapters' extra matrix products at every step)."""
    from dgpo.models.families import load_model as load_handle
    model = load_handle(model_dir, resolution=resolution)
    if lora:
        model.fuse_lora(lora)
    return model


def train_config_keys() -> list[str]:
    """Every key of a training run's config, the registered methods' sections included, at the values of the
    default recipe (``dgpo train --help``)."""
    from dgpo.config import describe, to_dict
    from dgpo.train_config import train_config_class
    from dgpo.trainer import load_train_config
    recipe = DEFAULT_TRAIN_CONFIG
    return [f"(values: configs/{recipe.parent.name}/{recipe.name}, the default recipe; a method's own section: its "
            f"defaults)", *describe(train_config_class(), values=to_dict(load_train_config(recipe)))]


def pretrain_config_keys() -> list[str]:
    """Every key of the shapes base's pretraining config (``dgpo pretrain --help``)."""
    from dgpo.config import describe
    from dgpo.worlds.shapes_base.pretrain import PretrainConfig
    return describe(PretrainConfig)


def _prompts_from_args(args) -> list[str]:
    """--prompts FILE, else the prompts of --split of --world."""
    from dgpo.sampling.samples_io import read_prompt_file
    from dgpo.worlds.registry import make_world
    if args.prompts:
        return read_prompt_file(args.prompts)
    return make_world(args.world).prompts(args.split)


# ------------------------------------------------------------------------------------------- commands

def cmd_pretrain(args) -> int | None:
    from dgpo.config import to_dict
    from dgpo.evaluation import cache as eval_cache
    from dgpo.evaluation.evaluate import EvalConfig, SamplerConfig, evaluate_model, format_table
    from dgpo.worlds.shapes_base.pretrain import FlowPaused, base_dir, ensure_base, forget_base, snapshot_base
    cfg = load_base_config(args.config, args.set)
    from dgpo.paths import check_cache_writable
    check_cache_writable()  # the base and its evaluation go there: fail before the work
    if cfg.threads:  # the evaluation below too, not only the pretraining
        import torch
        torch.set_num_threads(cfg.threads)
    if args.snapshot:
        from dgpo.runtime.output_dir import atomic_output_dir
        with atomic_output_dir(args.snapshot, "dgpo pretrain --snapshot", args.overwrite, "--snapshot") as tmp:
            step = snapshot_base(cfg, tmp)
        print(f"wrote {args.snapshot}: the unfinished base at flow step {step} of {cfg.flow.steps} "
              f"(evaluate it with `dgpo eval --model {args.snapshot}`)")
        return None
    use_shipped = not (args.ignore_shipped or args.force)
    target = base_dir(cfg)
    if args.force:
        forget_base(cfg)
    cached = (target / "model_index.json").is_file()
    t0 = time.time()
    deadline = None if args.max_minutes is None else t0 + 60.0 * args.max_minutes

    def stop(steps_done: int) -> bool:
        return deadline is not None and time.time() >= deadline

    try:
        path = ensure_base(cfg, stop=stop, use_shipped=use_shipped)
    except FlowPaused as paused:
        print(f"--max-minutes {args.max_minutes:g}: {paused}")
        return 3
    shipped = path != target
    how = ("shipped with the package; --ignore-shipped pretrains it again into the cache" if shipped
           else "cached" if cached else f"trained in {time.time() - t0:.0f} s")
    print(f"base model: {path} ({how})")
    if args.no_eval:
        return
    eval_file = path / "eval.json"
    # a shipped folder is never written to: its evaluation is kept in the cache (dgpo.evaluation.cache)
    key = eval_cache.eval_key(path, {"command": "dgpo pretrain", "per_prompt": args.per_prompt,
                                     "sampler": to_dict(SamplerConfig())}) if shipped else None
    kept = eval_cache.load(key) if shipped and not args.force else None
    if eval_file.is_file() and not args.force:  # the cached base's, or one shipped with a base
        result = json.loads(eval_file.read_text())
    elif kept is not None:
        result = kept[0]
    else:
        if shipped:
            print(f"evaluating the shipped base once ({args.per_prompt} images per test prompt; later calls print "
                  f"the kept result; --no-eval skips it)")
        model = load_model(path)
        result, _, _ = evaluate_model(model, EvalConfig(per_prompt=args.per_prompt), SamplerConfig())
        result["sampler"] = to_dict(SamplerConfig())
        if shipped:
            eval_cache.store(key, result, None)
        else:
            eval_file.write_text(json.dumps(result, indent=2))
    print(format_table({"base": result}))


def cmd_sample(args) -> None:
    from dgpo.evaluation.evaluate import SamplerConfig, generate
    from dgpo.runtime.output_dir import check_output
    from dgpo.sampling.samples_io import write_samples
    check_output(args.out, "dgpo sample", args.overwrite)  # before the work, not after it
    prompts = _prompts_from_args(args)  # any prompt can be sampled; `dgpo eval` checks that the world can score it
    check_lora_folder(args.lora)
    model = load_model(resolve_model(args.model), args.lora)
    sampler = SamplerConfig(steps=args.steps, guidance_scale=args.cfg, solver=args.solver)
    images, records = generate(model, prompts, args.per_prompt, sampler, args.seed, args.batch_size)
    meta = {"steps": args.steps, "guidance_scale": args.cfg, "solver": args.solver}
    write_samples(args.out, images, [{**r, **meta} for r in records], tool="dgpo sample", overwrite=args.overwrite)
    print(f"wrote {len(images)} images to {args.out}")


def cmd_eval(args) -> None:
    from dgpo.evaluation.evaluate import EvalConfig, SamplerConfig, evaluate_images, evaluate_model, format_table
    from dgpo.runtime.output_dir import check_output, write_json_output
    from dgpo.sampling.samples_io import read_samples
    from dgpo.worlds.registry import make_world
    world = make_world(args.world)
    if args.out:
        check_output(args.out, "dgpo eval", args.overwrite)  # before the work, not after it
    if args.samples:
        images, records = read_samples(args.samples)
        prompts = [r["prompt"] for r in records]
        world.check_prompts(prompts)
        result = evaluate_images(images, prompts, fd=not args.no_fd, world=world)
        name = str(args.samples)
    else:
        prompts = _prompts_from_args(args)
        world.check_prompts(prompts)
        check_lora_folder(args.lora)
        model = load_model(resolve_model(args.model), args.lora)
        cfg = EvalConfig(split=args.split, per_prompt=args.per_prompt, seed=args.seed, fd=not args.no_fd)
        sampler = SamplerConfig(steps=args.steps, guidance_scale=args.cfg, solver=args.solver)
        result, _, _ = evaluate_model(model, cfg, sampler, prompts=prompts, world=world)
        name = args.lora or str(args.model or "base")
    print(format_table({name: result}, world.metric))
    if args.out:
        write_json_output(args.out, result, "dgpo eval", args.overwrite)
        print(f"wrote {args.out}")


def run_config_from_args(args, config_cls, load_config, default_config: Path, tool: str):
    """The config of the run a training command starts (``CONFIG``, ``--set``, ``--out``, ``--overwrite``)
    or continues (``--resume RUN``), with its run folder claimed or reopened (:mod:`dgpo.runtime.run_folder`)."""
    from dgpo.runtime.run_folder import reopen_run, start_or_reopen, start_run
    if args.resume:
        if args.out or args.overwrite or args.config or args.resume_or_start:
            raise UserError(f"--resume {args.resume!r} continues that run with its own config and folder; "
                            f"drop CONFIG, --out, --overwrite and --resume-or-start (--set may change e.g. run.epochs)")
        return reopen_run(config_cls, args.resume, args.set)
    if args.resume_or_start:
        if args.out or args.overwrite:
            raise UserError(f"--resume-or-start {args.resume_or_start!r} names the run folder; drop --out and "
                            f"--overwrite")
        wanted = load_config(args.config or default_config, [*args.set, f"run.out_dir={args.resume_or_start}"])
        return start_or_reopen(config_cls, wanted, tool)
    overrides = list(args.set) + ([f"run.out_dir={args.out}"] if args.out else [])
    named = bool(args.out) or any(o.startswith("run.out_dir=") for o in args.set)
    return start_run(load_config(args.config or default_config, overrides), tool, overwrite=args.overwrite, named=named)


def train_command(args, recipe_cls, config_class, load_config, default_config: Path, tool: str) -> None:
    """A training command (``dgpo train``, ``tdm-r1 distill``): load the plug-ins (``--plugin``, and those the
    resumed run recorded), claim or reopen the run folder, run the recipe on it, print the summary table and
    where the weights are. ``config_class()`` gives the config type once the plug-ins are in."""
    from dgpo.config import from_dict, to_dict
    from dgpo.plugins import load_plugins, record_plugins, recorded_plugins
    from dgpo.runtime.checkpoint import list_checkpoints
    from dgpo.runtime.processes import Processes
    from dgpo.paths import check_cache_writable
    from dgpo.runtime.run_folder import resumable
    check_cache_writable()  # before any work (the base's evaluation is cached)
    processes = Processes.launched()
    resuming = args.resume or resumable(args.resume_or_start)  # --resume-or-start continues a checkpointed folder
    loaded = load_plugins([*(recorded_plugins(resuming) if resuming else []), *args.plugin])
    cfg, data = None, None
    if processes.is_main:  # the main process claims (or reopens) the run folder; the others take its config
        try:
            cfg = run_config_from_args(args, config_class(), load_config, default_config, tool)
            data = to_dict(cfg)
        except Exception as e:  # every process stops with the main one's message
            data = e
    data = processes.broadcast(data)
    if isinstance(data, Exception):
        raise data
    cfg = cfg if cfg is not None else from_dict(config_class(), data)
    if processes.is_main:
        if not resuming:
            record_plugins(Path(cfg.run.out_dir), loaded)
        print(f"run folder: {cfg.run.out_dir}" + (f" ({processes.world} processes)" if processes.distributed else "")
              + (" (resumed)" if resuming and not args.resume else ""))
    try:
        recipe = recipe_cls(cfg)
        result = recipe.run(resume=bool(resuming))
    except BaseException as e:  # an error or Ctrl-C: a new run with no checkpoint yet leaves no folder behind
        if processes.is_main and not resuming:
            from dgpo.runtime.output_dir import release_run_dir
            out = Path(cfg.run.out_dir)
            if not list_checkpoints(out) and release_run_dir(out) and not isinstance(e, UserError):
                print(f"the run stopped before its first checkpoint: {out} removed", file=sys.stderr)
        raise
    PREEMPTION.ignore()  # the run has finished: a late signal changes nothing, and the summary is printed
    processes.close()
    if not processes.is_main:
        return
    print((Path(cfg.run.out_dir) / "summary.md").read_text())
    first, last = result["first"], result["last"]
    out = Path(cfg.run.out_dir)
    grids = sorted((out / "samples").glob("*.png"))
    print(f"{cfg.eval.split} {recipe.world.metric} {first['eval_geneval']:.3f} -> {last['eval_geneval']:.3f} in "
          f"{last['train_seconds'] / 60:.1f} min of training; weights: {out / 'final'}")
    print(f"curves: {', '.join(str(p) for p in sorted(out.glob('*.png')))}"
          + (f"; samples of the last evaluation: {grids[-1]}" if grids else ""))


@preemptible  # SIGTERM / SIGUSR1: a checkpoint at the next safe point, exit status 75
def cmd_train(args) -> None:
    from dgpo.trainer import Trainer, load_train_config, train_config_class
    train_command(args, Trainer, train_config_class, load_train_config, DEFAULT_TRAIN_CONFIG, "dgpo train")


def cmd_export(args) -> None:
    """A checkpoint's LoRA (its raw weights, or with --ema the policy EMA) as a diffusers-format folder."""
    from dgpo.runtime.checkpoint import STEP_DIR, list_checkpoints
    run = Path(args.run)
    if not (run / "config.yaml").is_file():
        raise UserError(f"{str(run)!r} is not a run folder (no config.yaml): pass a folder `dgpo train` wrote")
    steps = {int(STEP_DIR.match(p.name).group(1)): p for p in list_checkpoints(run)}
    if not steps:
        raise UserError(f"{str(run)!r} has no complete checkpoint under checkpoints/ (run.checkpoint_every sets how often "
                        f"`dgpo train` writes one)")
    step = max(steps) if args.step is None else args.step
    if step not in steps:
        raise UserError(f"{str(run)!r} keeps no checkpoint of step {step}; it keeps steps {sorted(steps)} "
                        f"(run.keep_checkpoints sets how many)")
    from dgpo.runtime.checkpoint import load_checkpoint
    from dgpo.models.lora import write_diffusers_lora
    from dgpo.runtime.output_dir import atomic_output_dir, check_output
    out = check_output(args.out, "dgpo export", args.overwrite)
    tensors, state = load_checkpoint(steps[step])  # the checkpoint alone: no model is built
    if "lora_keys" not in state:
        raise UserError(f"checkpoint {str(steps[step])!r} was written by an older version without LoRA names; "
                        f"export it with that version, or take final/lora")
    keys = state["lora_keys"]
    if args.ema:  # the policy EMA keeps the LoRA parameters in the order of lora_keys
        if f"policy.ema.{len(keys) - 1}" not in tensors:
            raise UserError(f"checkpoint {str(steps[step])!r} holds no policy EMA")
        weights = {k: tensors[f"policy.ema.{i}"] for i, k in enumerate(keys)}
    else:
        weights = {k: tensors[f"lora.{k}"] for k in keys}
    with atomic_output_dir(out, "dgpo export", args.overwrite) as tmp:  # all or nothing
        write_diffusers_lora(weights, state["lora_config"], tmp)
    print(f"wrote {out}: the {'policy EMA' if args.ema else 'LoRA'} of step {step} of {run} "
          f"(load with pipe.load_lora_weights, or `dgpo eval --lora {out}`)")


def cmd_serve_reward(args) -> None:
    """Serve a registered reward over HTTP in the foreground until Ctrl-C."""
    import uvicorn
    from dgpo.plugins import load_plugins
    from dgpo.rewards.server import LOOPBACK_HOSTS, ServerLimits, check_binding, create_app, is_loopback, uvicorn_config
    from dgpo.rewards import make_reward
    load_plugins(args.plugin)
    token = args.token or os.environ.get("DGPO_REWARD_TOKEN") or None
    check_binding(args.host, token)
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {args.port}")
    reward = make_reward(args.name, **({"model": args.model} if args.model else {}))
    limits = ServerLimits(max_body_bytes=args.max_body_mb << 20, max_pixels=args.max_pixels,
                          max_request_pixels=args.max_request_pixels)
    app = create_app(reward, token, LOOPBACK_HOSTS if is_loopback(args.host) else None, limits)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serving reward {args.name!r} at http://{host}:{args.port}/score"
          + (" (bearer token required)" if token else "") + "; Ctrl-C stops", flush=True)
    try:
        uvicorn.Server(uvicorn_config(app, args.host, args.port, limits)).run()
    except OSError as e:
        raise UserError(f"cannot serve on {args.host}:{args.port}: {e.strerror or e}") from None


# ------------------------------------------------------------------------------------------- parser

def _add_sampler_args(p, steps=20, cfg=1.5) -> None:
    p.add_argument("--steps", type=at_least(1), default=steps, help=f"ODE steps (default {steps})")
    p.add_argument("--cfg", type=finite(0.0), default=cfg, help=f"classifier-free guidance scale (default {cfg}; <=1 = off)")
    p.add_argument("--solver", choices=["euler", "dpmpp"], default="euler", help="ODE solver (default euler)")


def _add_model_args(p) -> None:
    p.add_argument("--model", help="a saved SD3 pipeline folder (default: the embedded shapes base, shipped "
                                   "with the package)")
    p.add_argument("--lora", help="a diffusers-format LoRA folder to load on top (e.g. RUN/final/lora)")


def _add_prompt_args(p) -> None:
    p.add_argument("--prompts", help="a text file with one prompt per line")
    p.add_argument("--world", default="shapes", help="the world whose prompts and metrics to use (default shapes; "
                   "a registered world, see dgpo.worlds)")
    p.add_argument("--split", choices=["train", "test", "all"], default="test", help="world prompts split (default test)")


def _add_out_args(p, what: str, required: bool = True) -> None:
    p.add_argument("--out", required=required, help=what)
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier output of this command at --out (only the files it wrote; "
                        "a path holding anything else is still refused)")


def add_config_args(p, default_config: Path, set_example: str, note: str = "") -> None:
    """CONFIG (optional, ``default_config`` when left out) and --set KEY=VALUE overrides."""
    p.add_argument("config", nargs="?",
                   help=f"YAML config (default {recipe_name(default_config)}{note}; the shipped recipes are in "
                        f"{recipes_dir()}, a relative configs/... path not found here is taken from there)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a config key, e.g. {set_example}")


def add_run_args(p, default_config: Path, set_example: str) -> None:
    """CONFIG, --set, --out, --overwrite, --resume and --plugin of a training command (see dgpo.runtime.run_folder)."""
    add_config_args(p, default_config, set_example)
    p.add_argument("--out", help="run folder (overrides run.out_dir); must be new or empty. Without it a taken "
                                 "default folder is not reused: the run goes to NAME-2, NAME-3, ...")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an earlier run's folder of this command (its files are removed; "
                        "a folder holding anything else is refused)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint "
                   "(RUN_DIR itself is read and written, wherever it was moved)")
    p.add_argument("--resume-or-start", metavar="RUN_DIR",
                   help="for job scripts that are requeued: start the run (CONFIG, --set) in RUN_DIR, or continue it "
                        "from its newest checkpoint if it has one (its config must be the one asked for); a SIGTERM "
                        "or SIGUSR1 checkpoints the run and exits with status 75 (dgpo.runtime.preemption)")
    p.add_argument("--plugin", action="append", default=[], metavar="FILE.py|MODULE",
                   help="import a plug-in first: a file or module that registers a reward or a method "
                        "(dgpo.plugins); recorded in the run folder and loaded again by --resume")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="dgpo", description="Group preference optimisation for flow-matching text-to-image models. "
        "Run `dgpo train` with no arguments for the embedded CPU demo.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pretrain (or find cached) the embedded shapes base and evaluate it",
                       description="Train the tiny SD3 base for the shapes world on the CPU (autoencoder, then flow "
                       "matching), save it with save_pretrained into the cache (keyed by its config) and print its "
                       "shapes-geneval table. A second call with the same config only prints the cached result. The default "
                       "config's base is shipped with the package: the first call evaluates it (--per-prompt images per test prompt) "
                       "and keeps the result in the cache; later calls only print.",
                       config_keys=pretrain_config_keys)
    p.add_argument("config", nargs="?", help=f"YAML config (default {recipe_name(DEFAULT_BASE_CONFIG)}; the shipped "
                   f"recipes are in {recipes_dir()}, a relative configs/... path not found here is taken from there)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. flow.steps=100")
    p.add_argument("--force", action="store_true", help="retrain from scratch into the cache even if a cached "
                   "or shipped base (or an unfinished pretraining of this config) exists")
    p.add_argument("--ignore-shipped", action="store_true", help="use (or pretrain) the cache's base even where "
                   "the package ships this config's base: how a shipped base is reproduced")
    p.add_argument("--max-minutes", type=finite(0.0), default=None, metavar="M",
                   help="stop the flow stage at a checkpoint once M minutes have passed since the start (exit "
                   "status 3); run the same command again to continue. Without it a stopped or killed pretraining "
                   "also continues from its last checkpoint (flow.checkpoint_every)")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation")
    p.add_argument("--per-prompt", type=at_least(1), default=64, help="evaluation images per test prompt (default 64: ±0.012 noise)")
    p.add_argument("--snapshot", metavar="DIR", help="do not train: write the weights an unfinished pretraining of "
                   "this config has reached (its newest checkpoint) as a pipeline folder, to evaluate it meanwhile")
    p.add_argument("--overwrite", action="store_true", help="with --snapshot: replace an earlier snapshot at DIR")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("sample", help="sample images into a folder (PNGs, samples.jsonl, grid.png)")
    _add_model_args(p)
    _add_prompt_args(p)
    _add_out_args(p, "output folder (new or empty; written all at once)")
    _add_sampler_args(p)
    p.add_argument("--seed", type=at_least(0), default=0, help="seed of the first image; image k uses seed + k (default 0)")
    p.add_argument("--per-prompt", type=at_least(1), default=1, help="images per prompt (default 1)")
    p.add_argument("--batch-size", type=at_least(1), default=128, help="images per sampler batch (default 128)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="score a model or a samples folder on the shapes world",
                       description="Print shapes-geneval (overall and per category), the mean partial score and "
                       "the quality FD; --out writes them as JSON.")
    _add_model_args(p)
    p.add_argument("--samples", help="score this samples folder instead of sampling a model")
    _add_prompt_args(p)
    _add_sampler_args(p)
    p.add_argument("--per-prompt", type=at_least(1), default=16, help="images per prompt (default 16)")
    p.add_argument("--seed", type=at_least(0), default=1000, help="seed of the first image (default 1000)")
    p.add_argument("--no-fd", action="store_true", help="skip the quality FD")
    _add_out_args(p, "write the result as JSON to this new file", required=False)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("train", help="DGPO (or baseline) online training (no arguments: the embedded shapes demo)",
                       description="Online DGPO: ODE rollouts, groups of samples per prompt, the group DPO loss on "
                       "LoRA adapters. With no arguments it runs the embedded demo: pretrain the shapes base if it "
                       "is not cached, train, evaluate on test prompts along the way, and print base vs trained. "
                       "The run folder holds config.yaml, metrics.jsonl, samples/, checkpoints/, final/lora and "
                       "reward_curve.png. The baselines run in the same loop: configs/flow_grpo/shapes.yaml, "
                       "configs/diffusion_dpo/shapes.yaml, configs/nft/shapes.yaml (objective.name: dgpo, flow_grpo, "
                       "diffusion_dpo or nft; each method's own keys are in its section below).",
                       config_keys=train_config_keys)
    add_run_args(p, DEFAULT_TRAIN_CONFIG, "optim.lr=1e-4 or run.time_budget_min=10")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="write a checkpoint's LoRA (or its policy EMA) as a diffusers LoRA folder",
                       description="Export the LoRA of one checkpoint of a `dgpo train` run (default: the latest), "
                       "e.g. to keep an earlier, better evaluation than the final one, or to compare the raw "
                       "weights with their EMA (optim.ema_decay). The folder loads like RUN/final/lora.")
    p.add_argument("run", help="the run folder (holds config.yaml and checkpoints/step-N)")
    p.add_argument("--step", type=at_least(0), help="the checkpoint's epoch (default: the latest kept)")
    p.add_argument("--ema", action="store_true", help="export the policy EMA instead of the raw weights")
    _add_out_args(p, "a new folder for the LoRA")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve-reward", help="serve a registered reward over HTTP (for reward.name=remote)",
                       description="Serve a registered reward (an ASGI app on uvicorn): POST /score with "
                       '{"prompts": [...], "images": [base64 PNG, ...]} answers {"scores": [...]}. Binds 127.0.0.1 '
                       "unless --host says otherwise, and then requires a bearer token (--token or DGPO_REWARD_TOKEN; "
                       "clients set DGPO_REWARD_TOKEN). Train against it with --set reward.name=remote --set "
                       "reward.url=http://HOST:PORT/score (several URLs, comma-separated, spread the load).")
    p.add_argument("name", help="a registered reward (shapes_partial, shapes_strict, ..., or one a --plugin registers)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=at_least(0), default=8765, help="port (default 8765)")
    p.add_argument("--token", help="require this bearer token (default: DGPO_REWARD_TOKEN, if set; prefer the "
                                   "variable: a --token shows in ps to other users of the machine)")
    p.add_argument("--max-body-mb", type=at_least(1), default=256, help="largest request body in MiB (default 256)")
    p.add_argument("--max-pixels", type=at_least(1), default=2048 * 2048, help="largest image in pixels (default 2048²)")
    p.add_argument("--max-request-pixels", type=at_least(1), default=32 * 1024 * 1024,
                   help="largest request in pixels over all its images (default 32 × 1024²)")
    p.add_argument("--plugin", action="append", default=[], metavar="FILE.py|MODULE",
                   help="import a plug-in that registers the reward first")
    p.add_argument("--model", help="the model a model-based reward reads (clip_score, pickscore: a CLIP folder; "
                                   "aesthetic: CLIP_DIR,HEAD.pth)")
    p.set_defaults(func=cmd_serve_reward)
    return parser


FILESYSTEM_FAULTS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


def filesystem_fault(e: OSError) -> str:
    """What a filesystem fault means for the user, in one line."""
    where = f" {e.filename!r}" if e.filename else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"{e.strerror} while writing{where}: free some space; a checkpoint is written whole or not at all, "
                f"so a run continues from its last one with --resume RUN")
    return f"{e.strerror}:{where} cannot be written; choose a folder you can write (--out, DGPO_CACHE)"


def run_command(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse and run one command: a UserError is one line on stderr and exit status 2."""
    args = parser.parse_args(argv)
    try:
        status = args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Preempted as e:  # SIGTERM / SIGUSR1 (dgpo.runtime.preemption)
        print(e.message(), file=sys.stderr)
        return PREEMPTED_STATUS
    except OSError as e:  # a filesystem fault (permissions, read-only, full disk) is one line, not a traceback
        if e.errno not in FILESYSTEM_FAULTS:
            raise
        print(f"error: {filesystem_fault(e)}", file=sys.stderr)
        return 2
    return status or 0


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
