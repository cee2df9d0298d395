"""The Z-Image family's model handle over a local ``ZImagePipeline`` folder (the base of TDM-R1's Z-Image result).

Z-Image is a single-stream flow transformer; the handle hides how it differs from SD3 behind the
:class:`dgpo.models.handle.FlowModel` protocol:

- text: the second-to-last hidden states of a Qwen3 language model over the prompt in its chat template, one
  (L_i, D) sequence per prompt with its padding cut off. :class:`~dgpo.models.handle.PromptEmbeds` holds them
  padded to the longest, ``tokens`` (B, L, D), and each prompt's length in ``pooled`` (B,): Z-Image has no
  pooled embedding;
- latents: (B, 16, h, w) to every algorithm; the transformer takes a list of (C, 1, h, w) frames;
- time and sign: it takes t = 1 − σ and predicts x₀ − ε, so the handle negates its output into the
  rectified-flow velocity v = ε − x₀ every algorithm uses (as ``ZImagePipeline`` does before each step);
- guidance: true CFG against the empty prompt. ``ZImagePipeline``'s ``guidance_scale=g`` computes
  c + g·(c − u), which is our v_u + w·(v_c − v_u) at w = g + 1;
- the flow schedule: a static shift (the published config), or a token-count shift fixed at this resolution
  (:func:`dgpo.models.handle.static_shift_schedule`). ``ZImagePipeline`` steps through ``sigmas =
  linspace(1, 1/N, N)``; pass those as ``sigmas`` to reproduce it exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dgpo.errors import UserError
from dgpo.models.handle import (PromptEmbeds, check_components, damaged_pipeline_is_a_user_error, register_model_family,
                                static_shift_schedule, vae_decode, vae_encode)

#: The attention projections of every block, and with them the SwiGLU feed-forward layers.
ZIMAGE_ATTENTION = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0")
ZIMAGE_FEED_FORWARD = ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
ZIMAGE_LORA_TARGETS = {"attention": ZIMAGE_ATTENTION, "attention_ff": ZIMAGE_ATTENTION + ZIMAGE_FEED_FORWARD}


class ZImageModel:
    """The Z-Image family's handle (see the module docstring)."""

    family = "zimage"
    #: The ``guidance_scale`` a stock ``ZImagePipeline`` call takes to sample without CFG (its g = 0).
    unguided_pipeline_scale = 0.0

    def __init__(self, pipe, image_size: int = 1024, max_sequence_length: int = 512):
        self.pipe = pipe
        factor = 2 * pipe.vae_scale_factor
        if image_size % factor:
            raise UserError(f"Z-Image images must be a multiple of {factor} pixels, got {image_size}")
        self._image_size = image_size
        self.max_sequence_length = min(max_sequence_length, pipe.tokenizer.model_max_length)
        self._negative: PromptEmbeds | None = None

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, dtype: torch.dtype = torch.float32) -> "ZImageModel":
        """A local ``ZImagePipeline`` folder; VAE and text encoder frozen."""
        from diffusers import ZImagePipeline
        path = Path(model_dir)
        check_components(path)
        with damaged_pipeline_is_a_user_error(path):
            pipe = ZImagePipeline.from_pretrained(str(path), dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        for m in (pipe.vae, pipe.text_encoder):
            m.requires_grad_(False)
        return cls(pipe)

    def at_resolution(self, image_size: int) -> "ZImageModel":
        return ZImageModel(self.pipe, image_size, self.max_sequence_length)

    def to(self, device) -> "ZImageModel":
        self.pipe.to(device)
        self._negative = None
        return self

    def with_transformer(self, transformer: torch.nn.Module) -> "ZImageModel":
        from diffusers import ZImagePipeline
        pipe = ZImagePipeline(**{**self.pipe.components, "transformer": transformer})
        pipe.set_progress_bar_config(disable=True)
        return ZImageModel(pipe, self._image_size, self.max_sequence_length)

    def save_pretrained(self, folder: str | Path) -> None:
        self.pipe.save_pretrained(str(folder))

    def fuse_lora(self, lora_dir: str | Path) -> None:
        from dgpo.models.lora_io import load_lora_into_pipeline
        load_lora_into_pipeline(self.pipe, lora_dir)
        self.pipe.fuse_lora()
        self.pipe.unload_lora_weights()

    def lora_targets(self, kind: str) -> tuple[str, ...]:
        if kind not in ZIMAGE_LORA_TARGETS:
            raise UserError(f"LoRA targets {kind!r}: the Z-Image family has {sorted(ZIMAGE_LORA_TARGETS)}")
        return ZIMAGE_LORA_TARGETS[kind]

    @property
    def scheduler_config(self):
        _, h, w = self.latent_shape
        return static_shift_schedule(self.pipe.scheduler.config, (h // 2) * (w // 2))

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
        side = self._image_size // self.pipe.vae_scale_factor
        return (self.transformer.config.in_channels, side, side)

    @property
    def image_size(self) -> int:
        return self._image_size

    # -------------------------------------------------------------------------------- text
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        """The Qwen3 features of each prompt in its chat template (padded; lengths in ``pooled``). A prompt
        whose template is longer than ``max_sequence_length`` tokens is a UserError (the pipeline truncates)."""
        tok = self.pipe.tokenizer
        for prompt in dict.fromkeys(prompts):
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True, enable_thinking=True)
            n = len(tok(text)["input_ids"])
            if n > self.max_sequence_length:
                raise UserError(f"prompt {prompt[:60]!r} is {n} tokens in Z-Image's chat template; the text encoder "
                                f"reads at most {self.max_sequence_length}: shorten it")
        features = self.pipe._encode_prompt(prompt=list(prompts), device=self.device,
                                            max_sequence_length=self.max_sequence_length)
        lengths = torch.tensor([len(f) for f in features], device=self.device)
        tokens = torch.zeros(len(features), int(lengths.max()), features[0].shape[-1], device=self.device,
                             dtype=features[0].dtype)
        for i, f in enumerate(features):
            tokens[i, :len(f)] = f
        return PromptEmbeds(tokens, lengths)

    def negative_embeds(self, batch: int) -> PromptEmbeds:
        if self._negative is None:
            with torch.no_grad():
                self._negative = self.encode_prompts([""])
        return self._negative.repeat_interleave(batch)

    # -------------------------------------------------------------------------------- velocity
    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor, embeds: PromptEmbeds) -> torch.Tensor:
        return self.velocity_at_timestep(latents, sigma * 1000.0, embeds)

    def velocity_at_timestep(self, latents: torch.Tensor, timestep: torch.Tensor, embeds: PromptEmbeds) -> torch.Tensor:
        """v = ε − x₀ from the transformer at the scheduler's timestep t (it reads 1 − t/1000 and predicts −v)."""
        b = latents.shape[0]
        t = (1000.0 - timestep.to(latents.dtype).reshape(-1).expand(b)) / 1000.0
        frames = list(latents.unsqueeze(2).unbind(0))
        captions = [embeds.tokens[i, :int(n)] for i, n in enumerate(embeds.pooled)]
        out = self.transformer(frames, t, captions, return_dict=False)[0]
        return -torch.stack(out).squeeze(2).to(latents.dtype)

    def guided_velocity(self, latents: torch.Tensor, sigma: torch.Tensor, embeds: PromptEmbeds,
                        guidance_scale: float) -> torch.Tensor:
        return self.guided_velocity_at_timestep(latents, sigma * 1000.0, embeds, guidance_scale)

    def guided_velocity_at_timestep(self, latents: torch.Tensor, timestep: torch.Tensor, embeds: PromptEmbeds,
                                    guidance_scale: float) -> torch.Tensor:
        """True CFG v_u + w·(v_c − v_u) against the empty prompt (w ≤ 1: one conditional pass)."""
        if guidance_scale <= 1.0:
            return self.velocity_at_timestep(latents, timestep, embeds)
        batch = latents.shape[0]
        v = self.velocity_at_timestep(torch.cat([latents, latents]),
                                      torch.cat([timestep.reshape(-1).expand(batch)] * 2),
                                      PromptEmbeds.cat([self.negative_embeds(batch), embeds]))
        v_uncond, v_cond = v.chunk(2)
        return v_uncond + guidance_scale * (v_cond - v_uncond)

    # -------------------------------------------------------------------------------- latents
    def encode_images(self, images: np.ndarray | torch.Tensor, sample: bool = False,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        return vae_encode(self.vae, images, self.device, sample, generator)

    def decode_latents(self, latents: torch.Tensor, output: str = "uint8") -> np.ndarray | torch.Tensor:
        return vae_decode(self.vae, self.pipe.image_processor, latents, output)


register_model_family("ZImagePipeline", ZImageModel)
