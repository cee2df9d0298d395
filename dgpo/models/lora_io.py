"""LoRA weights in the diffusers format, loadable with ``pipe.load_lora_weights(folder)``."""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from pathlib import Path

from dgpo.errors import UserError

LORA_FILE = "pytorch_lora_weights.safetensors"


def check_lora_folder(lora_dir: str | Path | None) -> None:
    """A LoRA folder holds diffusers LoRA weights (nothing to check for None): checked before any model is
    built, so a wrong path fails at once."""
    if lora_dir and not (Path(lora_dir) / LORA_FILE).is_file():
        raise UserError(f"LoRA folder {str(lora_dir)!r} has no {LORA_FILE}: pass a folder such as RUN/final/lora")


@contextmanager
def quiet_loaders():
    """diffusers' and peft's log records and warnings silenced (restored after)."""
    loggers = [logging.getLogger(name) for name in ("diffusers", "peft")]
    levels = [lg.level for lg in loggers]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for lg in loggers:
                lg.setLevel(logging.CRITICAL)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def load_lora_into_pipeline(pipe, lora_dir: str | Path, adapter_name: str = "default") -> None:
    """Load a diffusers-format LoRA folder into ``pipe`` (as stock diffusers users do). A file that is not
    safetensors, a LoRA for another architecture (keys or shapes that do not fit) and one whose keys match no
    layer of this pipeline (which diffusers skips without a word) are each one clear UserError."""
    check_lora_folder(lora_dir)
    from safetensors import SafetensorError
    try:
        with quiet_loaders():  # their log lines would repeat the error below
            pipe.load_lora_weights(str(lora_dir), adapter_name=adapter_name)
    except (OSError, SafetensorError) as e:
        raise UserError(f"LoRA file '{Path(lora_dir) / LORA_FILE}' is not readable safetensors "
                        f"({' '.join(str(e).split())[:120]}): export it again (dgpo export RUN --out DIR)") from None
    except (ValueError, RuntimeError, KeyError) as e:  # peft: no matching module; torch: size mismatch
        first = next((line.strip() for line in str(e).splitlines() if line.strip() and "Error(s)" not in line), "")
        raise UserError(f"LoRA folder {str(lora_dir)!r} does not fit this {type(pipe).__name__} "
                        f"({type(e).__name__}: {first[:160]}): it was trained for another model or "
                        f"architecture") from None
    loaded = [m for m in pipe.transformer.modules() if adapter_name in getattr(m, "lora_A", {})]
    if not loaded:
        raise UserError(f"LoRA folder {str(lora_dir)!r} has no weight for this {type(pipe).__name__}'s transformer "
                        f"(its keys match none of its layers, e.g. a UNet's LoRA): nothing would change")
