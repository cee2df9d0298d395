"""Published TDM students as starting points for ``tdm-r1 train``.

The released TDM-R1 code keeps its 4-NFE SD3.5-Medium student as an EMA checkpoint,
``torch.save({"decay": d, "ema_parameters": [tensor, …]})``: a bare list of LoRA tensors (rank 32, α 64, on the
eight projections of every block's joint attention ``attn`` — not SD3.5's second attention ``attn2``) in the
order in which PEFT lists the adapter's parameters on the transformer. The list carries no names, so
:func:`convert_published_student` rebuilds that order on the user's own pipeline (a LoRA with the same rank,
α and targets, whose ``named_parameters`` order is PEFT's) and gives each tensor its name, checking count and
shapes; the result is our diffusers LoRA folder (``pipe.load_lora_weights``) with the ``sampler.json`` of the
released sampler's levels, which ``r1.init_lora`` starts from.

The released student samples with diffusers' ``DPMSolverMultistepScheduler`` (flow sigmas, shift 3, 4 steps:
levels 1, 0.90, 0.75, 0.50). Our student sampler takes one Euler (DDIM) step per level at those levels, the
first-order form of the same solver; TDM-R1 then trains the student under our sampler.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dgpo.errors import UserError

# The released recipe's student adapter (TDM-R1 training script, `LoraConfig` of the "tdm" adapter).
RELEASED_TARGETS = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                    "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v")
RELEASED_RANK, RELEASED_ALPHA = 32, 64.0
RELEASED_FLOW_SHIFT, RELEASED_STEPS = 3.0, 4
ROLE = "published"


def released_levels(steps: int = RELEASED_STEPS, flow_shift: float = RELEASED_FLOW_SHIFT) -> list[float]:
    """σ_0 = 1 > … > σ_{K−1}: the noise levels of the released sampler (DPM-Solver with flow sigmas, shifted by
    ``flow_shift``), the student's boundaries (for 4 steps and shift 3: 1, 0.90, 0.75, 0.50)."""
    from diffusers import DPMSolverMultistepScheduler
    scheduler = DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=flow_shift,
                                            prediction_type="flow_prediction")
    scheduler.set_timesteps(steps)
    levels = [float(s) for s in scheduler.sigmas[:steps]]
    return [1.0] + levels[1:]  # the scheduler's first level is 1 − 1/1000: the student starts from pure noise


def read_ema_parameters(path: str | Path) -> list[torch.Tensor]:
    """The tensors of a released EMA checkpoint (a dict with ``ema_parameters``, or a bare list), read with
    ``torch.load(weights_only=True)``: tensors, lists and numbers only, never arbitrary pickled code."""
    from dgpo.models.weights_file import load_weights_only
    state = load_weights_only(path, "tdm-r1 convert", "published student checkpoint (e.g. ema.ckpt)")
    tensors = state.get("ema_parameters") if isinstance(state, dict) else state
    if not isinstance(tensors, (list, tuple)) or not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
        raise UserError(f"{str(path)!r} holds no list of tensors (expected the EMA checkpoint's 'ema_parameters')")
    return list(tensors)


def convert_published_student(tensors: list[torch.Tensor], model, out: str | Path, rank: int = RELEASED_RANK,
                              alpha: float = RELEASED_ALPHA, targets: tuple[str, ...] = RELEASED_TARGETS,
                              levels: list[float] | None = None, base: str | Path = "BASE",
                              shown_as: str | Path | None = None, source: str = "the checkpoint") -> Path:
    """Write the published student's ``tensors`` (:func:`read_ema_parameters` of the file named ``source`` in
    errors) as a diffusers LoRA folder ``out`` for ``model`` (the SD3.5 pipeline it was trained on) with its
    ``sampler.json``/``USAGE.md`` (whose call loads the LoRA from ``shown_as``, default ``out``, and the pipeline
    from ``base``). The adapter added to ``model`` only names the tensors (PEFT's order) and is removed again.
    Returns ``out``."""
    from dgpo.models.adapters import AdapterRoles
    from dgpo.models.lora import write_diffusers_lora
    from tdm_r1.student import check_boundaries, write_sampler_files
    adapters = AdapterRoles(model.transformer)
    try:
        adapters.add(ROLE, rank, alpha, targets)
        named = adapters.named_parameters(ROLE)
        if len(tensors) != len(named):
            raise UserError(f"{source} holds {len(tensors)} tensors; a rank-{rank} LoRA on {len(targets)} "
                            f"projections of this transformer has {len(named)}: is it the student of this model "
                            f"(SD3.5-Medium for the released one)?")
        for i, ((name, p), t) in enumerate(zip(named, tensors)):
            if t.shape != p.shape:
                raise UserError(f"{source}: tensor {i} has shape {tuple(t.shape)} where this model's "
                                f"{name} has {tuple(p.shape)}: is it the student of this model, at rank {rank}?")
        weights = {name: t.to(p.dtype) for (name, p), t in zip(named, tensors)}
        write_diffusers_lora(weights, adapters.config(ROLE), out)
    finally:
        if ROLE in adapters.names:
            adapters.remove(ROLE)
    boundaries = check_boundaries(levels or released_levels())
    write_sampler_files(out, model, boundaries, base, shown_as or Path(out).resolve())
    return Path(out)
