"""A model family of your own: a tiny pixel-space flow model behind the model-handle protocol.

No diffusers pipeline at all: the backbone is a small diffusers ``ModelMixin`` (so LoRA adapters attach with
peft and it saves with ``save_pretrained``) that predicts the velocity of 8×8 RGB "latents" from the noise level
and a bag-of-words prompt embedding; decoding upsamples them to the world's 32×32 images. The handle
(:class:`PixelFlowHandle`) implements :class:`dgpo.models.handle.FlowModel` and registers itself for folders whose
``model_index.json`` names ``PixelFlowPipeline``; DGPO, its baselines and TDM then train it unchanged:

    python examples/pixel_flow_model.py OUT_DIR            # write an untrained model folder
    dgpo train --plugin examples/pixel_flow_model.py --set model.base=OUT_DIR --set model.lora_targets=attention
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers import ConfigMixin, FlowMatchEulerDiscreteScheduler, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.loaders.peft import PeftAdapterMixin

from dgpo.models.handle import PromptEmbeds
from dgpo.models.families import register_model_family
from dgpo.worlds import shapes

VOCABULARY = sorted({w for p in shapes.prompts("all") for w in p.split()})


class PixelFlow(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """v(x, σ, c): an MLP over flattened pixels, conditioned on σ and a pooled prompt embedding. ``to_q``/``to_k``/
    ``to_v``/``to_out`` are just names for its linear layers, so that the attention LoRA targets find them."""

    @register_to_config
    def __init__(self, size: int = 8, hidden: int = 256, vocab: int = len(VOCABULARY), embed: int = 32):
        super().__init__()
        d = 3 * size * size
        self.words = torch.nn.Embedding(vocab + 1, embed)  # index vocab: the empty prompt
        self.to_q = torch.nn.Linear(d + embed + 1, hidden)
        self.to_k = torch.nn.Linear(hidden, hidden)
        self.to_v = torch.nn.Linear(hidden, hidden)
        self.to_out = torch.nn.Linear(hidden, d)

    def forward(self, hidden_states, timestep, pooled_projections):
        b = hidden_states.shape[0]
        h = torch.cat([hidden_states.reshape(b, -1), pooled_projections, timestep.view(b, 1) / 1000.0], dim=1)
        h = torch.nn.functional.silu(self.to_q(h))
        h = h + torch.nn.functional.silu(self.to_k(h))
        h = h + torch.nn.functional.silu(self.to_v(h))
        return self.to_out(h).reshape(hidden_states.shape)


class PixelFlowHandle:
    """The model-handle protocol over :class:`PixelFlow` (``FlowModel``)."""

    family = "pixel-flow"
    max_sequence_length = 0

    def __init__(self, transformer: PixelFlow):
        self._transformer = transformer

    @classmethod
    def from_pretrained(cls, model_dir, dtype=torch.float32) -> "PixelFlowHandle":
        model = PixelFlow.from_pretrained(str(Path(model_dir) / "transformer")).to(dtype)
        model.requires_grad_(False)
        return cls(model)

    def save_pretrained(self, folder) -> None:
        folder = Path(folder)
        self._transformer.save_pretrained(str(folder / "transformer"))
        (folder / "model_index.json").write_text(json.dumps({"_class_name": "PixelFlowPipeline"}))

    def to(self, device) -> "PixelFlowHandle":
        self._transformer.to(device)
        return self

    def with_transformer(self, transformer) -> "PixelFlowHandle":
        return PixelFlowHandle(transformer)

    def fuse_lora(self, lora_dir) -> None:
        raise NotImplementedError("this example samples with its adapters attached")

    def lora_targets(self, kind: str) -> tuple[str, ...]:
        return ("to_q", "to_k", "to_v", "to_out") if kind in ("attention", "attention_ff") else ()

    transformer = property(lambda self: self._transformer)
    device = property(lambda self: next(self._transformer.parameters()).device)
    dtype = property(lambda self: next(self._transformer.parameters()).dtype)
    latent_shape = property(lambda self: (3, self._transformer.config.size, self._transformer.config.size))
    image_size = property(lambda self: 32)
    scheduler_config = property(lambda self: FlowMatchEulerDiscreteScheduler(shift=1.0).config)

    # prompts: the mean of the words' embeddings (no token sequence: a single zero token)
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        index = {w: i for i, w in enumerate(VOCABULARY)}
        words = self._transformer.words
        pooled = torch.stack([
            words(torch.tensor([index.get(w, len(VOCABULARY)) for w in p.split()] or [len(VOCABULARY)],
                               device=self.device)).mean(0) for p in prompts])
        return PromptEmbeds(pooled.new_zeros(len(prompts), 1, 1), pooled)

    def negative_embeds(self, batch: int) -> PromptEmbeds:
        return self.encode_prompts([""]).repeat_interleave(batch)

    def velocity_at_timestep(self, latents, timestep, embeds: PromptEmbeds):
        timestep = timestep.float().reshape(-1).expand(latents.shape[0])
        v = self._transformer(hidden_states=latents.to(self.dtype), timestep=timestep, pooled_projections=embeds.pooled)
        return v.to(latents.dtype)  # the state keeps the samplers' dtype (fp32) whatever the weights are in

    def velocity(self, latents, sigma, embeds):
        return self.velocity_at_timestep(latents, sigma * 1000.0, embeds)

    def guided_velocity_at_timestep(self, latents, timestep, embeds, guidance_scale):
        v = self.velocity_at_timestep(latents, timestep, embeds)
        if guidance_scale <= 1.0:
            return v
        v_uncond = self.velocity_at_timestep(latents, timestep, self.negative_embeds(latents.shape[0]))
        return v_uncond + guidance_scale * (v - v_uncond)

    def guided_velocity(self, latents, sigma, embeds, guidance_scale):
        return self.guided_velocity_at_timestep(latents, sigma * 1000.0, embeds, guidance_scale)

    # "latents" are the image at 8×8 in [-1, 1]
    def encode_images(self, images, sample=False, generator=None):
        x = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return torch.nn.functional.interpolate(x, size=self.latent_shape[1:], mode="area").to(self.device)

    def decode_latents(self, latents, output: str = "uint8"):
        x = torch.nn.functional.interpolate(latents.float(), size=(32, 32), mode="nearest").clamp(-1, 1)
        if output == "pt-raw":
            return x
        images = ((x.detach().permute(0, 2, 3, 1).cpu().numpy() + 1.0) / 2.0)
        return images if output == "np" else (images * 255).round().astype(np.uint8)


register_model_family("PixelFlowPipeline", PixelFlowHandle)


if __name__ == "__main__":
    torch.manual_seed(0)
    PixelFlowHandle(PixelFlow()).save_pretrained(sys.argv[1])
    print(f"wrote an untrained pixel-flow model to {sys.argv[1]}")
