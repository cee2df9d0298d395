"""Reading a published torch weights file safely: ``torch.load(weights_only=True)`` takes tensors, containers and
numbers only, so no code pickled into the file ever runs."""

from __future__ import annotations

from pathlib import Path

import torch

from dgpo.errors import UserError


def load_weights_only(path: str | Path, what: str, expected: str):
    """The contents of the torch file at ``path`` (on the CPU). A missing file is one ``UserError`` saying
    ``"{what}: no {expected} at PATH"``; one that is not a plain weights file (not torch's format, or holding
    objects that ``weights_only`` refuses) says so and that nothing in it was unpickled."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"{what}: no {expected} at {str(path)!r}")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 — not a torch file, or one holding objects that weights_only refuses
        raise UserError(f"{what}: {str(path)!r} is not a plain state dict ({type(e).__name__}); nothing in it was "
                        f"unpickled") from None
