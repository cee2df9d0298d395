"""DGPO at SD3.5-Medium scale on one GPU: the recipe's own epoch with a full-size config.

Builds a StableDiffusion3Pipeline with SD3.5-Medium-sized parts from config (random weights: nothing can be
downloaded; ``dgpo.models.tiny_pipelines.sd35_medium_pipeline``) — an MM-DiT-X transformer (24 blocks, width
1536, dual attention in blocks 0–12, RMS qk-norm), the SD3 VAE, CLIP-L/G-sized text encoders over a locally built
tokenizer, no T5 but 256 zero T5 tokens as SD3.5 sees — and runs DGPO epochs through the recipe itself:
:class:`dgpo.trainer.Trainer` on the in-memory model (``Trainer(cfg, model=..., reward=...)``), whose epoch is
that of any ``dgpo train`` run: LoRA on the attention projections (fp32 weights and AdamW state, the backbone in
bf16 under bf16 autocast), ODE rollouts with CFG 4.5, group advantages, the DGPO loss at the config defaults
(β 100, t_min 0.4, M = 1 noise level per sample, no KL term), gradients clipped at norm 1, AdamW (lr 1e-4,
weight decay 0.01). The knobs are the recipe's config keys: ``--micro-batch`` is ``optim.micro_batch``,
``--gradient-checkpointing`` ``model.gradient_checkpointing``, ``--dtype`` ``model.weights_dtype`` and
``model.mixed_precision``; ``--set KEY=VALUE`` passes any other. It checks what must hold at any scale — the
loss equals log 2 at θ = ref, gradients are finite and non-zero, the LoRA moves the policy away from the
reference — and measures per epoch: seconds in sampling, VAE decode, reward and update, transformer passes
(NFE) of the rollout and of the update, and peak GPU memory.

Random weights make every image score the same under the shapes verifier, so rewards are uniform random
(``dgpo.rewards.random_reward.RandomReward``): this is a throughput and correctness check, not a learning check.

    python scripts/gpu_scale_check.py --out OUT_DIR
    python scripts/gpu_scale_check.py --out OUT_DIR --gradient-checkpointing --micro-batch 16
    OMP_NUM_THREADS=1 python scripts/gpu_scale_check.py --out OUT --layers 1 --resolution 64 --text-layers 1 \
        --dtype fp32 --rollout-steps 2 --group-size 2 --epochs 2          # CPU smoke test

Writes ``OUT_DIR/gpu_scale_check.json`` (device, arguments, the recipe's config, one row per epoch, the checks).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from dgpo.errors import UserError
from dgpo.models.handle import FlowModel, SD3Model
from dgpo.models.tiny_pipelines import sd35_medium_pipeline
from dgpo.rewards.random_reward import RandomReward
from dgpo.runtime.output_dir import check_json_output, write_json_output
from dgpo.sampling.generation import timed
from dgpo.trainer import Trainer, load_train_config

TOOL = "gpu_scale_check"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU only for a smoke test with --layers 1


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (gpu_scale_check.json is written there)")
    ap.add_argument("--resolution", type=int, default=512, help="image size in pixels (default 512)")
    ap.add_argument("--layers", type=int, default=24, help="transformer blocks (default 24, SD3.5-Medium's; 1 for "
                    "a CPU smoke test)")
    ap.add_argument("--text-layers", type=int, default=0, help="only the first N layers of each CLIP text encoder "
                    "(default 0 = all; 1 makes a CPU smoke test fast)")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="frozen weights and autocast: "
                    "model.weights_dtype and model.mixed_precision (default bf16)")
    ap.add_argument("--prompts", type=int, default=2, help="P: prompts per epoch (rollout.prompts_per_epoch)")
    ap.add_argument("--group-size", type=int, default=8, help="G: rollouts per prompt (rollout.group_size)")
    ap.add_argument("--rollout-steps", type=int, default=10, help="rollout steps (rollout.steps)")
    ap.add_argument("--micro-batch", type=int, default=8, help="samples per forward/backward (optim.micro_batch)")
    ap.add_argument("--lora-rank", type=int, default=32, help="LoRA rank = alpha (model.lora_rank, lora_alpha)")
    ap.add_argument("--epochs", type=int, default=3, help="epochs; the first carries the warm-up (default 3)")
    ap.add_argument("--gradient-checkpointing", action="store_true", help="model.gradient_checkpointing=true")
    ap.add_argument("--seed", type=int, default=0, help="seed of the weights, the run and the rewards (default 0)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="any other config override, e.g. objective.timesteps_per_sample=4 (repeatable)")
    args = ap.parse_args(argv)
    if args.epochs < 1:
        ap.error("--epochs must be >= 1")
    return args


def scale_config(args):
    """The DGPO recipe of this check: the config defaults (β 100, t_min 0.4, M = 1, no KL) with the check's
    sizes, CFG 4.5 rollouts, AdamW at lr 1e-4 and weight decay 0.01, and the arguments' knobs."""
    bf16 = args.dtype == "bf16"
    overrides = ["objective.name=dgpo", f"rollout.prompts_per_epoch={args.prompts}",
                 f"rollout.group_size={args.group_size}", f"rollout.steps={args.rollout_steps}",
                 "rollout.guidance_scale=4.5", "rollout.solver=euler", f"model.lora_rank={args.lora_rank}",
                 f"model.lora_alpha={args.lora_rank}",
                 f"model.gradient_checkpointing={str(args.gradient_checkpointing).lower()}",
                 f"model.weights_dtype={'bf16' if bf16 else 'fp32'}", f"model.mixed_precision={'bf16' if bf16 else 'no'}",
                 f"optim.micro_batch={args.micro_batch}", "optim.lr=1e-4", "optim.weight_decay=0.01",
                 "optim.grad_clip=1.0", f"run.seed={args.seed}", f"run.out_dir={Path(args.out) / 'run'}",
                 "run.threads=0", *args.set]
    return load_train_config(None, overrides)


class DecodeTimer:
    """Times the model's VAE decode inside the trainer's rollout (which the trainer times as one: sampling +
    decode), and keeps the decoded images' shape."""

    def __init__(self, model: FlowModel):
        self.decode = model.decode_latents
        self.seconds, self.shape = 0.0, None
        model.decode_latents = self

    def __call__(self, latents, *args, **kwargs):
        images, seconds = timed(lambda: self.decode(latents, *args, **kwargs), DEVICE)
        self.seconds += seconds
        self.shape = list(images.shape)
        return images

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def _peak_reset():
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak_gib():
    return torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else None


def main(argv=None) -> int:
    args = parse_args(argv)
    path = Path(args.out) / "gpu_scale_check.json"
    try:  # a rerun replaces its own report; a file of that name it did not write is refused, and left alone
        check_json_output(path, TOOL, overwrite=True, flag="--out")
        cfg = scale_config(args)  # a bad --set fails before the build
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    pipe, t_build = timed(lambda: sd35_medium_pipeline(args.resolution, args.layers, args.text_layers,
                                                       device=DEVICE, dtype=dtype, seed=args.seed), DEVICE)
    n_params = sum(p.numel() for p in pipe.transformer.parameters())
    model = SD3Model(pipe, max_sequence_length=256)
    decode = DecodeTimer(model)
    trainer = Trainer(cfg, log=lambda *a: None, model=model, reward=RandomReward(args.seed))
    report = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "transformer_params": n_params,
              "lora_params": sum(p.numel() for p in trainer.params), "build_s": t_build, "args": vars(args),
              "config": {"model": vars(cfg.model), "rollout": vars(cfg.rollout), "objective": vars(cfg.objective),
                         "optim": vars(cfg.optim), "advantage": vars(cfg.advantage)},
              "epochs": []}
    for epoch in range(args.epochs):
        _peak_reset()
        before = trainer.counters.nfe
        row = trainer.epoch()
        decode_s = decode.take()
        nfe = row["nfe"] - before
        grad_norm = row.get("grad_norm", float("nan"))  # absent: a non-finite step, not taken
        out = {"epoch": epoch, "rollout_s": round(row["rollout_s"] - decode_s, 3), "decode_s": round(decode_s, 3),
               "reward_s": row.get("reward_s"), "update_s": row.get("update_s"),
               "epoch_s": round(row["rollout_s"] + row.get("reward_s", 0.0) + row.get("update_s", 0.0), 3),
               "nfe_rollout": row["rollout_nfe"], "nfe_update": nfe - row["rollout_nfe"], "loss": row["loss"],
               "loss_gap": row.get("loss_gap", float("nan")), "grad_norm": grad_norm, "image_shape": decode.shape,
               "peak_mem_gib": _peak_gib()}
        print(json.dumps(out), flush=True)
        report["epochs"].append(out)
    trainer.close()
    first = report["epochs"][0]
    report["checks"] = {
        "loss_is_log2_at_init": abs(first["loss"] - math.log(2)) < 1e-3,
        "grad_finite_nonzero": all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in report["epochs"]),
        "policy_moves_from_reference": report["epochs"][-1]["loss_gap"] > 0,
    }
    print(json.dumps(report["checks"]))
    try:
        write_json_output(path, report, TOOL, overwrite=True, flag="--out", default=str)
    except UserError as e:  # the folder changed during the work
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
