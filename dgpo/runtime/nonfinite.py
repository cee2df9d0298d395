"""Non-finite values in training: an update that meets a NaN or inf loss, gradient or reward is skipped (no
optimiser steps on it, so weights, optimiser states and every checkpoint stay finite) with a warning; after
``limit`` skips in a row the run stops with one clear message, its last checkpoint intact. Shared by every
trainer (DGPO's and the few-step package's)."""

from __future__ import annotations

from typing import Callable

from dgpo.errors import UserError


class NonFiniteStep(Exception):
    """An update met a NaN or inf; raised before any optimiser stepped on it (its gradients are cleared)."""


class NonFiniteValues(NonFiniteStep, ValueError):
    """A loss function met a NaN or inf among its per-sample inputs (e.g. a diverged policy's errors): a ValueError
    to a caller of the loss alone, a skipped step to a trainer (raised before any backward). Weights are the same
    on every process, so a diverged forward is seen by all of them alike."""


class NonFiniteRewards(NonFiniteStep):
    """A reward answered NaN or inf for some images. Raised on every process alike: the check runs on the
    gathered, global rewards."""


class SkipGuard:
    """Counts consecutive skipped updates; :meth:`skip` warns, or raises a UserError past ``limit``."""

    def __init__(self, limit: int, log: Callable[[str], None], hint: str):
        self.limit, self.log, self.hint = limit, log, hint
        self.in_row = 0

    def passed(self) -> None:
        """A finite update: the count starts again."""
        self.in_row = 0

    def skip(self, where: str, fault: str) -> None:
        """Skip the update at ``where`` (e.g. "epoch 3") because of ``fault`` (what was not finite)."""
        self.in_row += 1
        if self.in_row > self.limit:
            raise UserError(f"{self.in_row} steps in a row had a non-finite loss, gradient or reward, the last at "
                            f"{where} ({fault}): {self.hint}; the last checkpoint is intact and finite")
        self.log(f"warning: skipped the update of {where} ({fault}): not finite ({self.in_row} in a row; the run "
                 f"stops after {self.limit})")
