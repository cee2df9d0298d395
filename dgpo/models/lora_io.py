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


def read_lora_folder(lora_dir: str | Path, what: str = "LoRA folder") -> tuple[dict, float]:
    """The transformer weights of a diffusers LoRA folder by peft name (``transformer.`` dropped) and the scale
    α / r they were trained at (diffusers' saved LoRA config; without one, α = r as diffusers assumes).
    ``what`` names the folder in errors (e.g. "r1.init_lora")."""
    import json
    from safetensors import SafetensorError, safe_open
    path = Path(lora_dir) / LORA_FILE
    if not path.is_file():
        raise UserError(f"{what}: {str(lora_dir)!r} has no {LORA_FILE}: pass a LoRA folder such as RUN/final/lora")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            weights = {k.removeprefix("transformer."): f.get_tensor(k) for k in f.keys()
                       if k.startswith("transformer.")}
    except (OSError, SafetensorError) as e:
        raise UserError(f"{what}: '{path}' is not readable safetensors ({' '.join(str(e).split())[:120]})") from None
    if not weights:
        raise UserError(f"{what}: '{path}' holds no transformer LoRA weights")
    config = json.loads(meta.get("lora_adapter_metadata", "{}"))
    rank = next((v.shape[0] for k, v in weights.items() if k.endswith("lora_A.weight")), 1)
    rank = config.get("transformer.r", rank)
    alpha = config.get("transformer.lora_alpha", rank)
    return weights, float(alpha) / float(rank)
