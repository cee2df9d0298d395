"""Build a genuine (tiny) ``StableDiffusion3Pipeline`` from a config: the embedded base model's skeleton.

The pipeline has every SD3 part, only smaller: an ``AutoencoderKL`` (S px → S/4 latents with 16 channels),
two ``CLIPTextModelWithProjection`` encoders sharing a tokenizer built locally from the world's words,
no T5 (``text_encoder_3=None``), an ``SD3Transformer2DModel`` and the flow-matching Euler scheduler. It is
saved with ``save_pretrained`` and loads back with plain ``StableDiffusion3Pipeline.from_pretrained``.

Without T5 the pipeline appends ``max_sequence_length`` all-zero "T5" tokens to the CLIP tokens. The base
is trained with ``t5_tokens`` of them (0 by default: they carry no information and cost attention), so a
stock-diffusers user must pass ``max_sequence_length=t5_tokens``; :func:`usage_note` writes that down.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                       StableDiffusion3Pipeline)
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from dgpo.config import option, section
from dgpo.worlds.shapes_base.tokenizer import build_clip_tokenizer


@dataclass
class VaeConfig:
    block_out_channels: list[int] = option([16, 32, 64], "channels per VAE level; n levels downsample by 2^(n-1)")
    layers_per_block: int = option(1, "resnet layers per VAE level", min=1)
    latent_channels: int = option(16, "latent channels (SD3 uses 16)", min=1)
    norm_num_groups: int = option(8, "group-norm groups (must divide every channel count)", min=1)
    mid_attention: bool = option(False, "self-attention in the VAE mid block")


@dataclass
class TextEncoderConfig:
    hidden_size: int = option(64, "width of each CLIP text encoder", min=8)
    num_layers: int = option(3, "transformer layers per CLIP text encoder (penultimate is used)", min=2)
    num_heads: int = option(4, "attention heads per CLIP layer", min=1)
    projection_dim: int = option(64, "pooled projection width per encoder", min=8)
    max_length: int = option(16, "tokenizer length (BOS + words + EOS, padded)", min=4, max=77)


@dataclass
class TransformerConfig:
    patch_size: int = option(2, "latent patch size", min=1)
    num_layers: int = option(6, "MM-DiT blocks", min=1)
    num_heads: int = option(4, "attention heads", min=1)
    head_dim: int = option(32, "width per head (model width = heads × head_dim)", min=8)
    qk_norm: str = option("rms_norm", "query/key normalisation ('none' to disable)", choices=("none", "rms_norm"))


@dataclass
class BaseModelConfig:
    image_size: int = option(32, "image side in pixels", min=16)
    shift: float = option(3.0, "flow sigma shift of the scheduler (SD3 uses 3.0)", min=0.1)
    t5_tokens: int = option(0, "zero 'T5' tokens appended to the prompt (pass as max_sequence_length)", min=0, max=512)
    vae: VaeConfig = section(VaeConfig, "the autoencoder")
    text: TextEncoderConfig = section(TextEncoderConfig, "the two CLIP text encoders")
    transformer: TransformerConfig = section(TransformerConfig, "the SD3 transformer")

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.vae.block_out_channels) - 1)


def _clip_encoder(cfg: TextEncoderConfig, vocab_size: int, bos: int, eos: int) -> CLIPTextModelWithProjection:
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=4 * cfg.hidden_size,
                            projection_dim=cfg.projection_dim, num_hidden_layers=cfg.num_layers,
                            num_attention_heads=cfg.num_heads, max_position_embeddings=cfg.max_length,
                            hidden_act="gelu", bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    return CLIPTextModelWithProjection(config)


def build_pipeline(cfg: BaseModelConfig, words: list[str], seed: int = 0) -> StableDiffusion3Pipeline:
    """A freshly initialised tiny SD3 pipeline for a world whose prompts use ``words``."""
    torch.manual_seed(seed)
    n_levels = len(cfg.vae.block_out_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=cfg.vae.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * n_levels, up_block_types=("UpDecoderBlock2D",) * n_levels,
        block_out_channels=tuple(cfg.vae.block_out_channels), layers_per_block=cfg.vae.layers_per_block,
        norm_num_groups=cfg.vae.norm_num_groups, sample_size=cfg.image_size,
        mid_block_add_attention=cfg.vae.mid_attention, scaling_factor=1.0, shift_factor=0.0)
    tokenizer = build_clip_tokenizer(words, cfg.text.max_length)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    text_encoder = _clip_encoder(cfg.text, len(tokenizer), bos, eos)
    text_encoder_2 = _clip_encoder(cfg.text, len(tokenizer), bos, eos)
    width = cfg.transformer.num_heads * cfg.transformer.head_dim
    clip_width = 2 * cfg.text.hidden_size
    tokens_per_side = cfg.latent_size // cfg.transformer.patch_size
    transformer = SD3Transformer2DModel(
        sample_size=cfg.latent_size, patch_size=cfg.transformer.patch_size, in_channels=cfg.vae.latent_channels,
        out_channels=cfg.vae.latent_channels, num_layers=cfg.transformer.num_layers,
        attention_head_dim=cfg.transformer.head_dim, num_attention_heads=cfg.transformer.num_heads,
        joint_attention_dim=clip_width, caption_projection_dim=width,
        pooled_projection_dim=2 * cfg.text.projection_dim, pos_embed_max_size=tokens_per_side,
        qk_norm=None if cfg.transformer.qk_norm == "none" else cfg.transformer.qk_norm)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=cfg.shift)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None)


def usage_note(cfg: BaseModelConfig, model_dir: str) -> str:
    """What a stock-diffusers user must pass to sample this model (saved next to it as USAGE.md)."""
    return f"""# Using this model with plain diffusers

```python
import torch
from diffusers import StableDiffusion3Pipeline
pipe = StableDiffusion3Pipeline.from_pretrained("{model_dir}", text_encoder_3=None, tokenizer_3=None)
image = pipe("a photo of a red circle", num_inference_steps=20, guidance_scale=1.5,   # the project's default
             max_sequence_length={cfg.t5_tokens},   # required: the model was trained with {cfg.t5_tokens} zero T5 tokens
             generator=torch.Generator().manual_seed(0)).images[0]   # {cfg.image_size}x{cfg.image_size} px
```

- There is no T5 encoder (`text_encoder_3=None`); without `max_sequence_length={cfg.t5_tokens}` the pipeline
  appends 256 zero tokens the model never saw in training, which changes its outputs.
- Images are {cfg.image_size}x{cfg.image_size} (the default height/width); the scheduler is flow-matching Euler with
  shift {cfg.shift}. The embedded base samples best at low guidance (CFG 1.5, every command's default).
- Prompts outside the shapes grammar still run, but unknown words are split into characters the model never
  learned.
"""
