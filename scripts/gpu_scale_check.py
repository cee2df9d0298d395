"""DGPO at SD3.5-Medium scale on one GPU: the toy's code path with a full-size config.

Builds a StableDiffusion3Pipeline with SD3.5-Medium-sized parts from config (random weights: nothing can be
downloaded) — an MM-DiT-X transformer (24 blocks, width 1536, dual attention in blocks 0–12, RMS qk-norm),
the SD3 VAE, CLIP-L/G-sized text encoders over a locally built tokenizer, no T5 but 256 zero T5 tokens as
SD3.5 sees — and runs DGPO epochs through the project's own pieces (LoRA on the attention projections,
ODE rollouts with CFG, group advantages, ``dgpo_backward``, AdamW). It checks what must hold at any
scale — the loss equals log 2 at θ = ref, gradients are finite and non-zero, the LoRA moves the
policy away from the reference — and measures time per phase and peak GPU memory.

Random weights make every image score the same under the shapes verifier, so ``--reward random`` (the
default here) draws uniform rewards: this is a throughput and correctness check, not a learning check.

    python scripts/gpu_scale_check.py --out OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from dgpo.errors import UserError
from dgpo.methods.batch import RolloutBatch
from dgpo.methods.dgpo import dgpo_backward
from dgpo.models.handle import SD3Model
from dgpo.models.lora import add_lora
from dgpo.runtime.output_dir import check_json_output, write_json_output
from dgpo.worlds.shapes_base.pretrain import world_vocabulary
from dgpo.worlds.shapes_base.tokenizer import build_clip_tokenizer
from dgpo.methods.losses import group_advantages
from dgpo.sampling import generation
from dgpo.sampling.ode import sample_ode
from dgpo.train_config import ObjectiveConfig
from dgpo.worlds import shapes


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU only for a smoke test with --layers 1


def build_sd35m_like(resolution: int, layers: int, dtype) -> StableDiffusion3Pipeline:
    with torch.device(DEVICE):  # initialise on the GPU: a 2B-parameter CPU init takes minutes
        return _build(resolution, layers).to(dtype=dtype)


def _build(resolution: int, layers: int) -> StableDiffusion3Pipeline:
    latent = resolution // 8
    transformer = SD3Transformer2DModel(
        sample_size=latent, patch_size=2, in_channels=16, out_channels=16, num_layers=layers, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        pos_embed_max_size=384, dual_attention_layers=tuple(range(min(13, layers))), qk_norm="rms_norm")
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=2, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                        use_post_quant_conv=False)
    tok = build_clip_tokenizer(world_vocabulary(), 77)

    def clip(hidden, n_layers, heads):
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden, projection_dim=hidden,
            num_hidden_layers=n_layers, num_attention_heads=heads, max_position_embeddings=77, hidden_act="gelu",
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id))

    pipe = StableDiffusion3Pipeline(transformer=transformer, vae=vae, text_encoder=clip(768, 12, 12), tokenizer=tok,
                                    text_encoder_2=clip(1280, 32, 20), tokenizer_2=tok, text_encoder_3=None,
                                    tokenizer_3=None, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def timed(fn):
    """``(fn(), seconds)``, the GPU synchronised before and after (``dgpo.sampling.generation.timed``)."""
    return generation.timed(fn, DEVICE)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--rollout-steps", type=int, default=10)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--lora-rank", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    args = ap.parse_args()
    path = Path(args.out) / "gpu_scale_check.json"
    try:  # a rerun replaces its own report; a file of that name it did not write is refused, and left alone
        check_json_output(path, "gpu_scale_check", overwrite=True, flag="--out")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    torch.manual_seed(0)
    dtype = torch.bfloat16
    pipe, t_build = timed(lambda: build_sd35m_like(args.resolution, args.layers, dtype))
    n_params = sum(p.numel() for p in pipe.transformer.parameters())
    params = add_lora(pipe.transformer, args.lora_rank, args.lora_rank)
    for p in params:
        p.data = p.data.float()  # LoRA weights and AdamW state in fp32, the backbone in bf16
    if args.gradient_checkpointing:
        pipe.transformer.enable_gradient_checkpointing()
    model = SD3Model(pipe, max_sequence_length=256)
    opt = torch.optim.AdamW(params, lr=1e-4)
    cfg = ObjectiveConfig(beta=100.0, t_min=0.4)
    prompts = shapes.prompts("train")[: args.prompts]
    flat = [p for p in prompts for _ in range(args.group_size)]
    group_ids = torch.arange(len(prompts)).repeat_interleave(args.group_size)
    gen = torch.Generator().manual_seed(0)
    report = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "transformer_params": n_params,
              "lora_params": sum(p.numel() for p in params), "build_s": t_build, "args": vars(args), "epochs": []}
    for epoch in range(args.epochs):
        if DEVICE == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with torch.no_grad(), torch.autocast(DEVICE, dtype):
            embeds = model.encode_prompts(flat)
            noise = torch.randn((len(flat), *model.latent_shape), generator=gen).to(DEVICE)
            latents, t_roll = timed(lambda: sample_ode(model, embeds, noise, args.rollout_steps, 4.5, "euler"))
            images, t_dec = timed(lambda: model.decode_latents(latents))
        rewards = torch.rand(len(flat), generator=gen)
        adv = group_advantages(rewards, group_ids)
        batch = RolloutBatch(latents.float(), embeds, adv.to(DEVICE), group_ids.to(DEVICE))

        def update():
            with torch.autocast(DEVICE, dtype):
                return dgpo_backward(model, batch, cfg, 3.0, gen, args.micro_batch, lambda l: l.backward())

        stats, t_upd = timed(update)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0).item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        row = {"epoch": epoch, "rollout_s": t_roll, "decode_s": t_dec, "update_s": t_upd, "loss": stats["loss"],
               "loss_gap": stats["loss_gap"], "grad_norm": grad_norm, "image_shape": list(images.shape),
               "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else None}
        print(json.dumps(row), flush=True)
        report["epochs"].append(row)
    first = report["epochs"][0]
    report["checks"] = {
        "loss_is_log2_at_init": abs(first["loss"] - math.log(2)) < 1e-3,
        "grad_finite_nonzero": all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in report["epochs"]),
        "policy_moves_from_reference": report["epochs"][-1]["loss_gap"] > 0,
    }
    print(json.dumps(report["checks"]))
    try:
        write_json_output(path, report, "gpu_scale_check", overwrite=True, flag="--out")
    except UserError as e:  # the folder changed during the work
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
