"""The work folder of a base being pretrained: what lets a stopped pretraining continue exactly.

``<cache>/base/<key>.partial/`` holds

- ``autoencoder/``: the trained VAE after stage 1 (``tensors.safetensors``: weights and the RNG states at
  the end of stage 1; ``state.json``: the latent shift and std that scale the latents, and stage 1's
  summary), so a resumed pretraining never redoes stage 1;
- ``checkpoints/step-N/``: flow-stage checkpoints in :mod:`dgpo.runtime.checkpoint`'s format: the trained modules
  (transformer, text encoders), their EMA, the AdamW moments and the RNG states as tensors; the step,
  AdamW's scalars, the LR scheduler's state, the loss history and the seconds spent as JSON.

Every part is written into a temporary folder and renamed into place, so a killed process leaves either
the previous state or the new one. Restoring all of it reproduces the uninterrupted run bit for bit on the
same machine and thread count (the latents are re-encoded by the restored VAE, which is deterministic
there).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from dgpo.runtime.checkpoint import (capture_rng, latest_checkpoint, load_checkpoint, optimizer_from_flat, optimizer_to_flat,
                             restore_rng, save_checkpoint, save_tensors)
from dgpo.runtime.ema import EMA

AUTOENCODER = "autoencoder"


def _module_tensors(modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    return {f"module.{name}.{k}": v.detach().clone().contiguous()
            for name, m in modules.items() for k, v in m.state_dict().items()}


def _load_modules(modules: dict[str, torch.nn.Module], tensors: dict[str, torch.Tensor]) -> None:
    for name, m in modules.items():
        prefix = f"module.{name}."
        m.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=True)


class PartialBase:
    """The partial work of one base (one cache key), in ``folder``."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def exists(self) -> bool:
        return self.folder.is_dir()

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    # ---------------------------------------------------------------------------------- stage 1
    def save_autoencoder(self, vae, generators: dict[str, torch.Generator], info: dict) -> None:
        """Store the stage-1 VAE, the RNG states after stage 1 and ``info`` (JSON: latent shift/std, summary)."""
        tensors = _module_tensors({"vae": vae})
        rng_tensors, rng_scalars = capture_rng(generators)
        final = self.folder / AUTOENCODER
        tmp = self.folder / f".{AUTOENCODER}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            save_tensors({**tensors, **rng_tensors}, tmp / "tensors.safetensors")
            (tmp / "state.json").write_text(json.dumps({"info": info, "rng": rng_scalars}))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def load_autoencoder(self, vae, generators: dict[str, torch.Generator]) -> dict | None:
        """Restore the stage-1 VAE and RNG states; returns the stored info, or None when stage 1 is not done."""
        path = self.folder / AUTOENCODER
        if not (path / "state.json").is_file():
            return None
        tensors, state = load_checkpoint(path)
        _load_modules({"vae": vae}, tensors)
        restore_rng(generators, tensors, state["rng"])
        return state["info"]

    # ---------------------------------------------------------------------------------- stage 2
    def save_flow(self, step: int, modules: dict[str, torch.nn.Module], opt: torch.optim.Optimizer, sched,
                  ema: EMA | None, generators: dict[str, torch.Generator], info: dict) -> Path:
        """Write the flow-stage checkpoint after ``step`` steps (keeping the previous one as a fallback)."""
        opt_tensors, opt_scalars = optimizer_to_flat(opt)
        rng_tensors, rng_scalars = capture_rng(generators)
        tensors = {**_module_tensors(modules), **opt_tensors, **rng_tensors}
        if ema is not None:
            tensors.update(ema.state_dict())
        state = {"optimizer": opt_scalars, "scheduler": sched.state_dict(), "rng": rng_scalars, "info": info}
        return save_checkpoint(self.folder, step, tensors, state, keep_last=2)

    def load_flow(self, modules: dict[str, torch.nn.Module], opt: torch.optim.Optimizer, sched, ema: EMA | None,
                  generators: dict[str, torch.Generator]) -> tuple[int, dict] | None:
        """Restore the newest flow checkpoint into freshly built objects; returns (step, info), or None."""
        path = latest_checkpoint(self.folder)
        if path is None:
            return None
        tensors, state = load_checkpoint(path)
        _load_modules(modules, tensors)
        optimizer_from_flat(opt, tensors, state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if ema is not None:
            ema.load_state_dict(tensors)
        restore_rng(generators, tensors, state["rng"])
        return int(state["step"]), state["info"]

    @torch.no_grad()
    def load_flow_weights(self, modules: dict[str, torch.nn.Module], ema: EMA | None) -> int | None:
        """Only the newest flow checkpoint's weights (the EMA's copied in when given), e.g. to look at an
        unfinished pretraining; returns its step, or None when there is no checkpoint."""
        path = latest_checkpoint(self.folder)
        if path is None:
            return None
        tensors, state = load_checkpoint(path)
        _load_modules(modules, tensors)
        if ema is not None:
            ema.load_state_dict(tensors)
            ema.copy_to_params()
        return int(state["step"])

    def flow_info(self) -> dict | None:
        """The info (loss history, seconds) of the newest flow checkpoint, without loading its tensors."""
        path = latest_checkpoint(self.folder)
        return json.loads((path / "state.json").read_text())["info"] if path is not None else None
