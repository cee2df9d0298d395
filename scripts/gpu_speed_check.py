"""Speed at SD3.5-Medium scale on one GPU: few-step sampling (TDM) and one RL epoch per method (benchmark).

Companion of ``scripts/gpu_scale_check.py``: the same SD3.5-Medium-sized pipeline with random weights
(``dgpo.models.tiny_pipelines.sd35_medium_pipeline``: MM-DiT-X transformer of 24 blocks at width 1536, SD3 VAE,
CLIP-L/G-sized text encoders, 256 zero T5 tokens), bf16 weights and bf16 autocast, timed through the project's
own code paths.
Random weights make every image fail the shapes verifier, so nothing here measures quality, only time.

1. **Few-step sampling** (``docs/experiments/sampling-time.md``). A batch of ``--batch`` images (distinct test prompts, image k
   with seed ``seed + k``) at ``--resolution``, end to end = text encoding + sampling loop + VAE decode, the
   way ``scripts/bench_tdm.py`` times it, for

   * the teacher, 20 Euler steps with CFG 1.5 (the TDM benchmark's teacher; 2 transformer passes per step),
   * the teacher, 28 Euler steps with CFG 4.5 (SD3.5-Medium's usual setting),
   * the 4-NFE student: the same transformer with a rank-``--lora-rank`` LoRA attached
     (``dgpo.models.lora.add_lora``; its initial random weights), no CFG, the 4 default boundaries
     (``tdm_r1.student.default_boundaries``) through ``tdm_r1.student.sample_student``,
   * the same student with the LoRA fused into the backbone (what a deployed student costs).

   Each row runs once to warm up, then ``--reps`` times; the median is reported. Every run is composed of
   the generation helpers' own pieces (``FlowModel.encode_prompts``, ``dgpo.sampling.ode.initial_noise``,
   ``dgpo.sampling.ode.sample_ode`` / ``tdm_r1.student.sample_student``, ``FlowModel.decode_latents``) with a
   device synchronisation between them, giving the breakdown text / loop / decode; the end-to-end helper
   (``dgpo.evaluation.evaluate.generate`` / ``tdm_r1.student.generate_student``) is timed as well, as a cross-check.
   The CFG branch's empty-prompt embedding is cached by ``FlowModel`` after the warm-up, as in ``generate``.
   Speed-ups are images/s relative to the 20-step CFG 1.5 teacher.

2. **RL epoch cost per method** (``docs/experiments/gpu-scale-check.md``). For each of ``--methods`` the method's recipe
   ``configs/<method>/shapes.yaml`` (as ``scripts/bench_rl.py`` uses it) with P = ``--prompts``,
   G = ``--group-size``, ``--rollout-steps``, LoRA rank ``--lora-rank``, micro-batch ``--micro-batch`` and
   bf16 mixed precision overridden, run by :class:`dgpo.trainer.Trainer` itself on the in-memory model
   (``Trainer(cfg, model=..., reward=...)``) with uniform random rewards
   (``dgpo.rewards.random_reward.RandomReward``): ``Trainer.epoch`` times rollout
   (sampling + decode), reward and update and counts transformer passes (NFE) as in any run. Each method
   gets a fresh LoRA of the same seed (``Trainer.close`` takes the previous one off), runs ``--epochs``
   epochs (default 2) and the last is reported: seconds in rollout, reward, update, the total, NFE of the
   rollout and of the update, peak GPU memory, and the ratio to DGPO.

Runs in well under 6 minutes on one H100 at 512 px (most of it the model build and Flow-GRPO's update).
At 1024 px the RL epochs need about 4× the activations; pass ``--skip-rl`` if memory or time is short.

    python scripts/gpu_speed_check.py --out OUT_DIR                      # H100, 512 px, bf16
    python scripts/gpu_speed_check.py --out OUT_DIR --resolution 1024 --skip-rl
    python scripts/gpu_speed_check.py --out OUT_DIR --family flux     # one DGPO and one Flow-GRPO epoch, FLUX.1-dev size
    OMP_NUM_THREADS=1 python scripts/gpu_speed_check.py --out OUT --layers 1 --resolution 64   # CPU, ~15 min
    OMP_NUM_THREADS=1 python scripts/gpu_speed_check.py --out OUT --layers 1 --resolution 64 \
        --text-layers 1 --reps 1 --epochs 1 --rollout-steps 2 --group-size 2      # CPU smoke test, ~2 min

Writes ``OUT_DIR/gpu_speed_check.json`` (device, arguments, every timing; rewritten after each section, so
a run cut short keeps what it measured) and prints a short summary. Exit status 1 if a row or method failed
(its error is in the JSON).
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
import traceback
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from dgpo.errors import UserError
from dgpo.evaluation.evaluate import SamplerConfig, generate
from dgpo.models.flux import FluxModel
from dgpo.models.handle import FlowModel, SD3Model
from dgpo.models.lora import add_lora
from dgpo.models.tiny_pipelines import flux_pipeline, sd35_medium_pipeline
from dgpo.rewards.random_reward import RandomReward
from dgpo.runtime.output_dir import check_json_output, write_json_output
from dgpo.sampling.generation import timed
from dgpo.sampling.ode import sample_ode
from dgpo.sampling.speed import timed_generation
from dgpo.trainer import Trainer, load_train_config
from dgpo.worlds import shapes
from tdm_r1.student import default_boundaries, generate_student, sample_student

TOOL = "gpu_speed_check"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU only for a smoke test with --layers 1
REPO = Path(__file__).resolve().parents[1]
METHODS = ("dgpo", "flow_grpo", "diffusion_dpo", "nft")
LABELS = {"dgpo": "DGPO", "flow_grpo": "Flow-GRPO", "diffusion_dpo": "Diffusion-DPO", "nft": "DiffusionNFT"}
REFERENCE_ROW = "teacher_20step_cfg1.5"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (gpu_speed_check.json is written there)")
    ap.add_argument("--resolution", type=int, default=512, help="image size in pixels (default 512; 1024 works)")
    ap.add_argument("--family", choices=("sd3", "flux"), default="sd3", help="sd3: the SD3.5-Medium-sized pipeline "
                    "(both sections); flux: a FLUX.1-dev-sized transformer (19 double + 38 single blocks at width "
                    "3072, 12B parameters; one-layer text encoders at FLUX's widths), RL epochs only (default sd3)")
    ap.add_argument("--layers", type=int, default=0, help="transformer blocks (default: the family's, 24 for SD3.5-M, "
                    "19 double + 38 single for FLUX.1; 1 for a CPU smoke test)")
    ap.add_argument("--width", type=int, default=0, help="flux: transformer width (default 3072; 64 for a CPU smoke "
                    "test)")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="weights and autocast (default bf16)")
    ap.add_argument("--lora-rank", type=int, default=32, help="LoRA rank (= alpha) of the student and the RL "
                    "policy (default 32)")
    ap.add_argument("--text-layers", type=int, default=0, help="keep only the first N layers of each CLIP text "
                    "encoder (default 0 = all; 1 makes a CPU smoke test fast)")
    ap.add_argument("--seed", type=int, default=0, help="seed of weights, prompts' noise, rewards (default 0)")
    g = ap.add_argument_group("sampling (TDM)")
    g.add_argument("--batch", type=int, default=4, help="images per generation call (default 4)")
    g.add_argument("--reps", type=int, default=3, help="timed repetitions per row after one warm-up; the median "
                   "is reported (default 3)")
    g.add_argument("--student-nfe", type=int, default=4, help="student steps at the default boundaries (default 4)")
    g.add_argument("--skip-sampling", action="store_true", help="skip the sampling section")
    g = ap.add_argument_group("RL epochs (benchmark)")
    g.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, DGPO first for the ratios "
                   f"(default {','.join(METHODS)})")
    g.add_argument("--prompts", type=int, default=2, help="P: prompts per epoch (default 2)")
    g.add_argument("--group-size", type=int, default=8, help="G: rollouts per prompt (default 8)")
    g.add_argument("--rollout-steps", type=int, default=10, help="rollout steps (default 10)")
    g.add_argument("--micro-batch", type=int, default=8, help="samples per forward/backward (default 8)")
    g.add_argument("--epochs", type=int, default=2, help="epochs per method; the last is reported (default 2)")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for every method, e.g. rollout.guidance_scale=4.5 (repeatable)")
    g.add_argument("--skip-rl", action="store_true", help="skip the RL section")
    args = ap.parse_args(argv)
    if args.family == "flux":
        args.skip_sampling = True  # the TDM sampling rows are the SD3.5-Medium study's
        if args.methods == ",".join(METHODS):
            args.methods = "dgpo,flow_grpo"
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in args.methods:
        if m not in METHODS:
            ap.error(f"--methods: {m!r} is not one of {list(METHODS)}")
    if args.reps < 1 or args.epochs < 1 or args.batch < 1:
        ap.error("--reps, --epochs and --batch must be >= 1")
    return args


# ------------------------------------------------------------------------------------------- helpers

def build_flux_like(args, dtype):
    """A FLUX.1-dev-sized ``FluxPipeline`` with random weights (``dgpo.models.tiny_pipelines.flux_pipeline`` at
    FLUX's sizes), built on the device: the transformer at full size, the text encoders one layer deep at FLUX's
    widths (CLIP-L 768, T5-XXL 4096), FLUX's VAE."""
    width = args.width or 3072
    double, single = (args.layers, args.layers) if args.layers else (19, 38)
    with torch.device(DEVICE):
        pipe = flux_pipeline(width=width, heads=max(width // 128, 1), double_blocks=double, single_blocks=single,
                             text_width=768 if width >= 768 else width, t5_width=4096 if width >= 768 else width,
                             vae_channels=(128, 256, 512, 512) if width >= 768 else (8, 16, 16, 16),
                             text_tokens=77, seed=args.seed)
    return pipe.to(dtype=dtype)



def _autocast(dtype):
    return torch.autocast(DEVICE, dtype) if dtype != torch.float32 else nullcontext()


def _peak_reset():
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak_gib():
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if DEVICE == "cuda" else None


def _error(e: BaseException) -> str:
    if DEVICE == "cuda" and isinstance(e, torch.cuda.OutOfMemoryError):
        torch.cuda.empty_cache()
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]


def _r(x, n=4):
    return None if x is None else round(float(x), n)


# ------------------------------------------------------------------------------------------- sampling

def composed_generation(model: FlowModel, prompts: list[str], seed: int, sample) -> tuple[np.ndarray, dict]:
    """``generate`` / ``generate_student`` for one batch, piece by piece with a sync between pieces:
    encode the unique prompts, initial noise per seed (on the model's device), the sampling loop, decode
    (``dgpo.sampling.speed.timed_generation``)."""
    return timed_generation(model, prompts, seed, sample)


def time_row(name: str, nfe: int, model, prompts, seed, reps, dtype, sample, helper) -> dict:
    """Warm-up + ``reps`` composed runs (breakdown), then warm-up + ``reps`` runs of the project's helper."""
    row = {"name": name, "nfe_per_image": nfe, "batch": len(prompts)}
    _peak_reset()
    with torch.no_grad(), _autocast(dtype):
        images, _ = composed_generation(model, prompts, seed, sample)  # warm-up (also caches the CFG embedding)
        runs = [composed_generation(model, prompts, seed, sample)[1] for _ in range(reps)]
        for key in ("text_s", "loop_s", "decode_s", "total_s"):
            row[key] = _r(statistics.median(r[key] for r in runs))
        row["runs"] = [{k: _r(v) for k, v in r.items()} for r in runs]
        row["images_per_second"] = _r(len(prompts) / row["total_s"], 3)
        row["image_shape"] = list(images.shape)
        row["peak_mem_gib"] = _peak_gib()
        try:
            helper()
            row["helper_s"] = _r(statistics.median(timed(helper, DEVICE)[1] for _ in range(reps)))
            row["helper_images_per_second"] = _r(len(prompts) / row["helper_s"], 3)
        except Exception as e:  # noqa: BLE001 — recorded, the composed timing stands
            row["helper_error"] = _error(e)
    return row


def sampling_section(pipe, model: FlowModel, args, dtype, report: dict, save) -> list[torch.nn.Parameter]:
    """Teacher rows, then attach the LoRA and time the student (unfused and fused). Returns the LoRA params."""
    prompts = shapes.prompts("test")[: args.batch]
    if len(prompts) < args.batch:  # more images than test prompts: repeat
        prompts = [prompts[i % len(prompts)] for i in range(args.batch)]
    seed = 1000 + args.seed
    sec = report.setdefault("sampling", {"prompts": prompts, "seed_of_first_image": seed, "rows": {}})
    rows = sec["rows"]

    def run(name, nfe, sample, helper):
        t0 = time.perf_counter()
        try:
            rows[name] = time_row(name, nfe, model, prompts, seed, args.reps, dtype, sample, helper)
        except Exception as e:  # noqa: BLE001
            rows[name] = {"name": name, "error": _error(e), "traceback": traceback.format_exc()[-2000:]}
        r = rows[name]
        print(f"[sampling] {name}: {r.get('images_per_second')} images/s "
              f"({time.perf_counter() - t0:.1f} s){'  ERROR ' + r['error'] if 'error' in r else ''}", flush=True)
        save()

    for steps, cfg in ((20, 1.5), (28, 4.5)):
        run(f"teacher_{steps}step_cfg{cfg}", steps * (2 if cfg > 1 else 1),
            lambda e, n, s=steps, c=cfg: sample_ode(model, e, n, s, c, "euler"),
            lambda s=steps, c=cfg: generate(model, prompts, 1, SamplerConfig(s, c, "euler"), seed, len(prompts),
                                            progress=False))

    params = _attach_lora(pipe, args)
    boundaries = default_boundaries(model, args.student_nfe)
    sec["student_boundaries"] = boundaries
    k = args.student_nfe
    student = (lambda e, n: sample_student(model, e, n, boundaries),
               lambda: generate_student(model, prompts, boundaries, 1, seed, len(prompts), progress=False))
    run(f"student_{k}nfe_lora_r{args.lora_rank}", k, *student)
    try:
        pipe.transformer.fuse_lora()
        run(f"student_{k}nfe_lora_fused", k, *student)
    except Exception as e:  # noqa: BLE001
        rows[f"student_{k}nfe_lora_fused"] = {"error": _error(e)}
    finally:
        try:
            pipe.transformer.unfuse_lora()
        except Exception as e:  # noqa: BLE001
            sec["unfuse_error"] = _error(e)

    ref = rows.get(REFERENCE_ROW, {}).get("images_per_second")
    for r in rows.values():
        if ref and r.get("images_per_second"):
            r["speedup_vs_teacher_20step_cfg1.5"] = _r(r["images_per_second"] / ref, 2)
    save()
    return params


def _attach_lora(pipe, args) -> list[torch.nn.Parameter]:
    params = add_lora(pipe.transformer, args.lora_rank, args.lora_rank, seed=args.seed)
    for p in params:
        p.data = p.data.float()  # LoRA weights and AdamW state in fp32, the backbone in bf16 (gpu_scale_check)
    return params


# ------------------------------------------------------------------------------------------- RL epochs

def method_config(method: str, args):
    overrides = [f"objective.name={method}", f"rollout.prompts_per_epoch={args.prompts}",
                 f"rollout.group_size={args.group_size}", f"rollout.steps={args.rollout_steps}",
                 f"model.lora_rank={args.lora_rank}", f"model.lora_alpha={args.lora_rank}",
                 f"optim.micro_batch={args.micro_batch}", f"run.seed={args.seed}",
                 *(["model.mixed_precision=bf16"] if args.dtype == "bf16" else []),
                 f"run.out_dir={Path(args.out) / ('rl-' + method)}", "run.threads=0", *args.set]
    return load_train_config(REPO / "configs" / method / "shapes.yaml", overrides)


def rl_section(model: FlowModel, args, dtype, report: dict, save) -> None:
    """Each method's own recipe on the in-memory model, through :class:`dgpo.trainer.Trainer` itself: its
    epoch times rollout, reward and update and counts NFE; each method gets a fresh LoRA of the same seed."""
    sec = report.setdefault("rl", {"methods": {}})
    for method in args.methods:
        t0 = time.perf_counter()
        out = sec["methods"].setdefault(method, {"label": LABELS[method]})
        trainer = None
        try:
            cfg = method_config(method, args)
            out["config"] = {"rollout": vars(cfg.rollout), "objective": vars(cfg.objective),
                             "optim": vars(cfg.optim), "advantage": vars(cfg.advantage),
                             **({method: vars(getattr(cfg, method))} if hasattr(cfg, method) else {})}
            trainer = Trainer(cfg, log=lambda *a: None, model=model, reward=RandomReward(args.seed))
            out["epochs"] = []
            for _ in range(args.epochs):
                _peak_reset()
                before = trainer.counters.nfe
                row = trainer.epoch()
                nfe = row["nfe"] - before
                out["epochs"].append({
                    "epoch": row["epoch"], "rollout_s": row["rollout_s"], "reward_s": row["reward_s"],
                    "update_s": row["update_s"], "epoch_s": _r(row["rollout_s"] + row["reward_s"] + row["update_s"]),
                    "nfe_rollout": row["rollout_nfe"], "nfe_update": nfe - row["rollout_nfe"],
                    "loss": _r(row["loss"], 6), "grad_norm": _r(row["grad_norm"], 6),
                    "finite": bool(math.isfinite(row["loss"])), "peak_mem_gib": _peak_gib()})
                save()
            out["reported"] = out["epochs"][-1]
        except Exception as e:  # noqa: BLE001
            out["error"] = _error(e)
            out["traceback"] = traceback.format_exc()[-3000:]
        finally:
            if trainer is not None:
                trainer.close()  # the next method gets the bare backbone
            del trainer
        r = out.get("reported", {})
        print(f"[rl] {LABELS[method]}: epoch {r.get('epoch_s')} s (rollout {r.get('rollout_s')}, update "
              f"{r.get('update_s')}), peak {r.get('peak_mem_gib')} GiB ({time.perf_counter() - t0:.1f} s)"
              f"{'  ERROR ' + out['error'] if 'error' in out else ''}", flush=True)
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        save()
    ref = sec["methods"].get("dgpo", {}).get("reported")
    for out in sec["methods"].values():
        r = out.get("reported")
        if ref and r:
            out["ratio_to_dgpo"] = {k: _r(r[k] / ref[k], 2) if ref[k] else None
                                    for k in ("epoch_s", "rollout_s", "update_s")}
    save()


# ------------------------------------------------------------------------------------------- main

def summary(report: dict) -> str:
    lines = [f"device: {report['device']}, {report['args']['resolution']} px, {report['args']['layers']} layers, "
             f"dtype {report['dtype']}, build {report['build_s']:.1f} s, total {report.get('total_s', 0):.0f} s"]
    rows = report.get("sampling", {}).get("rows", {})
    if rows:
        lines.append(f"sampling, batch {report['args']['batch']}, median of {report['args']['reps']}:")
        lines.append(f"  {'row':32s} {'NFE':>4s} {'img/s':>8s} {'speed-up':>8s} {'text s':>8s} {'loop s':>8s} "
                     f"{'decode s':>8s} {'helper img/s':>12s}")
        for name, r in rows.items():
            if "error" in r:
                lines.append(f"  {name:32s} ERROR {r['error']}")
                continue
            helper = f"{r['helper_images_per_second']:.2f}" if "helper_images_per_second" in r else "failed"
            lines.append(f"  {name:32s} {r['nfe_per_image']:4d} {r['images_per_second']:8.2f} "
                         f"{r.get('speedup_vs_teacher_20step_cfg1.5', float('nan')):7.2f}x {r['text_s']:8.3f} "
                         f"{r['loop_s']:8.3f} {r['decode_s']:8.3f} {helper:>12s}")
    methods = report.get("rl", {}).get("methods", {})
    if methods:
        a = report["args"]
        lines.append(f"RL epoch (P={a['prompts']} x G={a['group_size']}, {a['rollout_steps']} steps, LoRA r"
                     f"{a['lora_rank']}, micro-batch {a['micro_batch']}; epoch {a['epochs']} of {a['epochs']}):")
        lines.append(f"  {'method':14s} {'epoch s':>8s} {'rollout s':>9s} {'update s':>8s} {'NFE roll':>8s} "
                     f"{'NFE upd':>8s} {'peak GiB':>8s} {'x DGPO':>7s}")
        for m, out in methods.items():
            r = out.get("reported")
            if not r:
                lines.append(f"  {out['label']:14s} ERROR {out.get('error')}")
                continue
            ratio = out.get("ratio_to_dgpo", {}).get("epoch_s")
            lines.append(f"  {out['label']:14s} {r['epoch_s']:8.2f} {r['rollout_s']:9.2f} {r['update_s']:8.2f} "
                         f"{r['nfe_rollout']:8d} {r['nfe_update']:8d} {str(r['peak_mem_gib']):>8s} "
                         f"{'' if ratio is None else f'{ratio:.2f}':>7s}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    path = Path(args.out) / "gpu_speed_check.json"
    try:  # a rerun replaces its own report; a file of that name it did not write is refused, and left alone
        check_json_output(path, TOOL, overwrite=True, flag="--out")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else f"cpu ({platform.machine()})",
              "torch": torch.__version__, "dtype": args.dtype, "args": vars(args)}

    def save():
        report["total_s"] = time.perf_counter() - t_start
        try:
            write_json_output(path, report, TOOL, overwrite=True, flag="--out", default=str)
        except UserError as e:  # the file was replaced during the work: stop (SystemExit passes `except Exception`)
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2)

    if args.family == "flux":
        pipe, report["build_s"] = timed(lambda: build_flux_like(args, dtype), DEVICE)
        model = FluxModel(pipe, image_size=args.resolution)
    else:
        # --text-layers: smoke tests only (the text encoders dominate a 1-layer CPU run)
        pipe, report["build_s"] = timed(lambda: sd35_medium_pipeline(
            args.resolution, args.layers or 24, args.text_layers, device=DEVICE, dtype=dtype, seed=args.seed), DEVICE)
        model = SD3Model(pipe, max_sequence_length=256)
    report["transformer_params"] = sum(p.numel() for p in pipe.transformer.parameters())
    for m in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.transformer):
        m.requires_grad_(False)
    print(f"built in {report['build_s']:.1f} s on {report['device']}", flush=True)
    save()

    if not args.skip_sampling:
        params = sampling_section(pipe, model, args, dtype, report, save)
        report["lora_params"] = sum(p.numel() for p in params)
        pipe.transformer.delete_adapters("default")  # the RL trainers add their own policy adapter
    if not args.skip_rl:
        rl_section(model, args, dtype, report, save)
    save()
    print(summary(report))
    print(f"wrote {path}")
    failed = [n for n, r in report.get("sampling", {}).get("rows", {}).items() if "error" in r]
    failed += [m for m, r in report.get("rl", {}).get("methods", {}).items() if "error" in r]
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
