"""Training on several processes: this process's rows of a global batch, and the collectives a recipe needs.

Launch any training command on N processes with accelerate (``accelerate launch --multi_gpu --num_processes N
-m dgpo.cli train …``; on a machine without GPUs the same command runs N CPU processes over gloo). Every
recipe follows one convention, so that N processes take exactly the step one process takes on the same
global batch (a test checks it for DGPO, Flow-GRPO and TDM):

1. **Identical generators, global draws.** Every process seeds its generators alike and draws every random
   number for the *whole* global batch, then keeps its own rows (:meth:`Processes.rows`). The generators never
   diverge between processes, a checkpoint written by the main process resumes every process, and N
   processes draw exactly what one process draws.
2. **Strided rows.** Process r owns rows r, r + N, r + 2N, … of a global batch (its size a multiple of N), so
   the G samples of a prompt spread over the processes the way a K-repeat sampler spreads them.
3. **Each process's loss is its share of the global loss** — a mean over its rows is scaled by n_local / n —
   and gradients are *summed* over the processes (:meth:`Processes.sum_gradients`) before clipping and the
   optimiser step, which are then identical everywhere.
4. **What couples rows is computed on all of them**: group advantages and self-normalised weights from
   gathered values (:meth:`Processes.gather_rows`, no gradient); DGPO's per-group sums through
   :meth:`Processes.sum_across` (all-reduce sum forward, identity backward: after the gradient sum each
   process's share adds up to the exact gradient of the global loss).
5. **Only the main process writes** the run folder; evaluation is sharded by image and gathered.

With one process every method is the identity, so single-process code pays nothing.
"""

from __future__ import annotations

from typing import Sequence

import torch

from dgpo.errors import UserError


def wire_device(tensor: torch.Tensor) -> torch.device:
    """Where the process group can carry ``tensor``: NCCL (what accelerate starts on GPUs) carries CUDA tensors
    only, so a CPU tensor (a reward, a count) goes to this process's GPU; gloo (CPU processes) carries any."""
    if tensor.device.type != "cuda" and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


def on_the_wire(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(wire_device(tensor))


def _all_reduce(tensor: torch.Tensor, op=torch.distributed.ReduceOp.SUM) -> torch.Tensor:
    """All-reduce (a sum, or ``op``) of ``tensor``, returned on its own device."""
    wire = on_the_wire(tensor)
    torch.distributed.all_reduce(wire, op=op)
    return wire.to(tensor.device)


class _SumAcross(torch.autograd.Function):
    """All-reduce sum in the forward pass, identity in the backward pass (see rule 4 above)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        return _all_reduce(tensor.detach().clone())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def check_launch(env) -> None:
    """One clear error for a launch config the trainers cannot honour (``accelerate launch`` sets
    ``ACCELERATE_USE_DEEPSPEED`` / ``ACCELERATE_USE_FSDP``). DeepSpeed: ZeRO stages 1–2 shard the optimiser states
    and gradients, which for LoRA adapters are a few MB, and stage 3 shards the weights, which an FSDP2 config does
    here for the frozen model (:mod:`dgpo.runtime.sharding`); FSDP1 is refused there."""
    if str(env.get("ACCELERATE_USE_DEEPSPEED", "")).lower() == "true":
        raise UserError("launched with a DeepSpeed accelerate config: only LoRA adapters train here, so ZeRO-1/2 "
                        "would shard a few MB of optimiser state; to shard the frozen model (ZeRO-3's saving) launch "
                        "with configs/accelerate/gpus_8_fsdp.yaml, or gpus_8.yaml for plain data parallel")
    from dgpo.runtime.sharding import sharded_launch
    sharded_launch(env)


class Processes:
    """The training processes as this process sees them; one process when not launched distributed."""

    def __init__(self, rank: int = 0, world: int = 1):
        self.rank, self.world = rank, world
        self.lockstep = False  # set under a sharded model (dgpo.runtime.sharding): every process makes the same model calls
        self.standing_in = False  # set while calls run only to keep the processes in step (not counted as NFE)

    @classmethod
    def of(cls, accelerator) -> "Processes":
        return cls(accelerator.process_index, accelerator.num_processes)

    @classmethod
    def launched(cls) -> "Processes":
        """The processes this program was launched on: one, or those of ``accelerate launch`` / ``torchrun``
        (their process group is set up here)."""
        import os
        check_launch(os.environ)
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return SINGLE
        from accelerate import PartialState
        state = PartialState(cpu=not torch.cuda.is_available())
        return cls(state.process_index, state.num_processes)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def sharded(self) -> bool:
        """Launched with an FSDP config on several processes: the frozen model is to be split over them
        (:func:`dgpo.runtime.sharding.shard_frozen_model`)."""
        import os
        from dgpo.runtime.sharding import sharded_launch
        return self.distributed and sharded_launch(os.environ)

    # ------------------------------------------------------------------------------------------- rows
    def rows(self, n: int, what: str = "the global batch") -> torch.Tensor:
        """The global rows this process owns: rank, rank + world, … (``n`` must be a multiple of world)."""
        if n % self.world:
            raise UserError(f"{what} has {n} samples, which {self.world} processes cannot share equally; "
                            f"make it a multiple of {self.world}")
        return torch.arange(self.rank, n, self.world)

    def stride(self, items: Sequence) -> list:
        """Items rank, rank + world, … of a list of any length (evaluation images; :meth:`gather_objects`
        puts them back in order)."""
        return list(items[self.rank::self.world])

    # ------------------------------------------------------------------------------------------- collectives
    def gather_rows(self, local: torch.Tensor) -> torch.Tensor:
        """The global tensor (n, ...) from every process's rows (n_local, ...), in global row order."""
        if not self.distributed:
            return local
        wire = on_the_wire(local.contiguous())
        parts = [torch.empty_like(wire) for _ in range(self.world)]
        torch.distributed.all_gather(parts, wire)
        stacked = torch.stack(parts, dim=1)  # (n_local, world, ...): row i·world + r is process r's row i
        return stacked.reshape(-1, *local.shape[1:]).to(local.device)

    def gather_objects(self, local: list) -> list:
        """A global list from every process's items of :meth:`share`, in global order."""
        if not self.distributed:
            return list(local)
        parts: list = [None] * self.world
        torch.distributed.all_gather_object(parts, list(local))
        return [parts[i % self.world][i // self.world] for i in range(sum(len(p) for p in parts))]

    def sum_across(self, tensor: torch.Tensor) -> torch.Tensor:
        """Σ over processes, differentiable with an identity backward (rule 4)."""
        return _SumAcross.apply(tensor) if self.distributed else tensor

    def sum_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Sum every parameter's gradient over the processes (a missing gradient counts as zero)."""
        if not self.distributed:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.copy_(_all_reduce(p.grad))

    def sum(self, value: float) -> float:
        """Σ of a number over the processes (e.g. transformer calls)."""
        if not self.distributed:
            return value
        return _all_reduce(torch.tensor([float(value)], dtype=torch.float64)).item()

    def calls(self, n: int) -> int:
        """How many times a loop calls the model on this process when its own rows need ``n`` calls: ``n``, or
        under a sharded model (:attr:`lockstep`) the most any process needs. A process with fewer makes the rest
        on a stand-in row whose loss it weights by zero (:func:`dgpo.methods.batch.lockstep_chunks`)."""
        if not (self.distributed and self.lockstep):
            return n
        return int(self.max(float(n)))

    def max(self, value: float) -> float:
        """The largest of a number over the processes (e.g. peak memory: every process then decides alike)."""
        if not self.distributed:
            return value
        return _all_reduce(torch.tensor([float(value)], dtype=torch.float64), torch.distributed.ReduceOp.MAX).item()

    def mean_stats(self, stats: dict[str, float]) -> dict[str, float]:
        """Diagnostics averaged over the processes (each computed on its own rows)."""
        if not self.distributed:
            return stats
        values = _all_reduce(torch.tensor([float(v) for v in stats.values()], dtype=torch.float64))
        return {k: v / self.world for k, v in zip(stats, values.tolist())}

    def broadcast(self, obj):
        """The main process's ``obj`` on every process."""
        if not self.distributed:
            return obj
        box = [obj if self.is_main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def close(self) -> None:
        """End together: wait for every process, then each tears down its process group. A group left to the
        interpreter's exit, or torn down by one process while another still holds its connections, can abort
        the other (SIGABRT: "terminate called without an active exception") after a run that succeeded."""
        if self.distributed and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()

    def main_first(self, fn):
        """``fn()`` on the main process first, then on the others (e.g. a base that is not cached yet is
        pretrained once, and the others then find it cached)."""
        if not self.is_main:
            self.barrier()
        out = fn()
        if self.is_main:
            self.barrier()
        return out

    def voice(self, log):
        """``log`` on the main process, silence elsewhere: one voice per run."""
        return log if self.is_main else (lambda *a, **k: None)


#: one process: what code that was not launched distributed uses
SINGLE = Processes()
