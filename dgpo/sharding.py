"""Sharding the frozen model over the training processes: FSDP2 (``torch.distributed.fsdp.fully_shard``).

Only LoRA adapters train, so what fills a GPU is the frozen model: SD3.5-Medium's transformer (2.5 B
parameters, 5 GiB in bf16), FLUX.1's (12 B, 24 GiB) and its T5 encoder (4.7 B, 9.5 GiB). Launched with an FSDP
accelerate config (``fsdp_version: 2``, e.g. ``configs/accelerate/gpus_8_fsdp.yaml``), each of the N processes
keeps 1/N of every frozen weight of the backbone and of the text encoders, and gathers one block's weights only
for that block's forward and backward (ZeRO-3 for the frozen weights; the VAE, small, stays whole).

The adapters' parameters are left out of the sharding (``ignored_params``): every process keeps a full copy of
them and their gradients are summed by :meth:`dgpo.processes.Processes.sum_gradients` exactly as in plain data
parallel, so no recipe changes — a test checks that a sharded two-process run trains like one process.

What sharding asks of the recipes: every process calls each sharded module the same number of times (a block's
forward gathers its weights from all processes; a process that skips a call leaves the others waiting). Global
draws give every process the same rollouts and steps; prompt encodings are looked up for the whole global batch
(:meth:`dgpo.prompt_encodings.PromptEncodings.batch`) and evaluation runs as many batches on every process
(:func:`dgpo.generation.generate_images`).

Of the FSDP config, ``fsdp_reshard_after_forward`` (free a block's gathered weights after its forward: least
memory; false keeps them until the backward, one gather fewer) and ``fsdp_offload_params`` (keep the shards in
CPU memory, on GPUs) are read; blocks are the modules each model names in ``_no_split_modules``, so the
wrap-policy keys are not needed.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Mapping

import torch

from dgpo.errors import UserError


@dataclass(frozen=True)
class Sharding:
    """How the frozen weights are sharded (from the FSDP launch config)."""

    reshard_after_forward: bool = True
    offload: bool = False

    @classmethod
    def of_launch(cls, env: Mapping[str, str]) -> "Sharding | None":
        """The sharding an ``accelerate launch`` with an FSDP config asks for (its ``FSDP_*`` variables), or
        None for any other launch. FSDP1 (``fsdp_version: 1``) wraps a model to train all of it, which is not
        what happens here: one clear error."""
        if str(env.get("ACCELERATE_USE_FSDP", "")).lower() != "true":
            return None
        version = str(env.get("FSDP_VERSION", "1"))
        if version != "2":
            raise UserError(f"the FSDP launch config has fsdp_version: {version}; the frozen model is sharded with "
                            f"FSDP2: set fsdp_version: 2 (see configs/accelerate/gpus_8_fsdp.yaml)")
        return cls(reshard_after_forward=str(env.get("FSDP_RESHARD_AFTER_FORWARD", "true")).lower() == "true",
                   offload=str(env.get("FSDP_OFFLOAD_PARAMS", "false")).lower() == "true")


def shard_frozen_module(module: torch.nn.Module, mesh, sharding: Sharding) -> None:
    """``fully_shard`` each block of ``module`` (its ``_no_split_modules`` classes), then the module itself for
    the rest; parameters that train (``requires_grad``: the adapters) are left whole on every process."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    trainable = {p for p in module.parameters() if p.requires_grad}
    offload = CPUOffloadPolicy() if sharding.offload and mesh.device_type == "cuda" else OffloadPolicy()
    kwargs = dict(mesh=mesh, reshard_after_forward=sharding.reshard_after_forward, offload_policy=offload)
    block_classes = set(getattr(module, "_no_split_modules", None) or ())
    for block in [m for m in module.modules() if type(m).__name__ in block_classes and m is not module]:
        fully_shard(block, ignored_params={p for p in block.parameters() if p in trainable}, **kwargs)
    fully_shard(module, ignored_params=trainable, **kwargs)


def shard_frozen_model(model, processes, sharding: Sharding, log=print) -> tuple[int, int]:
    """Shard every frozen module of ``model`` (a handle's :meth:`frozen_modules`: the backbone and the text
    encoders) over ``processes``; returns (frozen parameters this process holds, frozen parameters in all),
    and says both. Call it once every adapter is on the backbone."""
    from torch.distributed.device_mesh import init_device_mesh

    if not processes.distributed:
        return (0, 0)
    # The backbones return views (diffusers reshapes its output): FSDP2 warns that an in-place op on one would skip
    # the gather before its backward. No recipe writes into a velocity in place, and the sharded runs' gradients
    # equal the unsharded ones (tests/test_multiprocess.py), so the warning is silenced rather than shown each run.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(model.device.type, (processes.world,))
    for module in model.frozen_modules().values():
        shard_frozen_module(module, mesh, sharding)
    held = total = 0
    for module in model.frozen_modules().values():
        for p in module.parameters():
            if not p.requires_grad:
                local = p.to_local() if hasattr(p, "to_local") else p
                held, total = held + local.numel(), total + p.numel()
    log(f"frozen model sharded over {processes.world} processes (FSDP2): each holds about {held / 1e6:.2f} M of the "
        f"{total / 1e6:.2f} M frozen parameters")
    return held, total
