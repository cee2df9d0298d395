"""LoRA weights in the diffusers format, loadable with ``pipe.load_lora_weights(folder)``."""

from __future__ import annotations

from pathlib import Path

from dgpo.errors import UserError

LORA_FILE = "pytorch_lora_weights.safetensors"


def load_lora_into_pipeline(pipe, lora_dir: str | Path, adapter_name: str = "default") -> None:
    """Load a diffusers-format LoRA folder into ``pipe`` (as stock diffusers users do)."""
    path = Path(lora_dir)
    if not (path / LORA_FILE).is_file():
        raise UserError(f"LoRA folder {str(path)!r} has no {LORA_FILE}: pass a folder such as RUN/final/lora")
    pipe.load_lora_weights(str(path), adapter_name=adapter_name)
