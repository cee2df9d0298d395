"""Full-state checkpoints with atomic saves and exact resume.

A checkpoint folder ``checkpoints/step-N/`` holds

- ``tensors.safetensors``: trainable weights, optimiser moments, EMA copies, torch RNG states;
- ``state.json``: the step, scalar optimiser state, numpy/python RNG states, trainer counters.

It is written into a hidden temporary folder and renamed into place, so a killed run never leaves a
half-written checkpoint under a ``step-N`` name. Nothing is unpickled on load: tensors come from
safetensors and everything else from JSON.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from dgpo.errors import UserError
from dgpo.runtime.output_dir import with_umask
from dgpo.runtime.ema import EMA

STEP_DIR = re.compile(r"^step-(\d+)$")


# ------------------------------------------------------------------------------------------- optimiser

def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimiser state dict into tensors (for safetensors) and JSON-able scalars."""
    state = opt.state_dict()
    tensors, scalars = {}, {"param_groups": state["param_groups"], "state": {}}
    for pid, slots in state["state"].items():
        scalars["state"][str(pid)] = {}
        for name, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"opt.{pid}.{name}"] = value.detach().clone().contiguous()
            else:
                scalars["state"][str(pid)][name] = value
    return tensors, scalars


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], scalars: dict) -> None:
    state: dict = {}
    for pid, slots in scalars["state"].items():
        state[int(pid)] = dict(slots)
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": scalars["param_groups"]})


def flatten_state(optimizers: dict[str, torch.optim.Optimizer], emas: dict[str, EMA]) -> tuple[dict, dict]:
    """A recipe's optimisers and EMAs as checkpoint tensors and JSON scalars: optimiser ``P`` as ``P.opt.*``
    (``opt.*`` for the prefix ""), its scalars under ``P`` in the returned dict; an EMA under the key prefix
    it is given (``"policy."`` → ``policy.ema.0``). :func:`load_flat_state` reverses it."""
    tensors, scalars = {}, {}
    for prefix, opt in optimizers.items():
        t, scalars[prefix] = optimizer_to_flat(opt)
        tensors.update({f"{prefix}.{k}" if prefix else k: v for k, v in t.items()})
    for prefix, ema in emas.items():
        tensors.update({f"{prefix}{k}": v for k, v in ema.state_dict().items()})
    return tensors, scalars


def load_flat_state(tensors: dict, scalars: dict, optimizers: dict[str, torch.optim.Optimizer],
                    emas: dict[str, EMA]) -> None:
    """Load what :func:`flatten_state` wrote into the same optimisers and EMAs."""
    for prefix, opt in optimizers.items():
        mine = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".opt.")} if prefix \
            else tensors
        optimizer_from_flat(opt, mine, scalars[prefix])
    for prefix, ema in emas.items():
        ema.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix + "ema.")})


# ------------------------------------------------------------------------------------------- RNG

def capture_rng(generators: dict[str, torch.Generator]) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"rng.torch": torch.get_rng_state()}
    tensors.update({f"rng.gen.{k}": g.get_state() for k, g in generators.items()})
    np_state = np.random.get_state()
    scalars = {"numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]], "python": _jsonable(random.getstate())}
    return tensors, scalars


def restore_rng(generators: dict[str, torch.Generator], tensors: dict[str, torch.Tensor], scalars: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    for k, g in generators.items():
        g.set_state(tensors[f"rng.gen.{k}"])
    name, keys, *rest = scalars["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    random.setstate(_tupled(scalars["python"]))


def _jsonable(obj):
    return [_jsonable(o) for o in obj] if isinstance(obj, (tuple, list)) else obj


def _tupled(obj):
    return tuple(_tupled(o) for o in obj) if isinstance(obj, list) else obj


# ------------------------------------------------------------------------------------------- folders

def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    """safetensors' ``save_file``, its I/O failures (a full disk, a quota, a read-only folder) raised as the
    OSError they are, with their errno and the path, rather than as a SafetensorError of the serialiser."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except Exception as e:
        code = re.search(r"code: (\d+)", str(e))
        if isinstance(e, OSError) or code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None


def save_checkpoint(run_dir: str | Path, step: int, tensors: dict[str, torch.Tensor], state: dict,
                    keep_last: int = 2) -> Path:
    """Atomically write ``run_dir/checkpoints/step-{step}`` and prune all but the newest ``keep_last``."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_tensors({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp / "tensors.safetensors")
        digest = _sha256(tmp / "tensors.safetensors")  # checked on load: a damaged file is found, not trusted
        (tmp / "state.json").write_text(json.dumps({"step": step, **state, "tensors_sha256": digest}))
        with_umask(tmp)  # safetensors writes 0600: a group reads a shared run as its umask says
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name))
             and (p / "state.json").is_file() and (p / "tensors.safetensors").is_file()]
    return [p for _, p in sorted(found)]


def _sha256(path: Path) -> str:
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and state of a checkpoint, its tensors checked against the checksum saved beside them;
    a damaged checkpoint is a UserError naming it."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
        saved = state.get("tensors_sha256")  # checkpoints of older versions carry none
        if saved is not None and _sha256(path / "tensors.safetensors") != saved:
            raise ValueError("tensors.safetensors does not match the checksum saved with it (truncated or altered)")
        return load_file(str(path / "tensors.safetensors")), state
    except (OSError, json.JSONDecodeError, Exception) as e:  # a damaged file must not crash with a bare trace
        raise UserError(f"checkpoint {str(path)!r} cannot be read ({type(e).__name__}: {e}); "
                        f"delete it to resume from the one before") from None


def load_latest_good(run_dir: str | Path, log=print) -> tuple[Path, dict[str, torch.Tensor], dict] | None:
    """The newest checkpoint that reads back intact (checksum included), with its tensors and state; each
    damaged one on the way is reported in one line and skipped (left where it is). None when there is none."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return (path, *load_checkpoint(path))
        except UserError as e:
            log(f"warning: {e}; trying the checkpoint before it")
    return None


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None
