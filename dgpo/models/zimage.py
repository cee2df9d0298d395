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

import torch

from dgpo.errors import UserError
from dgpo.models.handle import (DiffusersModel, PromptEmbeds, freeze_all_but_transformer, open_pipeline,
                                static_shift_schedule)

#: The attention projections of every block, and with them the SwiGLU feed-forward layers.
ZIMAGE_ATTENTION = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0")
ZIMAGE_FEED_FORWARD = ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
ZIMAGE_LORA_TARGETS = {"attention": ZIMAGE_ATTENTION, "attention_ff": ZIMAGE_ATTENTION + ZIMAGE_FEED_FORWARD}


class ZImageModel(DiffusersModel):
    """The Z-Image family's handle (see the module docstring)."""

    family = "zimage"
    label = "Z-Image"
    lora_target_sets = ZIMAGE_LORA_TARGETS
    #: The ``guidance_scale`` a stock ``ZImagePipeline`` call takes to sample without CFG (its g = 0).
    unguided_pipeline_scale = 0.0

    def __init__(self, pipe, image_size: int = 1024, max_sequence_length: int = 512):
        super().__init__(pipe, image_size, 2 * pipe.vae_scale_factor)
        self.max_sequence_length = min(max_sequence_length, pipe.tokenizer.model_max_length)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, dtype: torch.dtype = torch.float32) -> "ZImageModel":
        """A local ``ZImagePipeline`` folder; VAE and text encoder frozen."""
        from diffusers import ZImagePipeline
        return cls(freeze_all_but_transformer(open_pipeline(ZImagePipeline, model_dir, dtype)))

    def at_resolution(self, image_size: int) -> "ZImageModel":
        return ZImageModel(self.pipe, image_size, self.max_sequence_length)

    def with_transformer(self, transformer: torch.nn.Module) -> "ZImageModel":
        from diffusers import ZImagePipeline
        pipe = ZImagePipeline(**{**self.pipe.components, "transformer": transformer})
        pipe.set_progress_bar_config(disable=True)
        return ZImageModel(pipe, self._image_size, self.max_sequence_length)

    @property
    def scheduler_config(self):
        _, h, w = self.latent_shape
        return static_shift_schedule(self.pipe.scheduler.config, (h // 2) * (w // 2))

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self._image_size // self.pipe.vae_scale_factor
        return (self.transformer.config.in_channels, side, side)

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

    # -------------------------------------------------------------------------------- velocity
    def velocity_at_timestep(self, latents: torch.Tensor, timestep: torch.Tensor, embeds: PromptEmbeds) -> torch.Tensor:
        """v = ε − x₀ from the transformer at the scheduler's timestep t (it reads 1 − t/1000 and predicts −v)."""
        b = latents.shape[0]
        t = (1000.0 - timestep.float().reshape(-1).expand(b)) / 1000.0
        frames = list(latents.to(self.dtype).unsqueeze(2).unbind(0))
        captions = [embeds.tokens[i, :int(n)] for i, n in enumerate(embeds.pooled)]
        out = self.transformer(frames, t, captions, return_dict=False)[0]
        return -torch.stack(out).squeeze(2).to(latents.dtype)

