"""The flow-matching model handle over a diffusers ``StableDiffusion3Pipeline``.

Everything an algorithm needs from the model, in the pipeline's own conventions:

- prompt encoding through the pipeline's ``encode_prompt`` (so CFG's empty prompt is the pipeline's);
- velocity prediction ``v_θ(x_σ, σ, c)`` with the transformer's timestep ``t = 1000·σ``;
- latent encode/decode with the VAE's ``shift_factor`` / ``scaling_factor``
  (``z = (E(x) − shift)·scale``, ``x = D(z / scale + shift)``);
- the flow-matching interpolation ``x_σ = (1 − σ)·x₀ + σ·ε`` (rectified flow, SD3), whose velocity target
  is ``v = ε − x₀``.

The same class wraps the 3.5M-parameter shapes base and SD3.5-Medium; only the pipeline differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusion3Pipeline

from dgpo.errors import UserError


@dataclass
class PromptEmbeds:
    """Encoded prompts: token embeddings (B, L, D) and pooled embeddings (B, P)."""

    tokens: torch.Tensor
    pooled: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def index(self, idx) -> "PromptEmbeds":
        return PromptEmbeds(self.tokens[idx], self.pooled[idx])

    def repeat_interleave(self, n: int) -> "PromptEmbeds":
        return PromptEmbeds(self.tokens.repeat_interleave(n, 0), self.pooled.repeat_interleave(n, 0))

    @staticmethod
    def cat(items: list["PromptEmbeds"]) -> "PromptEmbeds":
        return PromptEmbeds(torch.cat([e.tokens for e in items]), torch.cat([e.pooled for e in items]))


def load_pipeline(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> StableDiffusion3Pipeline:
    """Load a local SD3 pipeline directory, with a clear error when it is missing or incomplete."""
    path = Path(model_dir)
    if not (path / "model_index.json").is_file():
        raise UserError(
            f"model directory {str(path)!r} has no model_index.json: pass a folder written by "
            f"`save_pretrained` (e.g. the one `dgpo pretrain` prints)")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging
    diffusers_logging.disable_progress_bar()  # no per-component loading bars: a local load takes a blink
    transformers_logging.disable_progress_bar()
    pipe = StableDiffusion3Pipeline.from_pretrained(str(path), text_encoder_3=None, tokenizer_3=None, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def t5_tokens_of(model_dir: str | Path) -> int:
    """How many zero T5 tokens a base was trained with (from its pretrain_config.yaml; 0 if unknown)."""
    import yaml
    cfg = Path(model_dir) / "pretrain_config.yaml"
    if cfg.is_file():
        return int(yaml.safe_load(cfg.read_text())["model"]["t5_tokens"])
    return 0


class FlowModel:
    """Velocity prediction, prompt encoding and latent coding for an SD3-family pipeline."""

    def __init__(self, pipe: StableDiffusion3Pipeline, max_sequence_length: int = 0):
        self.pipe = pipe
        self.max_sequence_length = max_sequence_length
        self._negative: PromptEmbeds | None = None

    # -------------------------------------------------------------------------------- parts
    @property
    def transformer(self):
        return self.pipe.transformer

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def device(self) -> torch.device:
        return self.pipe.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.transformer.dtype

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of one latent at the pipeline's default resolution."""
        size = self.transformer.config.sample_size
        return (self.transformer.config.in_channels, size, size)

    @property
    def image_size(self) -> int:
        return self.transformer.config.sample_size * self.pipe.vae_scale_factor

    # -------------------------------------------------------------------------------- text
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        """Token and pooled embeddings of ``prompts`` (grad flows if the text encoders require it)."""
        tokens, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length)
        return PromptEmbeds(tokens, pooled)

    def negative_embeds(self, batch: int) -> PromptEmbeds:
        """The empty prompt's embeddings (the CFG unconditional branch), repeated ``batch`` times."""
        if self._negative is None:
            with torch.no_grad():
                self._negative = self.encode_prompts([""])
        return self._negative.repeat_interleave(batch)

    # -------------------------------------------------------------------------------- velocity
    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor, embeds: PromptEmbeds) -> torch.Tensor:
        """v_θ(x_σ, σ, c): latents (B, C, h, w), sigma (B,) in [0, 1] → velocity (B, C, h, w)."""
        return self.velocity_at_timestep(latents, sigma * 1000.0, embeds)

    def velocity_at_timestep(self, latents: torch.Tensor, timestep: torch.Tensor, embeds: PromptEmbeds) -> torch.Tensor:
        """The transformer call with the scheduler's timestep t = 1000·σ as is (samplers use this so that
        they feed the transformer exactly what the stock pipeline feeds it)."""
        timestep = timestep.to(latents.dtype).reshape(-1).expand(latents.shape[0])
        return self.transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=embeds.tokens,
                                pooled_projections=embeds.pooled, return_dict=False)[0]

    def guided_velocity(self, latents: torch.Tensor, sigma: torch.Tensor, embeds: PromptEmbeds,
                        guidance_scale: float) -> torch.Tensor:
        """CFG velocity v_u + w·(v_c − v_u) at noise level σ (see :meth:`guided_velocity_at_timestep`)."""
        return self.guided_velocity_at_timestep(latents, sigma * 1000.0, embeds, guidance_scale)

    def guided_velocity_at_timestep(self, latents: torch.Tensor, timestep: torch.Tensor, embeds: PromptEmbeds,
                                    guidance_scale: float) -> torch.Tensor:
        """CFG velocity v_u + w·(v_c − v_u), computed like the pipeline: one batch [uncond; cond].
        Guidance ≤ 1 means no CFG (one conditional pass), as in diffusers."""
        if guidance_scale <= 1.0:
            return self.velocity_at_timestep(latents, timestep, embeds)
        batch = latents.shape[0]
        both = PromptEmbeds.cat([self.negative_embeds(batch), embeds])
        timestep = timestep.reshape(-1).expand(batch)
        v = self.velocity_at_timestep(torch.cat([latents, latents]), torch.cat([timestep, timestep]), both)
        v_uncond, v_cond = v.chunk(2)
        return v_uncond + guidance_scale * (v_cond - v_uncond)

    # -------------------------------------------------------------------------------- latents
    def encode_images(self, images: np.ndarray | torch.Tensor, sample: bool = False,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 images (B, S, S, 3) → scaled latents z = (E(x) − shift)·scale, (B, C, h, w)."""
        x = torch.as_tensor(np.asarray(images)).to(self.device)
        x = x.permute(0, 3, 1, 2).to(self.vae.dtype) / 127.5 - 1.0
        dist = self.vae.encode(x).latent_dist
        z = dist.sample(generator) if sample else dist.mode()
        cfg = self.vae.config
        return (z - (cfg.shift_factor or 0.0)) * cfg.scaling_factor

    def decode_latents(self, latents: torch.Tensor, output: str = "uint8") -> np.ndarray | torch.Tensor:
        """Scaled latents → images: uint8 (B, S, S, 3) numpy, float in [0, 1] numpy ("np"), or the raw
        decoder output in [-1, 1] as a tensor ("pt-raw", differentiable)."""
        cfg = self.vae.config
        raw = self.vae.decode(latents / cfg.scaling_factor + (cfg.shift_factor or 0.0), return_dict=False)[0]
        if output == "pt-raw":
            return raw
        images = self.pipe.image_processor.postprocess(raw.detach(), output_type="np")
        if output == "np":
            return images
        return (images * 255).round().astype(np.uint8)


def flow_interpolate(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_σ = (1 − σ)·x₀ + σ·ε (rectified-flow forward process, SD3 Eq. 2); sigma (B,)."""
    s = sigma.view(-1, *([1] * (x0.ndim - 1)))
    return (1.0 - s) * x0 + s * noise
