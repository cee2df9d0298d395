"""LoRA weights in the diffusers format, loadable with ``pipe.load_lora_weights(folder)``."""

from __future__ import annotations

from pathlib import Path

from dgpo.errors import UserError

LORA_FILE = "pytorch_lora_weights.safetensors"


def check_lora_folder(lora_dir: str | Path | None) -> None:
    """A LoRA folder holds diffusers LoRA weights (nothing to check for None): checked before any model is
    built, so a wrong path fails at once."""
    if lora_dir and not (Path(lora_dir) / LORA_FILE).is_file():
        raise UserError(f"LoRA folder {str(lora_dir)!r} has no {LORA_FILE}: pass a folder such as RUN/final/lora")


def load_lora_into_pipeline(pipe, lora_dir: str | Path, adapter_name: str = "default") -> None:
    """Load a diffusers-format LoRA folder into ``pipe`` (as stock diffusers users do)."""
    check_lora_folder(lora_dir)
    pipe.load_lora_weights(str(lora_dir), adapter_name=adapter_name)
