"""The FLUX.1 family's model handle (FLUX.1-dev, FLUX.1-schnell) over a local ``FluxPipeline`` folder.

FLUX.1 is a rectified-flow transformer like SD3's, conditioned differently, and the handle hides each
difference behind the :class:`dgpo.models.handle.FlowModel` protocol, so that no algorithm knows it trains FLUX:

- latents: the VAE's (B, 16, h, w) latents are what every algorithm sees; the transformer reads them packed
  into 2 × 2 patches, (B, h/2 · w/2, 64) tokens with their positions (``img_ids``), and the handle packs and
  unpacks around each call;
- text: CLIP's pooled embedding and T5's token embeddings (``max_sequence_length`` tokens: the tokenizer's
  limit, 512 for FLUX.1-dev, 256 for schnell);
- time: the transformer takes σ ∈ [0, 1] (SD3's takes 1000·σ);
- guidance: FLUX.1-dev has no true classifier-free guidance. It was distilled to take the guidance scale as an
  input (``guidance_embeds``): :meth:`FluxModel.guided_velocity` with scale w is *one* pass with w embedded, and
  the plain :meth:`FluxModel.velocity` embeds ``guidance`` (3.5, the pipeline's default). So on FLUX.1-dev
  ``rollout.guidance_scale`` and the sampler's ``guidance_scale`` are that embedding, and the algorithms'
  "CFG" rows are the embedded guidance. A model without the embedding (FLUX.1-schnell, timestep-distilled)
  gets true CFG against the empty prompt for w > 1, as ``FluxPipeline``'s ``true_cfg_scale``; schnell is meant
  to sample in 1–4 steps at w ≤ 1;
- the flow schedule: FLUX shifts its noise levels by the image's token count (``use_dynamic_shifting``, shift
  e^μ with μ = calculate_shift(tokens)); at a fixed resolution that is SD3's static shift s = e^μ, which
  :attr:`FluxModel.scheduler_config` reports, so every sampler here works unchanged. ``FluxPipeline`` itself
  steps through ``sigmas = linspace(1, 1/N, N)``; pass those as ``sigmas`` to reproduce it exactly.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dgpo.models.handle import (DiffusersModel, PromptEmbeds, check_prompt_lengths, freeze_all_but_transformer,
                                open_pipeline, static_shift_schedule)

#: Attention projections of the double-stream blocks (image and text) and of the single-stream blocks.
FLUX_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
#: Feed-forward layers: both streams' MLPs in the double blocks, the fused MLP of the single blocks.
FLUX_FEED_FORWARD = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out")
FLUX_LORA_TARGETS = {"attention": FLUX_ATTENTION, "attention_ff": FLUX_ATTENTION + FLUX_FEED_FORWARD}
#: The guidance FLUX.1-dev embeds when none is given (``FluxPipeline``'s default).
DEFAULT_GUIDANCE = 3.5


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) → (B, h/2 · w/2, 4C): 2 × 2 patches as tokens, as ``FluxPipeline._pack_latents`` packs them."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, channels: int, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents`."""
    b = tokens.shape[0]
    x = tokens.view(b, h // 2, w // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels, h, w)


def image_positions(h: int, w: int, device, dtype) -> torch.Tensor:
    """(h/2 · w/2, 3) positions of the packed latent tokens: (0, row, column), as FLUX's rotary embedding reads."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxModel(DiffusersModel):
    """The FLUX.1 family's handle (see the module docstring)."""

    family = "flux"
    label = "FLUX"
    lora_target_sets = FLUX_LORA_TARGETS

    def __init__(self, pipe, image_size: int = 0, guidance: float = DEFAULT_GUIDANCE):
        super().__init__(pipe, image_size or pipe.default_sample_size * pipe.vae_scale_factor, 2 * pipe.vae_scale_factor)
        self.guidance = guidance
        self.max_sequence_length = pipe.tokenizer_2.model_max_length

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, dtype: torch.dtype = torch.float32) -> "FluxModel":
        """A local ``FluxPipeline`` folder; VAE and text encoders frozen."""
        from diffusers import FluxPipeline
        return cls(freeze_all_but_transformer(open_pipeline(FluxPipeline, model_dir, dtype)))

    def at_resolution(self, image_size: int) -> "FluxModel":
        """The same model sampling ``image_size`` × ``image_size`` images (FLUX.1 trains at 256–2048 px)."""
        return FluxModel(self.pipe, image_size, self.guidance)

    def with_transformer(self, transformer: torch.nn.Module) -> "FluxModel":
        from diffusers import FluxPipeline
        pipe = FluxPipeline(**{**self.pipe.components, "transformer": transformer})
        pipe.set_progress_bar_config(disable=True)
        return FluxModel(pipe, self._image_size, self.guidance)

    @property
    def scheduler_config(self):
        """The flow-matching scheduler's config at this resolution: FLUX's token-count shift e^μ as a static
        ``shift`` (so every sampler here reproduces the pipeline's noise levels)."""
        _, h, w = self.latent_shape
        return static_shift_schedule(self.pipe.scheduler.config, (h // 2) * (w // 2))

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self._image_size // self.pipe.vae_scale_factor
        return (self.pipe.vae.config.latent_channels, side, side)

    @property
    def unguided_pipeline_scale(self) -> float:
        """The ``guidance_scale`` a stock ``FluxPipeline`` call takes to sample as :meth:`velocity` does."""
        return self.guidance if self.distilled_guidance else 1.0

    @property
    def distilled_guidance(self) -> bool:
        """True for FLUX.1-dev: the guidance scale is an input of the transformer, not a second pass."""
        return bool(self.transformer.config.guidance_embeds)

    # -------------------------------------------------------------------------------- text
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        """T5 token embeddings and CLIP's pooled embedding of ``prompts``; a prompt longer than CLIP reads is a
        UserError (the pipeline would drop its end without a word)."""
        check_prompt_lengths(self.pipe.tokenizer, prompts)
        tokens, pooled, _ = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, device=self.device,
                                                    max_sequence_length=self.max_sequence_length)
        return PromptEmbeds(tokens, pooled)

    # -------------------------------------------------------------------------------- velocity
    def velocity_at_timestep(self, latents: torch.Tensor, timestep: torch.Tensor, embeds: PromptEmbeds,
                             guidance: float | None = None) -> torch.Tensor:
        """The transformer at the scheduler's timestep t = 1000·σ (it reads σ = t / 1000), latents packed
        around the call (FLUX.1-dev: with ``guidance`` embedded, the default ``self.guidance``)."""
        b, c, h, w = latents.shape
        sigma = (timestep.float().reshape(-1) / 1000.0).expand(b)
        g = None
        if self.distilled_guidance:
            g = torch.full((b,), self.guidance if guidance is None else guidance, device=latents.device)
        text_ids = torch.zeros(embeds.tokens.shape[1], 3, device=latents.device)
        out = self.transformer(hidden_states=pack_latents(latents.to(self.dtype)), timestep=sigma, guidance=g,
                               pooled_projections=embeds.pooled, encoder_hidden_states=embeds.tokens,
                               txt_ids=text_ids, img_ids=image_positions(h, w, latents.device, torch.float32),
                               return_dict=False)[0]
        return unpack_latents(out, c, h, w).to(latents.dtype)  # the state keeps its precision (fp32)

    def guided_velocity_at_timestep(self, latents: torch.Tensor, timestep: torch.Tensor, embeds: PromptEmbeds,
                                    guidance_scale: float) -> torch.Tensor:
        """FLUX.1-dev: one pass with ``guidance_scale`` embedded. Without the embedding: true CFG
        v_u + w·(v_c − v_u) against the empty prompt for w > 1, one conditional pass otherwise."""
        if self.distilled_guidance:
            return self.velocity_at_timestep(latents, timestep, embeds, guidance=guidance_scale)
        return super().guided_velocity_at_timestep(latents, timestep, embeds, guidance_scale)

