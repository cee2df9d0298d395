"""Sharding the frozen model over the training processes: FSDP2 (``torch.distributed.fsdp.fully_shard``).

Only LoRA adapters train, so what fills a GPU is the frozen model: SD3.5-Medium's transformer (2.5 B
parameters), FLUX.1's (12 B) and its T5 encoder (4.7 B), 2 bytes each in bf16 (``model.weights_dtype``), 4 in
fp32. Launched with an FSDP
accelerate config (``fsdp_version: 2``, e.g. ``configs/accelerate/gpus_8_fsdp.yaml``), each of the N processes
keeps 1/N of every frozen weight of the backbone and of the text encoders' layers, and gathers one block's
weights only for that block's forward and backward (ZeRO-3 for the frozen weights; a text encoder's weights
outside its layers, e.g. T5's and Qwen3's token embeddings, and the VAE stay whole). Each process loads the whole
model into host memory and onto its device first and shards it then, so the model must fit one device at the start
(FLUX.1 with its text encoders in bf16: about 32 GiB, then about 4 GiB on each of 8 GPUs); what sharding frees is
room for the activations.

The adapters' parameters are left out of the sharding (``ignored_params``): every process keeps a full copy of
them and their gradients are summed by :meth:`dgpo.runtime.processes.Processes.sum_gradients` exactly as in plain data
parallel, so no recipe changes — a test checks that sharded processes train bitwise as the same processes
holding the whole model do.

What sharding asks of the recipes: every process calls each sharded module the same number of times (a block's
forward gathers its weights from all processes; a process that skips a call leaves the others waiting). Global
draws give every process the same rollouts and steps; prompt encodings are looked up for the whole global batch
(:meth:`dgpo.models.prompt_encodings.PromptEncodings.batch`); evaluation runs as many batches on every process
(:func:`dgpo.sampling.generation.generate_images`); and where a method's micro-batches follow this process's rows
(Flow-GRPO's random parts, DiffusionNFT's groups, a DGPO part with none of its rows) a process with fewer makes
the rest on a stand-in row whose loss it weights by zero (:attr:`dgpo.runtime.processes.Processes.lockstep`,
:func:`dgpo.methods.batch.lockstep_chunks`). An error on one process (out of memory, a reward server down) stops
it alone; the others wait in their next gather until the process group's timeout, as they would in a gradient sum.

Of the FSDP config only ``fsdp_version`` is used; ``fsdp_reshard_after_forward: false`` (which would leave every
block gathered after the no-grad calls) and ``fsdp_offload_params: true`` are refused. Blocks are the modules
each model names in ``_no_split_modules``, so the wrap-policy keys are not needed.
"""

from __future__ import annotations

import warnings
from typing import Mapping

import torch

from dgpo.errors import UserError


def sharded_launch(env: Mapping[str, str]) -> bool:
    """Whether ``accelerate launch`` was given an FSDP config (its ``ACCELERATE_USE_FSDP`` / ``FSDP_*`` variables);
    a config asking for what is not done here is one clear error. FSDP1 (``fsdp_version: 1``) wraps a model to
    train all of it."""
    if str(env.get("ACCELERATE_USE_FSDP", "")).lower() != "true":
        return False
    version = str(env.get("FSDP_VERSION", "1"))
    if version != "2":
        raise UserError(f"the FSDP launch config has fsdp_version: {version}; the frozen model is sharded with "
                        f"FSDP2: set fsdp_version: 2 (see configs/accelerate/gpus_8_fsdp.yaml)")
    if str(env.get("FSDP_RESHARD_AFTER_FORWARD", "true")).lower() != "true":
        raise UserError("the FSDP launch config has fsdp_reshard_after_forward: false, which frees a block's "
                        "gathered weights only after a backward: the no-grad calls (rollouts, reference, "
                        "evaluation, the text encoders) would leave the whole model gathered on every device. "
                        "Set it to true")
    if str(env.get("FSDP_OFFLOAD_PARAMS", "false")).lower() == "true":
        raise UserError("the FSDP launch config has fsdp_offload_params: true; keeping the shards in CPU memory "
                        "is not supported (the model handles place inputs on their weights' device): set it "
                        "to false")
    return True


def shard_frozen_module(module: torch.nn.Module, mesh, root: bool = True) -> None:
    """``fully_shard`` each block of ``module`` (its ``_no_split_modules`` classes), then, with ``root``, the module
    itself for the rest; parameters that train (``requires_grad``: the adapters) are left whole on every process."""
    from torch.distributed.fsdp import fully_shard

    trainable = {p for name, p in module.named_parameters() if p.requires_grad or "lora_" in name}
    block_classes = set(getattr(module, "_no_split_modules", None) or ())
    blocks = [m for m in module.modules() if type(m).__name__ in block_classes and m is not module]
    for block in reversed(blocks):  # inner blocks first, should a family's block classes nest
        fully_shard(block, mesh=mesh, reshard_after_forward=True,
                    ignored_params={p for p in block.parameters() if p in trainable})
    if root:
        fully_shard(module, mesh=mesh, reshard_after_forward=True, ignored_params=trainable)


def shard_frozen_model(model, processes, log=print) -> tuple[int, int]:
    """Shard every frozen module of ``model`` (a handle's :meth:`frozen_modules`: the backbone and the text
    encoders) over ``processes``; returns (frozen parameters this process holds, frozen parameters in all),
    and says both and how many stay whole. Call it once every adapter is on the backbone."""
    from torch.distributed.device_mesh import init_device_mesh

    if not processes.distributed:
        return (0, 0)
    # The backbones return views (diffusers reshapes its output): FSDP2 warns that an in-place op on one would skip
    # the gather before its backward. No recipe writes into a velocity in place, and the sharded runs' gradients
    # equal the unsharded ones (tests/test_multiprocess.py), so the warning is silenced rather than shown each run.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(model.device.type, (processes.world,))
    processes.lockstep = True  # from now on every process makes the same calls (Processes.calls)
    for module in model.frozen_modules().values():
        # A text encoder's own weights outside its layers (e.g. a token embedding) stay whole: sharding the
        # encoder itself renames its class, and transformers looks up which outputs a model records by class
        # name (Z-Image's Qwen3 would then return no hidden_states for the pipeline to read).
        shard_frozen_module(module, mesh, root=module is model.transformer)
    if model.device.type == "cuda":
        torch.cuda.empty_cache()  # the whole weights each process loaded are freed: give their memory back
    held = total = whole = 0
    for module in model.frozen_modules().values():
        for p in module.parameters():
            if not p.requires_grad:
                local = p.to_local() if hasattr(p, "to_local") else p
                held, total = held + local.numel(), total + p.numel()
                whole += 0 if hasattr(p, "to_local") else p.numel()
    log(f"frozen model sharded over {processes.world} processes (FSDP2): each holds about {held / 1e6:,.3f} M of the "
        f"{total / 1e6:,.3f} M frozen parameters ({whole / 1e6:,.3f} M, outside the text encoders' layers, whole)")
    return held, total
