"""The recipes (YAML configs) shipped inside the package, and how a config path given by a user is found.

The repository's ``configs/`` folder is where users read and copy recipes; the package reaches the same files
as ``dgpo/configs`` (a link to ``configs/`` in the source tree, real files in a built wheel), found with
:mod:`importlib.resources`, so an installed package runs its default recipes from any directory, and there is
one copy of every recipe.

A relative config path is looked for first where the user is (the current directory), then, when it names a
recipe as the README writes it (``configs/dgpo/shapes.yaml``), among the shipped recipes: the README's commands
work from a clone and from an empty directory alike, and a user's own ``configs/`` folder takes precedence.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

RECIPES_PREFIX = "configs"


def recipes_dir() -> Path:
    """The folder of the shipped recipes (``dgpo/configs`` inside the installed package)."""
    return Path(str(files("dgpo") / RECIPES_PREFIX))


def recipe(name: str) -> Path:
    """A shipped recipe by its name under ``configs/``, e.g. ``recipe("dgpo/shapes.yaml")``."""
    return recipes_dir() / name


def recipe_name(path: Path) -> str:
    """How the README names a shipped recipe: ``configs/dgpo/shapes.yaml``."""
    return f"{RECIPES_PREFIX}/{Path(path).relative_to(recipes_dir()).as_posix()}"


def resolve_config_path(path: str | Path) -> Path:
    """``path`` as given when it is absolute or exists from the current directory; else a shipped recipe when
    it is written as one (``configs/…``); else ``path`` unchanged (the caller names it as missing)."""
    path = Path(path).expanduser()
    if path.is_absolute() or path.exists():
        return path
    parts = path.parts
    if len(parts) > 1 and parts[0] == RECIPES_PREFIX:
        shipped = recipes_dir().joinpath(*parts[1:])
        if shipped.exists():
            return shipped
    return path
