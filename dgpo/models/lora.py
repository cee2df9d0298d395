"""Named LoRA adapters on the transformer (peft), the reference as "adapters disabled", and export in the
diffusers LoRA format that ``StableDiffusion3Pipeline.load_lora_weights`` reads.

LoRA replaces a frozen weight W by W + (α/r)·B·A with A ∈ R^{r×d_in}, B ∈ R^{d_out×r}; B starts at zero,
so a fresh adapter leaves the model unchanged and the reference model is the same network with the
adapters switched off: no second copy of the backbone is kept.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import StableDiffusion3Pipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

# The joint-attention projections of every MM-DiT block (image and text streams).
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
# The feed-forward layers of both streams (the MLPs hold most of a block's weights).
FEED_FORWARD = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
LORA_TARGETS = {"attention": ATTENTION_PROJECTIONS, "attention_ff": ATTENTION_PROJECTIONS + FEED_FORWARD}


def add_lora(transformer, rank: int = 16, alpha: float | None = None,
             target_modules: tuple[str, ...] = ATTENTION_PROJECTIONS, adapter_name: str = "default",
             seed: int = 0) -> list[torch.nn.Parameter]:
    """Attach a LoRA adapter to ``transformer`` (frozen backbone); returns the trainable parameters."""
    transformer.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, init_lora_weights="gaussian",
                        target_modules=list(target_modules))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        transformer.add_adapter(config, adapter_name=adapter_name)
    transformer.set_adapter(adapter_name)
    return lora_parameters(transformer)


def lora_parameters(transformer) -> list[torch.nn.Parameter]:
    """The LoRA parameters, in a fixed order (optimiser and checkpoint state rely on it)."""
    return [p for n, p in transformer.named_parameters() if "lora_" in n]


@contextmanager
def adapters_disabled(transformer):
    """Run the frozen base: the DGPO reference model π_ref."""
    transformer.disable_adapters()
    try:
        yield
    finally:
        transformer.enable_adapters()


def lora_state(transformer) -> dict[str, torch.Tensor]:
    """The adapter weights as a peft state dict (keys without the adapter name)."""
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(transformer).items()}


def load_lora_state(transformer, state: dict[str, torch.Tensor], adapter_name: str = "default") -> None:
    result = set_peft_model_state_dict(transformer, state, adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"LoRA state has keys the model does not: {unexpected[:3]}")


def lora_metadata(transformer, adapter_name: str = "default") -> dict:
    """The adapter's LoRA config (rank, alpha, targets …) as diffusers saves it beside the weights: without it
    a loader assumes alpha = rank, and a LoRA trained with another alpha would load at the wrong scale."""
    return transformer.peft_config[adapter_name].to_dict()


def save_lora_diffusers(transformer, out_dir: str | Path, adapter_name: str = "default") -> Path:
    """Write ``pytorch_lora_weights.safetensors`` (with its LoRA config) for ``pipe.load_lora_weights(out_dir)``."""
    return write_diffusers_lora(get_peft_model_state_dict(transformer, adapter_name=adapter_name),
                                lora_metadata(transformer, adapter_name), out_dir)


def write_diffusers_lora(weights: dict[str, torch.Tensor], config: dict, folder: str | Path) -> Path:
    """A diffusers LoRA folder from weights by peft name and their LoRA config (no model needed, e.g. from a
    checkpoint)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    StableDiffusion3Pipeline.save_lora_weights(str(folder), transformer_lora_layers=weights,
                                               transformer_lora_adapter_metadata=config, safe_serialization=True)
    return folder
