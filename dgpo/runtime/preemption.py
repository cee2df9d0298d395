"""Preemption: a run told to stop by its scheduler checkpoints and ends, so that a requeue continues it.

SLURM and Kubernetes send SIGTERM first and SIGKILL after a grace period (30 s by default on both); SLURM's
``--signal=USR1@SECONDS`` sends SIGUSR1 that long before the end of a job's time. Each training command is
wrapped in :func:`preemptible`, which installs :data:`PREEMPTION` for those signals (``DGPO_PREEMPT_SIGNALS``: a
comma-separated list of signal names, default ``SIGTERM,SIGUSR1``):

* inside the run loop (:meth:`dgpo.runtime.loop.Run.loop`) a signal is noted, and at the next safe point — after
  the step in progress, its evaluation and checkpoint, if due — every process agrees on it, a checkpoint is
  written and the command exits with status :data:`PREEMPTED_STATUS` (75, ``EX_TEMPFAIL``: try again), naming
  the checkpoint and how to continue;
* before the loop (loading the model, claiming the folder) it stops the command at once, as Ctrl-C does: a new run
  with no checkpoint yet leaves no folder behind, so the same command starts it again;
* after the loop (the last evaluation, ``final/``) it is ignored: the run finishes.

``--resume-or-start RUN`` (the training commands) starts the run in RUN, or continues it from its newest
checkpoint when there is one: one job script serves the first submission and every requeue.
"""

from __future__ import annotations

import functools
import os
import signal
from contextlib import contextmanager

PREEMPTED_STATUS = 75  # sysexits.h EX_TEMPFAIL: a temporary failure, to be tried again (a requeue resumes)
DEFAULT_SIGNALS = "SIGTERM,SIGUSR1"


class Preempted(BaseException):
    """The command was told to stop (a BaseException, like KeyboardInterrupt: no ``except Exception`` swallows
    it). ``checkpoint``: the step it checkpointed at, when it stopped at a safe point of the loop."""

    def __init__(self, signal_name: str, checkpoint: str = "", folder=None):
        super().__init__(signal_name, checkpoint)
        self.signal_name, self.checkpoint, self.folder = signal_name, checkpoint, folder

    def message(self) -> str:
        """One line for the user: what stopped the command, what was kept, how to go on."""
        if self.checkpoint:
            return (f"preempted ({self.signal_name}): checkpointed at {self.checkpoint} in {self.folder}; the same "
                    f"command with --resume-or-start {self.folder} (or --resume {self.folder}) continues it")
        return (f"preempted ({self.signal_name}) before the run's first safe point: a resumed run is as its last "
                f"checkpoint left it, a new one without a checkpoint is not kept")


def signals_from_env() -> list[signal.Signals]:
    """The signals named by ``DGPO_PREEMPT_SIGNALS`` (default SIGTERM, SIGUSR1); an unknown name is a UserError."""
    from dgpo.errors import UserError
    names = [n.strip().upper() for n in os.environ.get("DGPO_PREEMPT_SIGNALS", DEFAULT_SIGNALS).split(",") if n.strip()]
    chosen = []
    for name in names:
        name = name if name.startswith("SIG") else f"SIG{name}"
        if name in ("SIGKILL", "SIGSTOP") or not hasattr(signal.Signals, name):
            raise UserError(f"DGPO_PREEMPT_SIGNALS: {name} cannot be caught or is not a signal here; "
                            f"e.g. {DEFAULT_SIGNALS}")
        chosen.append(signal.Signals[name])
    return chosen


class Preemption:
    """The preemption signals' handler and the flag the run loop reads (one per process: :data:`PREEMPTION`)."""

    def __init__(self):
        self.signal_name: str | None = None
        self._deferred = False
        self._installed: dict[signal.Signals, object] = {}

    def install(self) -> None:
        """Handle the preemption signals from now on (main thread only; a no-op elsewhere)."""
        import threading
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in signals_from_env():
            if sig not in self._installed:
                self._installed[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        """Give the signals their earlier handlers back, and forget a noted signal."""
        for sig, previous in self._installed.items():
            signal.signal(sig, previous)
        self._installed.clear()
        self.signal_name, self._deferred = None, False

    def ignore(self) -> None:
        """From now on a signal is only noted (the run is done: nothing is left to stop); :meth:`uninstall` ends it."""
        self._deferred = True

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if not self._deferred:
            raise Preempted(name)
        self.signal_name = name

    @contextmanager
    def deferred(self):
        """Within the block a signal is only noted (outside it, it raises :class:`Preempted` at once); :meth:`take`
        reads the note at the loop's safe points."""
        was, self._deferred = self._deferred, True
        try:
            yield
        finally:
            self._deferred = was

    def take(self, processes) -> str | None:
        """The noted signal's name if any process was told to stop (every process then stops at the same step),
        else None; the note is cleared (it is being acted on). One small all-reduce with several processes."""
        if processes.max(1.0 if self.signal_name else 0.0) == 0.0:
            return None
        name, self.signal_name = self.signal_name, None
        return name or "a signal (to another process)"


PREEMPTION = Preemption()


def preemptible(command):
    """A training command's function, with the preemption signals handled from its first line (before torch is
    imported) to its end."""
    @functools.wraps(command)
    def run(args):
        PREEMPTION.install()
        try:
            return command(args)
        finally:
            PREEMPTION.uninstall()
    return run
