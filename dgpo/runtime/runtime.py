"""The runtime: what every recipe's training step runs on, the same for DGPO and its baselines, TDM, TDM-R1
and the surrogate alone.

- **set-up** — torch threads (``run.threads``), the seed (accelerate's ``set_seed``: Python, NumPy and torch),
  the launch's processes and this process's device (accelerate), the log voice (the main process speaks);
- **precision** — ``autocast()`` under the recipe's mixed precision (no | bf16 | fp16, accelerate's), the
  ``backward`` (fp16: through accelerate's loss scaler) and the optimisers ``prepare``\\ d for it;
- **the guarded optimiser step** — after the backward: gradients summed over the processes, clipped to a
  global norm, and no step at all on a non-finite loss or gradient (:meth:`Runtime.optimizer_step` raises
  :class:`~dgpo.runtime.nonfinite.NonFiniteStep`; the recipe skips the rest of its step);
- **NFE counting** — :class:`TransformerCalls`: the samples every transformer call of a training step is made
  on, counted at the transformer (rollouts and updates alike; evaluation is not counted);
- **trackers** — W&B or TensorBoard through accelerate (``run.tracker``); ``metrics.jsonl`` is always written
  by the loop (:mod:`dgpo.runtime.loop`).

Checkpoint state is flattened by :func:`dgpo.runtime.checkpoint.flatten_state`; the loop, the schedule and
the run folder are :class:`dgpo.runtime.loop.Run`'s.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from dgpo.runtime.nonfinite import NonFiniteStep
from dgpo.runtime.processes import Processes, check_launch


class Runtime:
    """One process's share of a training run: device, processes, precision, the guarded step, trackers."""

    def __init__(self, seed: int, mixed_precision: str = "no", threads: int = 0, tracker: str = "none",
                 out: str | Path | None = None, log=print):
        if threads:
            torch.set_num_threads(threads)
        check_launch(os.environ)
        self.accelerator = accelerator_at(mixed_precision, cpu=not torch.cuda.is_available(),
                                          log_with=None if tracker == "none" else tracker,
                                          project_dir=str(out) if out is not None else None)
        set_seed(seed)
        self.mixed_precision, self.tracker = mixed_precision, tracker
        self.processes = Processes.of(self.accelerator)
        self.device = self.accelerator.device
        self.log = self.processes.voice(log)

    # --------------------------------------------------------------------------------------- precision
    def autocast(self):
        """The step's autocast: a no-op at mixed precision "no"."""
        return self.accelerator.autocast()

    def prepare(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """The optimiser as the runtime steps it (fp16: with its loss scaler)."""
        return self.accelerator.prepare(optimizer)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    # --------------------------------------------------------------------------------------- the step
    def optimizer_step(self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], loss: float,
                       grad_clip: float, who: str) -> float:
        """After the backward of this process's share of a loss: gradients summed over the processes, clipped to
        ``grad_clip`` (0 = no clip; fp16 gradients unscaled first), then one step. A non-finite ``loss`` (the
        global one) or gradient norm steps nothing: the gradients are dropped and
        :class:`~dgpo.runtime.nonfinite.NonFiniteStep` names ``who``. Returns the gradient norm before clipping."""
        self.processes.sum_gradients(params)  # each process's gradient is its share of the global one
        grad_norm = self.accelerator.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
        if not math.isfinite(loss) or not torch.isfinite(grad_norm):
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteStep(f"{who} loss {loss}, gradient norm {grad_norm.item()}")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm.item()

    def count_calls(self, backbone: torch.nn.Module) -> "TransformerCalls":
        return TransformerCalls(backbone, self.processes)

    # --------------------------------------------------------------------------------------- trackers
    def start_tracking(self, project: str, config: dict, out: Path):
        """Start ``run.tracker`` (none: nothing) on the main process; returns the loop's ``tracker(row, step)``
        callback, or None."""
        if self.tracker == "none":
            return None
        if self.processes.is_main:
            os.environ.setdefault("WANDB_DIR", str(out))
            self.accelerator.init_trackers(project, config=config)
        return lambda row, step: self.accelerator.log(row, step=step)

    def finish_tracking(self) -> None:
        for tracker in self.accelerator.trackers:  # not end_training(): the command ends every process together
            tracker.finish()


class TransformerCalls:
    """The samples the transformer is called on while ``counting`` (a forward pre-hook): one NFE per sample
    per call, whatever calls it (CFG's doubled batch counts twice). A sharded run's stand-in calls, made only to
    keep the processes in step, are not counted."""

    def __init__(self, backbone: torch.nn.Module, processes: Processes):
        self.processes, self.counting, self.calls = processes, False, 0
        self._hook = backbone.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs) -> None:
        if self.counting and not self.processes.standing_in:
            x = kwargs.get("hidden_states", args[0] if args else None)
            self.calls += len(x) if isinstance(x, (list, tuple)) else int(x.shape[0])  # Z-Image: a list of frames

    def start(self) -> None:
        self.counting, self.calls = True, 0

    def stop(self) -> None:
        self.counting = False

    def total(self, calls: int | None = None) -> int:
        """``calls`` (default: all since ``start``) summed over the processes."""
        return int(self.processes.sum(self.calls if calls is None else calls))

    def close(self) -> None:
        self._hook.remove()


def accelerator_at(mixed_precision: str, **kwargs) -> Accelerator:
    """An ``Accelerator`` at this mixed precision. accelerate keeps one precision per process and refuses
    another; a process that trains again at a different one (a notebook, a script running several recipes)
    gets that process-wide precision reset first — the distributed set-up itself is kept."""
    from accelerate.state import AcceleratorState
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", mixed_precision) != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=mixed_precision, **kwargs)
