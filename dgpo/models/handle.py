"""The model handle: everything an algorithm may use of a model, and its first implementation, the SD3 family.

No algorithm (DGPO and its baselines, TDM, samplers, evaluation) touches a pipeline: each works on a
:class:`FlowModel` — the protocol below — which a model family implements over its own diffusers pipeline:

- ``from_pretrained(folder)``: a local pipeline folder (``save_pretrained``'s layout), frozen but for the
  backbone; :func:`load_model` picks the family from the folder's ``model_index.json``;
- prompt encoding (CFG's empty prompt as the pipeline encodes it);
- velocity prediction ``v_θ(x_σ, σ, c)`` (and the CFG combination) in the rectified-flow convention
  ``x_σ = (1 − σ)·x₀ + σ·ε``, target ``v = ε − x₀``; ``scheduler_config``: the flow schedule (its shift). The
  samplers pass fp32 latents whatever the weights' dtype: a handle casts them to its transformer's dtype at the
  call and returns the velocity in the latents' dtype (so bf16 weights or autocast never round the state);
- latent encode/decode; ``latent_shape``, ``image_size``;
- ``transformer``: the backbone that adapters go on, and ``lora_targets(kind)``: its module names for a
  kind of adapter ("attention", "attention_ff");
- ``with_transformer(backbone)`` (the same model with another backbone: a fully fine-tuned student),
  ``save_pretrained(folder)`` and ``fuse_lora(folder)`` (a diffusers-format LoRA folded in, for sampling);
- ``frozen_modules()``: the backbone and the text encoders, which a sharded launch splits (:mod:`dgpo.runtime.sharding`).

:class:`SD3Model` implements it for ``StableDiffusion3Pipeline`` (the shapes base, SD3-Medium, SD3.5-Medium
and -Large; the transformer's timestep is ``t = 1000·σ``; latents ``z = (E(x) − shift)·scale``). Another
family registers its handle with :func:`dgpo.models.families.register_model_family` under its pipeline's class name.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from diffusers import StableDiffusion3Pipeline

from dgpo.errors import UserError, shown


@dataclass
class PromptEmbeds:
    """Encoded prompts: token embeddings (B, L, D) and pooled embeddings (B, P). What ``pooled`` holds is the
    family's (Z-Image, which pools nothing, keeps each prompt's token count there); prompts of a batch may have
    been encoded to different lengths L, and :meth:`cat` pads the shorter with zeros."""

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
        longest = max(e.tokens.shape[1] for e in items)
        tokens = [torch.nn.functional.pad(e.tokens, (0, 0, 0, longest - e.tokens.shape[1])) for e in items]
        return PromptEmbeds(torch.cat(tokens), torch.cat([e.pooled for e in items]))


def load_pipeline(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> StableDiffusion3Pipeline:
    """Load a local SD3 pipeline directory (T5 left out), with a clear error when it is missing or incomplete."""
    return open_pipeline(StableDiffusion3Pipeline, model_dir, dtype, ("text_encoder_3", "tokenizer_3"),
                         text_encoder_3=None, tokenizer_3=None)


def open_pipeline(pipeline_cls, model_dir: str | Path, dtype: torch.dtype = torch.float32,
                  skipped: tuple[str, ...] = (), **components):
    """A local ``pipeline_cls`` folder (``components`` passed on, e.g. ``text_encoder_3=None`` for the
    ``skipped`` ones), its progress bars off; a folder that is not a pipeline, half a pipeline or damaged
    weights are each one clear UserError."""
    path = Path(model_dir)
    if not (path / "model_index.json").is_file():
        raise UserError(
            f"model directory {str(path)!r} has no model_index.json: pass a folder written by "
            f"`save_pretrained` (e.g. the one `dgpo pretrain` prints)")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging
    diffusers_logging.disable_progress_bar()  # no per-component loading bars: a local load takes a blink
    transformers_logging.disable_progress_bar()
    check_components(path, skipped)
    with damaged_pipeline_is_a_user_error(path):
        pipe = pipeline_cls.from_pretrained(str(path), dtype=dtype, **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_components(path: Path, skipped: tuple[str, ...] = ()) -> None:
    """Every component ``model_index.json`` names (but ``skipped`` and null ones) is a folder in ``path``: a
    half-copied pipeline is one clear line, not a loader's traceback."""
    import json
    try:
        index = json.loads((path / "model_index.json").read_text())
        named = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is not None]
    except (ValueError, AttributeError, IndexError, TypeError):
        raise UserError(f"'{path / 'model_index.json'}' is not a pipeline index (not a JSON object): pass a "
                        f"folder written by `save_pretrained`") from None
    missing = [k for k in named if k not in skipped and not (path / k).is_dir()]
    if missing:
        raise UserError(f"model directory {str(path)!r} is incomplete: no {', '.join(missing)} folder (its "
                        f"model_index.json names them); copy the whole folder that `save_pretrained` wrote")


@contextmanager
def damaged_pipeline_is_a_user_error(path: Path):
    """A component whose files are missing, truncated or not weights at all: one line naming the folder."""
    from safetensors import SafetensorError
    try:
        yield
    except (OSError, ValueError, SafetensorError, RuntimeError) as e:
        reason = " ".join(str(e).split())[:200]
        raise UserError(f"model directory {str(path)!r} could not be loaded ({type(e).__name__}: {reason}): a file "
                        f"in it is missing, truncated or damaged; copy the folder again") from None


def t5_tokens_of(model_dir: str | Path) -> int:
    """How many zero T5 tokens a base was trained with (from its pretrain_config.yaml; 0 if unknown)."""
    import yaml
    cfg = Path(model_dir) / "pretrain_config.yaml"
    if cfg.is_file():
        return int(yaml.safe_load(cfg.read_text())["model"]["t5_tokens"])
    return 0


@runtime_checkable
class FlowModel(Protocol):
    """The model handle every algorithm works on (see the module docstring); :class:`SD3Model` is one."""

    family: str
    max_sequence_length: int

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, dtype: torch.dtype = torch.float32) -> "FlowModel": ...
    @property
    def transformer(self) -> torch.nn.Module: ...
    @property
    def device(self) -> torch.device: ...
    @property
    def dtype(self) -> torch.dtype: ...
    @property
    def latent_shape(self) -> tuple[int, int, int]: ...
    @property
    def image_size(self) -> int: ...
    @property
    def scheduler_config(self): ...
    def lora_targets(self, kind: str) -> tuple[str, ...]: ...
    def to(self, device) -> "FlowModel": ...
    def with_transformer(self, transformer: torch.nn.Module) -> "FlowModel": ...
    def save_pretrained(self, folder: str | Path) -> None: ...
    def fuse_lora(self, lora_dir: str | Path) -> None: ...
    def frozen_modules(self) -> dict[str, torch.nn.Module]: ...
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds: ...
    def negative_embeds(self, batch: int) -> PromptEmbeds: ...
    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor, embeds: PromptEmbeds) -> torch.Tensor: ...
    def velocity_at_timestep(self, latents: torch.Tensor, timestep: torch.Tensor,
                             embeds: PromptEmbeds) -> torch.Tensor: ...
    def guided_velocity(self, latents: torch.Tensor, sigma: torch.Tensor, embeds: PromptEmbeds,
                        guidance_scale: float) -> torch.Tensor: ...
    def guided_velocity_at_timestep(self, latents: torch.Tensor, timestep: torch.Tensor, embeds: PromptEmbeds,
                                    guidance_scale: float) -> torch.Tensor: ...
    def encode_images(self, images, sample: bool = False, generator: torch.Generator | None = None
                      ) -> torch.Tensor: ...
    def decode_latents(self, latents: torch.Tensor, output: str = "uint8"): ...


def check_prompt_lengths(tokenizer, prompts: list[str]) -> None:
    """Every prompt fits ``tokenizer.model_max_length`` tokens (start and end tokens included)."""
    limit = tokenizer.model_max_length
    for prompt in dict.fromkeys(prompts):
        n = len(tokenizer(prompt, truncation=False)["input_ids"])
        if n > limit:
            raise UserError(f"prompt {shown(prompt)!r} is {n} tokens; the text encoder reads at most {limit} (the rest would "
                            f"be dropped without a word): shorten it")


class DiffusersModel:
    """What every handle over a diffusers pipeline shares (the :class:`FlowModel` protocol's plumbing): the
    pipeline's parts, moving and saving it, fusing a LoRA, the LoRA target sets, the empty prompt's embeddings,
    σ → timestep, true CFG, and the VAE's latent coding. A family subclass sets ``family``, ``label`` and
    ``lora_target_sets``, calls ``__init__`` with its pipeline, image size and the size's required multiple, and
    implements ``from_pretrained``, ``with_transformer``, ``at_resolution``, ``scheduler_config``,
    ``latent_shape``, ``encode_prompts`` and ``velocity_at_timestep``."""

    family = ""
    label = ""  # in messages: "the SD3 family", "SD3 images"
    lora_target_sets: dict[str, tuple[str, ...]] = {}

    def __init__(self, pipe, image_size: int, multiple: int):
        self.pipe = pipe
        if image_size % multiple:
            raise UserError(f"{self.label} images must be a multiple of {multiple} pixels, got {image_size}")
        self._image_size = image_size
        self._negative: PromptEmbeds | None = None

    def to(self, device):
        self.pipe.to(device)
        self._negative = None
        return self

    def save_pretrained(self, folder: str | Path) -> None:
        self.pipe.save_pretrained(str(folder))

    def fuse_lora(self, lora_dir: str | Path) -> None:
        """Fold a diffusers-format LoRA folder into the backbone (``fuse_lora`` + ``unload_lora_weights``: the
        same function, without the adapters' extra products at every step)."""
        from dgpo.models.lora_io import load_lora_into_pipeline
        load_lora_into_pipeline(self.pipe, lora_dir)
        self.pipe.fuse_lora()
        self.pipe.unload_lora_weights()

    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        """The backbone and the text encoders by pipeline name: what a sharded launch splits over the processes
        (:mod:`dgpo.runtime.sharding`; the VAE, small, stays whole)."""
        return {name: part for name, part in self.pipe.components.items()
                if isinstance(part, torch.nn.Module) and name != "vae"}

    def lora_targets(self, kind: str) -> tuple[str, ...]:
        """The backbone's module names for ``kind``: "attention" (the attention projections) or
        "attention_ff" (and the feed-forward layers)."""
        if kind not in self.lora_target_sets:
            raise UserError(f"LoRA targets {kind!r}: the {self.label} family has {sorted(self.lora_target_sets)}")
        return self.lora_target_sets[kind]

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
    def image_size(self) -> int:
        return self._image_size

    # -------------------------------------------------------------------------------- text
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

    def guided_velocity(self, latents: torch.Tensor, sigma: torch.Tensor, embeds: PromptEmbeds,
                        guidance_scale: float) -> torch.Tensor:
        """CFG velocity v_u + w·(v_c − v_u) at noise level σ (see :meth:`guided_velocity_at_timestep`)."""
        return self.guided_velocity_at_timestep(latents, sigma * 1000.0, embeds, guidance_scale)

    def guided_velocity_at_timestep(self, latents: torch.Tensor, timestep: torch.Tensor, embeds: PromptEmbeds,
                                    guidance_scale: float) -> torch.Tensor:
        """True CFG v_u + w·(v_c − v_u) against the empty prompt, computed like the pipelines: one batch
        [uncond; cond]. Guidance ≤ 1 means no CFG (one conditional pass), as in diffusers."""
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
        x = (x.permute(0, 3, 1, 2).float() / 127.5 - 1.0).to(self.vae.dtype)
        dist = self.vae.encode(x).latent_dist
        z = dist.sample(generator) if sample else dist.mode()
        cfg = self.vae.config
        return (z.float() - (cfg.shift_factor or 0.0)) * cfg.scaling_factor

    def decode_latents(self, latents: torch.Tensor, output: str = "uint8") -> np.ndarray | torch.Tensor:
        """Scaled latents → images: uint8 (B, S, S, 3) numpy, float in [0, 1] numpy ("np"), or the raw
        decoder output in [-1, 1] as a tensor ("pt-raw", differentiable)."""
        cfg = self.vae.config
        z = latents / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        raw = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0].float()
        if output == "pt-raw":
            return raw
        images = self.pipe.image_processor.postprocess(raw.detach(), output_type="np")
        if output == "np":
            return images
        return (images * 255).round().astype(np.uint8)


def freeze_all_but_transformer(pipe):
    """Every module of ``pipe`` but the backbone frozen (text encoders, VAE): adapters train the backbone."""
    for name, part in pipe.components.items():
        if isinstance(part, torch.nn.Module) and name != "transformer":
            part.requires_grad_(False)
    return pipe


class SD3Model(DiffusersModel):
    """The SD3 family's handle: velocity, prompt encoding and latent coding over a ``StableDiffusion3Pipeline``
    (T5 left out: ``max_sequence_length`` zero T5 tokens, as the shapes base was trained)."""

    family = "sd3"
    label = "SD3"

    def __init__(self, pipe: StableDiffusion3Pipeline, max_sequence_length: int = 0, image_size: int = 0):
        super().__init__(pipe, image_size or pipe.transformer.config.sample_size * pipe.vae_scale_factor,
                         pipe.vae_scale_factor * pipe.transformer.config.patch_size)
        self.max_sequence_length = max_sequence_length

    def at_resolution(self, image_size: int) -> "SD3Model":
        """The same model sampling ``image_size`` × ``image_size`` images (e.g. SD3.5-Medium at 512 px)."""
        return SD3Model(self.pipe, self.max_sequence_length, image_size)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, dtype: torch.dtype = torch.float32) -> "SD3Model":
        """A local SD3 pipeline folder; VAE and text encoders frozen (the backbone is what adapters train)."""
        return cls(freeze_all_but_transformer(load_pipeline(model_dir, dtype)),
                   max_sequence_length=t5_tokens_of(model_dir))

    def with_transformer(self, transformer: torch.nn.Module) -> "SD3Model":
        pipe = StableDiffusion3Pipeline(**{**self.pipe.components, "transformer": transformer})
        pipe.set_progress_bar_config(disable=True)
        return SD3Model(pipe, self.max_sequence_length, self._image_size)

    @property
    def lora_target_sets(self) -> dict[str, tuple[str, ...]]:
        """The MM-DiT's joint-attention projections of both streams, and with them the feed-forward layers."""
        from dgpo.models.lora import LORA_TARGETS
        return LORA_TARGETS

    @property
    def scheduler_config(self):
        """The flow-matching scheduler's config (``shift``, ``num_train_timesteps``, …)."""
        return self.pipe.scheduler.config

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of one latent at this handle's resolution (the pipeline's default unless set)."""
        size = self._image_size // self.pipe.vae_scale_factor
        return (self.transformer.config.in_channels, size, size)

    # -------------------------------------------------------------------------------- text
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        """Token and pooled embeddings of ``prompts`` (grad flows if the text encoders require it). A prompt
        longer than the CLIP encoders read is a UserError (the stock pipeline would drop its end quietly)."""
        check_prompt_lengths(self.pipe.tokenizer, prompts)
        tokens, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length)
        return PromptEmbeds(tokens, pooled)

    # -------------------------------------------------------------------------------- velocity
    def velocity_at_timestep(self, latents: torch.Tensor, timestep: torch.Tensor, embeds: PromptEmbeds) -> torch.Tensor:
        """The transformer call with the scheduler's timestep t = 1000·σ as is (samplers use this so that
        they feed the transformer exactly what the stock pipeline feeds it)."""
        timestep = timestep.float().reshape(-1).expand(latents.shape[0])
        v = self.transformer(hidden_states=latents.to(self.dtype), timestep=timestep,
                             encoder_hidden_states=embeds.tokens, pooled_projections=embeds.pooled, return_dict=False)[0]
        return v.to(latents.dtype)  # the state keeps its precision (fp32) whatever the weights' and autocast's


def static_shift_schedule(scheduler_config, image_tokens: int):
    """A flow scheduler config whose token-count shift (``use_dynamic_shifting``: shift e^μ, μ linear in the
    image's token count, as FLUX.1 and Z-Image schedule) is fixed at ``image_tokens`` as SD3's static
    ``shift``: σ' = s·σ / (1 + (s − 1)·σ) with s = e^μ equals the dynamic exp(μ) / (exp(μ) + 1/σ − 1). A config
    without dynamic shifting comes back as it is."""
    from diffusers.configuration_utils import FrozenDict
    cfg = dict(scheduler_config)
    if cfg.get("use_dynamic_shifting"):
        base, top = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
        low, high = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)
        mu = low + (high - low) * (image_tokens - base) / (top - base)  # diffusers' calculate_shift
        cfg.update(use_dynamic_shifting=False, shift=math.exp(mu))
    return FrozenDict(cfg)


def flow_interpolate(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_σ = (1 − σ)·x₀ + σ·ε (rectified-flow forward process, SD3 Eq. 2); sigma (B,)."""
    s = sigma.view(-1, *([1] * (x0.ndim - 1)))
    return (1.0 - s) * x0 + s * noise

