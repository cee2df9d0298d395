"""Plug-ins: your own rewards and methods, loaded by the commands without touching the library.

A plug-in is a Python file (or an importable module) that registers what it adds when it is imported —
``dgpo.rewards.register_reward(name, factory)`` for a reward, ``@dgpo.methods.register_objective`` for a
method (with its own config section). ``dgpo train --plugin FILE`` imports it before the config is read,
so ``--set reward.name=…`` / ``--set objective.name=…`` and the method's section see it; the run folder
records the plug-ins (``plugins.json``), and ``--resume`` loads them again. Worked examples, each tested:
``examples/object_count_reward.py``, ``examples/reward_weighted_regression.py``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from pathlib import Path

from dgpo.errors import UserError

PLUGINS_FILE = "plugins.json"


def load_plugin(spec: str) -> str:
    """Import one plug-in: a ``.py`` file (resolved to an absolute path, returned) or a module name."""
    if spec.endswith(".py"):
        path = Path(spec).expanduser().resolve()
        if not path.is_file():
            raise UserError(f"--plugin {spec!r}: no such file")
        name = f"dgpo_plugin_{path.stem}"
        if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path):
            return str(path)  # loaded already (a resumed run in the same process)
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[name]
            raise UserError(f"--plugin {spec!r} failed to load: {type(e).__name__}: {e}") from None
        return str(path)
    try:
        importlib.import_module(spec)
    except ImportError as e:
        raise UserError(f"--plugin {spec!r}: cannot import it ({e}); pass a .py file or an importable module") from None
    return spec


def load_plugins(specs) -> list[str]:
    """Import every plug-in; returns how each is recorded (absolute file paths, module names)."""
    return [load_plugin(s) for s in specs]


def record_plugins(run_dir: Path, loaded: list[str]) -> None:
    if loaded:
        (Path(run_dir) / PLUGINS_FILE).write_text(json.dumps(loaded, indent=1))


def recorded_plugins(run_dir: Path) -> list[str]:
    path = Path(run_dir) / PLUGINS_FILE
    return json.loads(path.read_text()) if path.is_file() else []
