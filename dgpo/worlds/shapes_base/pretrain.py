"""Pretrain the embedded base model on renders of a world, on the CPU, and cache it by its config.

Two stages, both supervised on free, always-correct renders, and an optional third:

1. the autoencoder: L = |D(μ(x)) − x|₁ + ‖D(μ(x)) − x‖² + λ_KL·KL(q(z|x) ‖ N(0, I)), decoding the
   posterior mean μ (sampling z with a tiny λ_KL only adds noise and blurs edges the verifier needs
   sharp; the L1 term sharpens them too), then the latent statistics set the
   VAE's ``shift_factor`` (mean) and ``scaling_factor`` (1 / std) so that scaled latents are ~unit variance;
2. flow matching on the scaled latents (SD3, Esser et al. 2024, Eq. 1–2 and §3.1): σ from a logit-normal
   density pushed through the schedule's shift, x_σ = (1 − σ)·x₀ + σ·ε and
   L = ‖(ε − x₀) − v_θ(x_σ, σ, c)‖²; the prompt is replaced by "" with probability ``caption_dropout`` so
   that classifier-free guidance works. The CLIP text encoders train jointly (at their own learning rate):
   frozen random encoders cannot bind colour words to shape words, trained ones can;
3. (optional, ``decoder.steps > 0``) decoder-only refinement: the encoder stays frozen, so the latent space
   the transformer was trained on is unchanged, and the decoder alone minimises |D(z̃) − x|₁ + ‖D(z̃) − x‖²
   with z̃ = E(x) + s·ε (scaled units, ``decoder.latent_noise`` = s) so that it also decodes the slightly
   off-manifold latents a sampler produces. Sharper decoding matters here because the verifier reads shape
   from fill ratios: a square with soft corners reads as a circle. Because stage 3 does not touch stages
   1–2, a base that differs only in ``decoder`` reuses the cached stage-1–2 base and runs stage 3 alone.

The weights saved are an exponential moving average of the trained ones.

Captions (``data.captions``): the benchmark prompts (``benchmark``), or the world's compositional caption
grammar without the held-out captions (``grammar``, :func:`dgpo.worlds.shapes_captions.pretraining_captions`),
each pool entry's caption corrupted with probability 1 − ``data.fidelity``
(:mod:`dgpo.worlds.shapes_fidelity`) while its image stays the true render.

Pretraining is resumable: :func:`ensure_base` works in ``<key>.partial/`` beside the cache entry
(:mod:`dgpo.worlds.shapes_base.pretrain_state`), keeps stage 1's autoencoder there and checkpoints the flow stage every
``flow.checkpoint_every`` steps; a call stopped (``stop``, ``dgpo pretrain --max-minutes``) or killed
continues from there on the next call with the same config and ends with the same weights.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from tqdm.auto import tqdm

from dgpo.config import option, section, to_dict
from dgpo.runtime.ema import EMA
from dgpo.models.handle import FlowModel, SD3Model, flow_interpolate
from dgpo.worlds.shapes_base.pretrain_state import PartialBase
from dgpo.worlds.shapes_base.shipped import shipped_base
from dgpo.worlds.shapes_base.tiny_sd3 import BaseModelConfig, build_pipeline, usage_note
from dgpo.paths import cache_root, config_hash, exclusive_lock
from dgpo.sampling.ode import shift_sigmas
from dgpo.worlds import shapes, shapes_captions, shapes_fidelity

PRETRAIN_VERSION = "1"  # bump when the training code changes what a config produces


@dataclass
class DataConfig:
    renders_per_prompt: int = option(160, "renders per caption in the training pool (different seeds)", min=1)
    split: str = option("all", "which benchmark prompts the base sees with captions=benchmark ('all' = the "
                        "world's whole benchmark; grammar captions are held out from test prompts anyway)",
                        choices=("all", "train"))
    captions: str = option("benchmark", "pretraining captions: 'benchmark' = the benchmark prompts of `split`; "
                           "'grammar' = the world's compositional caption grammar minus the held-out captions",
                           choices=("benchmark", "grammar"))
    fidelity: float = option(1.0, "probability that a pool entry keeps its true caption (else one web-like "
                             "corruption: relation swapped/dropped, a colour wrong, a count off by one)",
                             min=0.0, max=1.0)


@dataclass
class VaeTrainConfig:
    steps: int = option(1500, "autoencoder optimiser steps", min=0)
    batch_size: int = option(32, "images per step", min=1)
    lr: float = option(2e-3, "Adam learning rate", min=0.0)
    kl_weight: float = option(1e-6, "weight of the KL term", min=0.0)


@dataclass
class FlowTrainConfig:
    steps: int = option(5000, "flow-matching optimiser steps", min=0)
    batch_size: int = option(64, "latents per step", min=1)
    lr: float = option(5e-4, "AdamW learning rate of the transformer", min=0.0)
    text_lr: float = option(2e-4, "AdamW learning rate of the CLIP text encoders (0 = frozen)", min=0.0)
    warmup_steps: int = option(200, "linear learning-rate warm-up", min=0)
    weight_decay: float = option(0.0, "AdamW weight decay", min=0.0)
    grad_clip: float = option(1.0, "global gradient-norm clip", min=0.0)
    caption_dropout: float = option(0.1, "probability of training on the empty prompt (for CFG)", min=0.0, max=1.0)
    logit_mean: float = option(0.0, "mean of the logit-normal timestep density", min=-5.0, max=5.0)
    logit_std: float = option(1.0, "std of the logit-normal timestep density", min=0.01)
    ema_decay: float = option(0.999, "EMA decay of the saved weights (0 = no EMA)", min=0.0, max=1.0)
    checkpoint_every: int = option(500, "write a resumable checkpoint every N steps (0 = only when stopped "
                                   "early or done); changes no weight, so not part of the cache key", min=0)


@dataclass
class DecoderRefineConfig:
    steps: int = option(0, "decoder-only refinement steps after the flow stage (0 = off)", min=0)
    batch_size: int = option(64, "images per step", min=1)
    lr: float = option(5e-4, "Adam learning rate (cosine-decayed)", min=0.0)
    latent_noise: float = option(0.1, "std of the noise added to scaled latents while refining", min=0.0)


@dataclass
class PretrainConfig:
    world: str = option("shapes", "the embedded world to pretrain on", choices=("shapes",))
    seed: int = option(0, "seed of initialisation, data and noise", min=0)
    threads: int = option(0, "torch CPU threads (0 = torch's default)", min=0)
    model: BaseModelConfig = section(BaseModelConfig, "architecture")
    data: DataConfig = section(DataConfig, "training data")
    vae: VaeTrainConfig = section(VaeTrainConfig, "autoencoder stage")
    flow: FlowTrainConfig = section(FlowTrainConfig, "flow-matching stage")
    decoder: DecoderRefineConfig = section(DecoderRefineConfig, "optional decoder-only refinement stage")


def load_pretrain_config(path, overrides=()) -> PretrainConfig:
    from dgpo.config import load_config
    return load_config(PretrainConfig, path, overrides)


def base_key(cfg: PretrainConfig) -> str:
    """Cache key of a base: the hash of everything that changes the weights.

    Keys that change no weight (``threads``, ``flow.checkpoint_every``) are left out, and so are keys at the
    value that reproduces a recipe from before they existed (``data.captions: benchmark``, ``data.fidelity:
    1.0``, ``decoder.steps: 0``), so such a base keeps the key it was cached under.
    """
    d = to_dict(cfg)
    d.pop("threads")
    d["flow"].pop("checkpoint_every")
    if d["data"]["captions"] == "benchmark":
        d["data"].pop("captions")
    if d["data"]["fidelity"] == 1.0:
        d["data"].pop("fidelity")
    if d["decoder"]["steps"] == 0:
        d.pop("decoder")  # without stage 3 the key is the stage-1–2 key (bases cached before stage 3 existed)
    return config_hash({"version": PRETRAIN_VERSION, **d})


def stage12_config(cfg: PretrainConfig) -> PretrainConfig:
    """The same recipe without the decoder refinement: the base that stage 3 starts from."""
    from dataclasses import replace
    return replace(cfg, decoder=replace(cfg.decoder, steps=0))


def base_dir(cfg: PretrainConfig) -> Path:
    return cache_root() / "base" / base_key(cfg)


def is_cached(cfg: PretrainConfig) -> bool:
    return (base_dir(cfg) / "model_index.json").is_file()


def partial_dir(cfg: PretrainConfig) -> Path:
    """The work folder of an unfinished pretraining of ``cfg`` (stage-1 autoencoder, flow checkpoints)."""
    final = base_dir(cfg)
    return final.with_name(f"{final.name}.partial")


def _lock_file(cfg: PretrainConfig) -> Path:
    final = base_dir(cfg)
    return final.with_name(f"{final.name}.lock")


# ------------------------------------------------------------------------------------------- data

def world_vocabulary() -> list[str]:
    """Every word of the world's prompts and captions (the benchmark's words are all among the grammar's):
    the tokenizer's vocabulary."""
    return sorted({w for p in shapes.prompts("all") + shapes_captions.captions() for w in p.split()})


def pool_captions(cfg: PretrainConfig) -> list[str]:
    """The true captions of the render pool: the benchmark prompts of ``data.split`` (canonical order), or
    :func:`dgpo.worlds.shapes_captions.pretraining_captions` (576, sorted) for ``data.captions: grammar``."""
    if cfg.data.captions == "grammar":
        return shapes_captions.pretraining_captions()
    return shapes.prompts(cfg.data.split)


def render_pool(cfg: PretrainConfig) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Renders (N, S, S, 3) uint8, the caption list, and each render's caption index (N,).

    ``renders_per_prompt`` renders of every caption of :func:`pool_captions`, render i of a caption with
    seed ``seed·1000003 + i`` (10,000–14,000 renders/s at S = 32 on one core: the grammar's 576 × 160
    take 6–10 s, and hold 283 MB of images and 377 MB of latents).
    """
    prompt_list = pool_captions(cfg)
    n = cfg.data.renders_per_prompt
    images = np.stack([shapes_captions.render_caption(p, size=cfg.model.image_size, seed=cfg.seed * 1_000_003 + i)
                       for p in tqdm(prompt_list, desc="render pool", leave=False) for i in range(n)])
    prompt_idx = np.repeat(np.arange(len(prompt_list)), n)
    return images, prompt_list, prompt_idx


def training_captions(cfg: PretrainConfig, prompt_list: list[str], prompt_idx: np.ndarray
                      ) -> tuple[list[str], np.ndarray]:
    """The captions the flow stage trains each pool entry with: the true one, or with probability
    1 − ``data.fidelity`` one corruption of it (:func:`dgpo.worlds.shapes_fidelity.with_fidelity`, restricted
    to the pool's caption set), drawn per entry in pool order from a generator seeded by (seed, 0xF1DE).

    Returns (distinct captions, each entry's index into them); with fidelity 1 that is the input.
    """
    if cfg.data.fidelity == 1.0:
        return prompt_list, prompt_idx
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0xF1DE]))
    noisy = shapes_fidelity.with_fidelity([prompt_list[i] for i in prompt_idx], cfg.data.fidelity, rng,
                                          allowed=prompt_list)
    distinct = sorted(set(noisy))
    where = {c: i for i, c in enumerate(distinct)}
    return distinct, np.array([where[c] for c in noisy], dtype=np.int64)


def _to_unit(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# ------------------------------------------------------------------------------------------- VAE

def train_vae(vae, images: np.ndarray, cfg: VaeTrainConfig, gen: torch.Generator) -> list[float]:
    """Autoencoder stage: minimise |D(μ) − x|₁ + ‖D(μ) − x‖² + λ·KL; returns the loss curve."""
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.steps, 1), eta_min=cfg.lr * 0.05)
    losses = []
    bar = tqdm(range(cfg.steps), desc="pretrain 1/2: autoencoder")
    for _ in bar:
        idx = torch.randint(len(images), (cfg.batch_size,), generator=gen)
        x = _to_unit(images[idx.numpy()])
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.mode()).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + cfg.kl_weight * dist.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    return losses


@torch.no_grad()
def encode_pool(vae, images: np.ndarray, batch: int = 256) -> torch.Tensor:
    """Unscaled latent means E(x) of every image, (N, C, h, w)."""
    return torch.cat([vae.encode(_to_unit(images[i:i + batch])).latent_dist.mode()
                      for i in range(0, len(images), batch)])


def set_latent_scale(vae, latents: torch.Tensor, shift: float | None = None, std: float | None = None
                     ) -> torch.Tensor:
    """Set shift_factor = mean, scaling_factor = 1 / std of the latents; return scaled (latents − mean) / std.

    ``shift`` and ``std`` given (a resumed pretraining) replace the latents' own statistics.
    """
    shift = latents.mean().item() if shift is None else shift
    std = latents.std().item() if std is None else std
    vae.register_to_config(shift_factor=shift, scaling_factor=1.0 / std)
    return (latents - shift) / std


@torch.no_grad()
def reconstruction_accuracy(model: FlowModel, images: np.ndarray, prompt_list: list[str], prompt_idx: np.ndarray,
                            batch: int = 256) -> float:
    """Fraction of renders whose VAE reconstruction still scores 1 under the verifier."""
    ok = 0
    for i in range(0, len(images), batch):
        recon = model.decode_latents(model.encode_images(images[i:i + batch]))
        ok += sum(shapes_captions.score_caption(r, prompt_list[j]) for r, j in zip(recon, prompt_idx[i:i + batch]))
    return ok / len(images)


def refine_decoder(vae, images: np.ndarray, cfg: DecoderRefineConfig, gen: torch.Generator) -> list[float]:
    """Stage 3: train only the decoder on D(E(x) + s·ε·std) ≈ x; the encoder and latent scale stay fixed."""
    vae.requires_grad_(False)
    params = list(vae.decoder.parameters())
    if getattr(vae, "post_quant_conv", None) is not None:
        params += list(vae.post_quant_conv.parameters())
    for p in params:
        p.requires_grad_(True)
    latents = encode_pool(vae, images)  # unscaled means; the noise is given in scaled (unit-variance) units
    noise_std = cfg.latent_noise / vae.config.scaling_factor
    opt = torch.optim.Adam(params, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.steps, 1), eta_min=cfg.lr * 0.05)
    vae.decoder.train()
    losses = []
    bar = tqdm(range(cfg.steps), desc="pretrain 3: decoder refinement")
    for _ in bar:
        idx = torch.randint(len(images), (cfg.batch_size,), generator=gen)
        x = _to_unit(images[idx.numpy()])
        z = latents[idx] + noise_std * torch.randn(latents[idx].shape, generator=gen)
        recon = vae.decode(z).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    vae.eval()
    vae.requires_grad_(False)
    return losses


def reconstruction_check(model: FlowModel, images, prompt_list, prompt_idx, n: int = 2000) -> float:
    """Reconstruction accuracy on an evenly spaced subset of ``n`` renders."""
    check = np.linspace(0, len(images) - 1, min(len(images), n)).astype(int)
    return reconstruction_accuracy(model, images[check], prompt_list, prompt_idx[check])


# ------------------------------------------------------------------------------------------- flow

def sample_sigmas(n: int, cfg: FlowTrainConfig, shift: float, gen: torch.Generator) -> torch.Tensor:
    """σ = shift(sigmoid(u)), u ~ N(m, s²): SD3's logit-normal timestep density on the shifted schedule."""
    u = torch.randn(n, generator=gen) * cfg.logit_std + cfg.logit_mean
    return shift_sigmas(torch.sigmoid(u), shift)


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(total - warmup, 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return f


class FlowPaused(Exception):
    """The flow stage stopped before its last step (``stop`` said so) after writing a checkpoint."""

    def __init__(self, step: int, total: int, folder: Path):
        self.step, self.total, self.folder = step, total, folder
        super().__init__(f"pretraining stopped at flow step {step} of {total}; its checkpoint is in {folder}. "
                         "Run the same command again to continue from there.")


def train_flow(model: FlowModel, latents: torch.Tensor, prompt_list: list[str], prompt_idx: np.ndarray,
               cfg: FlowTrainConfig, shift: float, gen: torch.Generator, work: PartialBase | None = None,
               stop=None, log=print) -> list[float]:
    """Flow-matching stage on pre-encoded scaled latents; returns the loss curve (EMA applied at the end).

    With ``work``, training starts from the newest checkpoint there (if any) and writes one every
    ``cfg.checkpoint_every`` steps and after the last; ``stop(steps_done)``, asked after every step, may end
    the stage early: a checkpoint is written and :class:`FlowPaused` raised.
    """
    pipe = model.pipe
    modules = {"transformer": pipe.transformer}
    groups = [{"params": pipe.transformer.parameters(), "lr": cfg.lr}]
    if cfg.text_lr > 0:
        modules.update(text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2)
        groups.append({"params": [p for m in (pipe.text_encoder, pipe.text_encoder_2) for p in m.parameters()],
                       "lr": cfg.text_lr})
    for m in (pipe.text_encoder, pipe.text_encoder_2):
        m.requires_grad_(cfg.text_lr > 0)
    for m in modules.values():
        m.train()
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup_steps, cfg.steps))
    ema = (EMA([p for m in modules.values() for p in m.parameters()], cfg.ema_decay) if cfg.ema_decay > 0
           else None)
    params = [p for g in opt.param_groups for p in g["params"]]
    losses, start, seconds = [], 0, 0.0
    resumed = work.load_flow(modules, opt, sched, ema, {"data": gen}) if work is not None else None
    if resumed is not None:
        start, info = resumed
        losses, seconds = info["losses"], info["seconds"]
        log(f"resuming the flow stage at step {start} of {cfg.steps} from {work.folder}")
    t0 = time.time()

    def checkpoint(done: int) -> None:
        info = {"losses": losses, "seconds": seconds + time.time() - t0}
        work.save_flow(done, modules, opt, sched, ema, {"data": gen}, info)

    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="pretrain 2/2: flow matching")
    for step in bar:
        idx = torch.randint(len(latents), (cfg.batch_size,), generator=gen)
        x0 = latents[idx]
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.caption_dropout
        batch_prompts = ["" if d else prompt_list[prompt_idx[i]] for i, d in zip(idx.tolist(), drop.tolist())]
        noise = torch.randn(x0.shape, generator=gen)
        sigma = sample_sigmas(cfg.batch_size, cfg, shift, gen)
        embeds = model.encode_prompts(batch_prompts)
        v = model.velocity(flow_interpolate(x0, noise, sigma), sigma, embeds)
        loss = F.mse_loss(v, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        if ema is not None:
            ema.update(step)
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-200:]):.4f}")
        done = step + 1
        paused = work is not None and stop is not None and done < cfg.steps and stop(done)
        if work is not None and (paused or done == cfg.steps
                                 or (cfg.checkpoint_every > 0 and done % cfg.checkpoint_every == 0)):
            checkpoint(done)
        if paused:
            bar.close()
            raise FlowPaused(done, cfg.steps, work.folder)
    if ema is not None:
        ema.copy_to_params()
    for m in modules.values():
        m.eval()
    return losses


# ------------------------------------------------------------------------------------------- recipe

def pretrain(cfg: PretrainConfig, out_dir: str | Path, log=print, work: PartialBase | None = None,
             stop=None) -> dict:
    """Train a base from scratch and save it with ``save_pretrained`` into ``out_dir``; returns a summary.

    With ``work`` the stage-1 autoencoder and the flow-stage checkpoints are kept there, and whatever is
    already there is continued instead of redone (``stop``: see :func:`train_flow`; it needs ``work``).
    """
    if stop is not None and work is None:
        raise ValueError("pretrain: stopping early needs a work folder to continue from (pass work=)")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.time()
    gen = torch.Generator().manual_seed(cfg.seed)
    words = world_vocabulary()
    pipe = build_pipeline(cfg.model, words, seed=cfg.seed)
    pipe.set_progress_bar_config(disable=True)
    model = SD3Model(pipe, max_sequence_length=cfg.model.t5_tokens)
    images, prompt_list, prompt_idx = render_pool(cfg)
    log(f"render pool: {len(images)} images of {len(prompt_list)} captions ({cfg.data.captions}, "
        f"fidelity {cfg.data.fidelity})")

    stage1 = work.load_autoencoder(pipe.vae, {"data": gen}) if work is not None else None
    if stage1 is None:
        vae_losses = train_vae(pipe.vae, images, cfg.vae, gen)
    else:
        log(f"autoencoder: reusing stage 1 from {work.folder}")
    pipe.vae.eval()
    pipe.vae.requires_grad_(False)
    latents = encode_pool(pipe.vae, images)
    if stage1 is None:
        shift, std = latents.mean().item(), latents.std().item()
        latents = set_latent_scale(pipe.vae, latents, shift, std)
        recon_acc = reconstruction_check(model, images, prompt_list, prompt_idx)
        log(f"autoencoder: reconstructions that still score 1: {recon_acc:.4f}")
        stage1 = {"latent_shift": shift, "latent_std": std, "seconds_vae": round(time.time() - t0, 1),
                  "vae_final_loss": float(np.mean(vae_losses[-50:])) if vae_losses else None,
                  "vae_reconstruction_accuracy": recon_acc}
        if work is not None:
            work.save_autoencoder(pipe.vae, {"data": gen}, stage1)
    else:
        latents = set_latent_scale(pipe.vae, latents, stage1["latent_shift"], stage1["latent_std"])

    train_list, train_idx = training_captions(cfg, prompt_list, prompt_idx)
    t_flow = time.time()
    flow_losses = train_flow(model, latents, train_list, train_idx, cfg.flow, cfg.model.shift, gen,
                             work=work, stop=stop, log=log)
    seconds_flow = time.time() - t_flow
    if work is not None and (info := work.flow_info()) is not None:
        seconds_flow = info["seconds"]  # every piece of a resumed run, not only this call's
    summary = {"key": base_key(stage12_config(cfg)),
               "seconds": round(stage1["seconds_vae"] + seconds_flow, 1),
               "seconds_vae": stage1["seconds_vae"], "vae_final_loss": stage1["vae_final_loss"],
               "vae_reconstruction_accuracy": stage1["vae_reconstruction_accuracy"],
               "flow_final_loss": float(np.mean(flow_losses[-200:])) if flow_losses else None,
               "captions": cfg.data.captions, "fidelity": cfg.data.fidelity, "pool_captions": len(prompt_list),
               "parameters": {n: sum(p.numel() for p in getattr(pipe, n).parameters())
                              for n in ("transformer", "vae", "text_encoder", "text_encoder_2")}}
    if cfg.decoder.steps > 0:
        summary.update(refine_stage(pipe, model, cfg, images, prompt_list, prompt_idx, _stage3_generator(cfg), log))
        summary["seconds"] = round(summary["seconds"] + summary["seconds_decoder"], 1)
    save_base(pipe, cfg, out_dir, summary)
    return summary


def refine_stage(pipe, model: FlowModel, cfg: PretrainConfig, images, prompt_list, prompt_idx, gen, log) -> dict:
    """Run stage 3 on a pipeline whose stages 1–2 are done; returns its summary entries."""
    t0 = time.time()
    losses = refine_decoder(pipe.vae, images, cfg.decoder, gen)
    acc = reconstruction_check(model, images, prompt_list, prompt_idx)
    log(f"decoder refinement: reconstructions that still score 1: {acc:.4f}")
    return {"key": base_key(cfg), "decoder_final_loss": float(np.mean(losses[-50:])) if losses else None,
            "decoder_reconstruction_accuracy": acc, "seconds_decoder": round(time.time() - t0, 1)}


def refine_cached(cfg: PretrainConfig, stage12_dir: Path, out_dir: Path, log=print) -> dict:
    """Stage 3 alone, starting from the cached stage-1–2 base in ``stage12_dir``."""
    from dgpo.models.handle import load_pipeline
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    log(f"reusing the cached stage-1–2 base {stage12_dir.name}; running the decoder refinement only")
    pipe = load_pipeline(stage12_dir)
    pipe.set_progress_bar_config(disable=True)
    model = SD3Model(pipe, max_sequence_length=cfg.model.t5_tokens)
    images, prompt_list, prompt_idx = render_pool(cfg)
    # stage 3 draws from its own generator, so refining a cached base and pretraining in one go agree
    summary = json.loads((stage12_dir / "pretrain_summary.json").read_text())
    summary.update(refine_stage(pipe, model, cfg, images, prompt_list, prompt_idx, _stage3_generator(cfg), log))
    save_base(pipe, cfg, out_dir, summary)
    return summary


def _stage3_generator(cfg: PretrainConfig) -> torch.Generator:
    return torch.Generator().manual_seed(cfg.seed * 7919 + 3)


def save_base(pipe, cfg: PretrainConfig, out_dir: str | Path, summary: dict) -> None:
    """Write the pipeline, the usage note, the config and the summary into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(out_dir), safe_serialization=True)
    (out_dir / "USAGE.md").write_text(usage_note(cfg.model, str(out_dir)))
    (out_dir / "pretrain_config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    (out_dir / "pretrain_summary.json").write_text(json.dumps(summary, indent=2))


def ensure_base(cfg: PretrainConfig, log=print, stop=None, use_shipped: bool = True) -> Path:
    """The base for ``cfg``: the one shipped with the package if its key matches (unless ``use_shipped`` is
    false: :mod:`dgpo.worlds.shapes_base.shipped`), else the cached one, pretraining it first if needed.

    Safe under concurrent first use and resumable: the training runs under an exclusive lock on
    ``<key>.lock`` (a process that gets the lock after another one finished the base just returns it), in
    the work folder ``<key>.partial/`` (continued where a stopped or killed call left it), and the finished
    base is saved into ``<key>.tmp-<pid>`` and renamed to ``<key>`` atomically: a half-trained base is never
    visible under the cache key. The work folder is removed once the base is in place. ``stop(steps_done)``
    may end the flow stage early (see :func:`train_flow`): :class:`FlowPaused` is raised, the next call
    continues.
    """
    if use_shipped and (shipped := shipped_base(base_key(cfg))) is not None:
        return shipped
    final = base_dir(cfg)
    if (final / "model_index.json").is_file():
        return final
    with exclusive_lock(_lock_file(cfg), on_wait=lambda: log(f"waiting for another process pretraining {final}")):
        if (final / "model_index.json").is_file():
            log(f"another process pretrained {final} meanwhile; using it")
            return final
        work = PartialBase(partial_dir(cfg))
        tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        stage12 = base_dir(stage12_config(cfg))
        try:
            # built lazily on first use, maybe inside a caller's no-grad block: training takes its own grad mode
            with torch.inference_mode(False), torch.enable_grad():
                if cfg.decoder.steps > 0 and (stage12 / "model_index.json").is_file():
                    refine_cached(cfg, stage12, tmp, log=log)
                else:
                    verb = "continuing" if work.exists() else "pretraining"
                    log(f"no cached base for this config; {verb} it in {work.folder}")
                    pretrain(cfg, tmp, log=log, work=work, stop=stop)
            (tmp / "USAGE.md").write_text(usage_note(cfg.model, str(final)))
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        work.remove()
    return final


def snapshot_base(cfg: PretrainConfig, out_dir: str | Path) -> int:
    """The weights an unfinished pretraining of ``cfg`` has reached (its newest flow checkpoint, the saved
    EMA of them as the finished base would get) as a pipeline folder in ``out_dir``, which every command
    reads like a base (``dgpo eval --model out_dir``); the pretraining itself is not touched. Returns the step."""
    from dgpo.errors import UserError
    work = PartialBase(partial_dir(cfg))
    pipe = build_pipeline(cfg.model, world_vocabulary(), seed=cfg.seed)
    stage1 = work.load_autoencoder(pipe.vae, {"data": torch.Generator()}) if work.exists() else None
    if stage1 is None:
        raise UserError(f"no unfinished pretraining of this config to snapshot (nothing in {work.folder}); "
                        f"a finished base is in {base_dir(cfg)}")
    pipe.vae.register_to_config(shift_factor=stage1["latent_shift"], scaling_factor=1.0 / stage1["latent_std"])
    modules = {"transformer": pipe.transformer}
    if cfg.flow.text_lr > 0:
        modules.update(text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2)
    ema = (EMA([p for m in modules.values() for p in m.parameters()], cfg.flow.ema_decay)
           if cfg.flow.ema_decay > 0 else None)
    step = work.load_flow_weights(modules, ema)
    if step is None:
        raise UserError(f"the pretraining in {work.folder} has no flow-stage checkpoint yet "
                        f"(one is written every flow.checkpoint_every = {cfg.flow.checkpoint_every} steps)")
    for m in (pipe.vae, pipe.transformer, pipe.text_encoder, pipe.text_encoder_2):
        m.eval()
    save_base(pipe, cfg, out_dir, {**stage1, "snapshot_of_flow_step": step, "flow_steps": cfg.flow.steps})
    return step


def forget_base(cfg: PretrainConfig) -> None:
    """Delete the cached base of ``cfg`` and its unfinished work (waiting for a process training it)."""
    with exclusive_lock(_lock_file(cfg)):
        shutil.rmtree(base_dir(cfg), ignore_errors=True)
        PartialBase(partial_dir(cfg)).remove()
