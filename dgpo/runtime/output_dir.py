"""Output folders and files that commands write, without ever losing what a user put there.

The rules, the same for every command that takes ``--out``:

- a path that does not exist, or an empty folder, is used;
- a path that exists and is not empty is refused with one line, and nothing is touched;
- with ``--overwrite``, a folder is reused only if the tool that writes it wrote it before: it holds the
  manifest (:data:`MANIFEST`) that every tool leaves in its folders, naming the tool and the files it owns
  (exact names, or for a run folder the patterns of its layout). Those files are removed and the folder is
  written again; a folder that holds anything the manifest does not name is still refused, naming what.
  A single output file (``dgpo eval --out FILE``) is replaced only if it carries the writing tool's mark.

Paths are resolved first (``sub/..`` is the working directory, and is refused if it holds anything), and
temporary files and folders get fresh, unique names next to their target, so no command ever removes a
path it did not create. Sample folders and exported LoRAs appear all at once (written into a temporary
sibling, then renamed into place).
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from dgpo.errors import UserError
from dgpo.runtime import writer_lock
from dgpo.runtime.writer_lock import LOCK_NAME

MANIFEST = ".dgpo-manifest.json"  # {"tool": "dgpo sample", "owns": ["00000.png", ..., "checkpoints/step-*/*"]}
_SHOWN = 3  # foreign files named in a refusal


def process_umask() -> int:
    """This process's umask (Linux reads it without changing it; elsewhere it is set and put back)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def with_umask(path: str | Path) -> Path:
    """Give ``path`` — a file, or a folder and everything in it — the modes a plain ``open``/``mkdir`` gives under
    the user's umask (0666/0777 less it): temporary files (``mkstemp``: 0600, ``mkdtemp``: 0700) and safetensors'
    files (0600) that are renamed into place would otherwise stay private, so a group could not read a shared
    run."""
    path, mask = Path(path), process_umask()
    for item in [path, *(path.rglob("*") if path.is_dir() else [])]:
        if not item.is_symlink():
            item.chmod((0o777 if item.is_dir() else 0o666) & ~mask)
    return path


def _files(folder: Path) -> list[str]:
    """Every file under ``folder`` (links and special files included), as sorted POSIX relative paths."""
    out = []
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        out += [(rel / f).as_posix() for f in files]
        out += [(rel / d).as_posix() for d in dirs if (Path(root) / d).is_symlink()]
    return sorted(out)


def read_manifest(folder: Path) -> dict | None:
    """The folder's manifest, or None when it has none (or an unreadable one)."""
    try:
        data = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(data, dict) and isinstance(data.get("tool"), str) and isinstance(data.get("owns"), list)
    return data if ok else None


def write_manifest(folder: Path, tool: str, owns: list[str], created: bool = False, created_parents: int = 0) -> None:
    """Record (atomically) that ``tool`` owns the files matching ``owns`` in ``folder`` (and, ``created``, the
    folder itself: it did not exist before; ``created_parents``: that many folders above it neither)."""
    fd, tmp = tempfile.mkstemp(prefix=f"{MANIFEST}.", suffix=".tmp", dir=folder)
    with os.fdopen(fd, "w") as f:
        json.dump({"tool": tool, "owns": sorted(owns), "created": created,
                   **({"created_parents": created_parents} if created_parents else {})}, f, indent=1)
    os.replace(with_umask(tmp), folder / MANIFEST)


def _owned(rel: str, patterns: list[str]) -> bool:
    return rel in (MANIFEST, LOCK_NAME) or any(fnmatch.fnmatchcase(rel, p) for p in patterns)


def nearest_existing(path: str | Path) -> Path:
    """``path`` if it exists, else its nearest existing parent: where a path that is yet to be made will live."""
    path = Path(path).resolve()
    return next(p for p in [path, *path.parents] if p.exists())


def _check_writable(out: Path, given, flag: str) -> None:
    """The folder that will receive ``out`` (``out`` itself if it is a folder, else its nearest existing parent)
    can be written, so that a command fails before its work, not after it; else a UserError."""
    place = out if out.is_dir() else nearest_existing(out.parent)
    if not os.access(place, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {str(given)!r}: {str(place)!r} cannot be written (no permission, or a read-only "
                        f"filesystem); choose a folder you can write")


def check_output(path: str | Path, tool: str, overwrite: bool, flag: str = "--out") -> Path:
    """The resolved output path if ``tool`` may write there (see the module's rules); else a UserError.
    Nothing is changed on disk."""
    out = Path(path).expanduser().resolve()
    _check_writable(out, path, flag)
    if not out.exists():
        return out
    if out.is_file():
        if not overwrite:
            raise UserError(f"{flag} {str(path)!r} already exists; pass a new path, or --overwrite to replace a "
                            f"file {tool} wrote")
        if _file_mark(out) != tool:
            raise UserError(f"{flag} {str(path)!r} exists and was not written by {tool} (it has no mark of "
                            f"{tool}'s): it is left as it is; move it aside, or pass a new path")
        return out
    if not out.is_dir():
        raise UserError(f"{flag} {str(path)!r} exists and is not a folder")
    present = _files(out)
    if not present and not any(out.iterdir()):
        return out
    if not overwrite:
        raise UserError(f"{flag} {str(path)!r} already exists and is not empty; pass a new folder, or --overwrite "
                        f"to replace what {tool} wrote there (nothing else is touched)")
    manifest = read_manifest(out)
    if manifest is None or manifest["tool"] != tool:
        who = "no manifest" if manifest is None else f"it was written by {manifest['tool']}"
        raise UserError(f"--overwrite: {str(path)!r} is not a folder {tool} wrote ({who}); nothing was touched: "
                        f"pass a new folder")
    foreign = [f for f in present if not _owned(f, manifest["owns"])]
    if foreign:
        more = f" and {len(foreign) - _SHOWN} more" if len(foreign) > _SHOWN else ""
        raise UserError(f"--overwrite: {str(path)!r} also holds files {tool} did not write "
                        f"({', '.join(foreign[:_SHOWN])}{more}); nothing was touched: move them, or pass a new folder")
    return out


def clear_owned(folder: Path) -> None:
    """Remove the files the folder's manifest owns (the manifest last) and the folders left empty.
    Call only after :func:`check_output` accepted the folder with ``overwrite``."""
    manifest = read_manifest(folder)
    if manifest is None:
        return
    for rel in _files(folder):
        if rel not in (MANIFEST, LOCK_NAME) and _owned(rel, manifest["owns"]):  # the lock stays with the folder
            (folder / rel).unlink()
    for root, dirs, _ in sorted(os.walk(folder), key=lambda t: -len(t[0])):
        for d in dirs:
            p = Path(root) / d
            if p.is_dir() and not p.is_symlink() and not any(p.iterdir()):
                p.rmdir()
    (folder / MANIFEST).unlink(missing_ok=True)


def claim_run_dir(path: str | Path, tool: str, layout: list[str], overwrite: bool = False,
                  flag: str = "--out") -> Path:
    """Make ``path`` this run's folder: new or empty, or (``overwrite``) a folder of an earlier run of
    ``tool``, whose files are removed first. ``layout`` are the patterns of the files a run writes."""
    out = check_output(path, tool, overwrite, flag)
    created = not out.exists() or (read_manifest(out) or {}).get("created", False)
    parents = 0
    while not out.parents[parents].exists():  # e.g. runs/ for runs/dgpo-shapes: released with the run
        parents += 1
    existed = out.exists()
    out.mkdir(parents=True, exist_ok=True)
    writer_lock.hold(out)  # before anything is cleared: a folder another process writes is refused
    if existed:
        clear_owned(out)
    write_manifest(out, tool, layout, created=created, created_parents=parents)
    return out


def release_run_dir(path: str | Path) -> bool:
    """Undo :func:`claim_run_dir` for a run that failed before it saved anything worth resuming: remove the
    files its manifest owns, and the folder itself if the claim created it. Returns whether it did."""
    out = Path(path)
    manifest = read_manifest(out)
    if manifest is None:
        return False
    created = manifest.get("created", False)
    clear_owned(out)
    writer_lock.release(out, remove=True)
    if created and out.is_dir() and not any(out.iterdir()):
        out.rmdir()
        for parent in list(out.parents)[:manifest.get("created_parents", 0)]:  # the folders the claim made
            if parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
    return True


@contextmanager
def atomic_output_dir(path: str | Path, tool: str, overwrite: bool = False, flag: str = "--out"):
    """Yield an empty temporary folder beside ``path``; when the block succeeds, its files become
    ``path`` (renamed into place, with a manifest naming them as ``tool``'s). On failure nothing changes."""
    out = check_output(path, tool, overwrite, flag)  # fail before the work, not after it
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        write_manifest(tmp, tool, _files(tmp))
        with_umask(tmp)
        out = check_output(path, tool, overwrite, flag)  # the folder may have changed meanwhile
        if not out.exists():
            os.replace(tmp, out)
        else:  # an empty folder, or an earlier output of this tool (may be the working directory): fill it
            clear_owned(out)
            for name in [MANIFEST] + sorted(set(os.listdir(tmp)) - {MANIFEST}):  # manifest first: a partial
                os.replace(tmp / name, out / name)                           # folder stays overwritable
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def report_files(out_dir: str | Path, name: str, ends: tuple[str, ...] = (".json", ".md", ".png")) -> list[Path]:
    """A report's files in ``out_dir``: ``NAME.json`` (the one with the ``written_by`` mark) first, then its
    companions, e.g. ``NAME.md`` and ``NAME.png``."""
    return [Path(out_dir) / f"{name}{end}" for end in ends]


def check_json_output(path: str | Path, tool: str, overwrite: bool, flag: str = "--out") -> Path:
    """:func:`check_output` for a single JSON file: a folder at ``path`` is refused too (even an empty one)."""
    if Path(path).is_dir():
        raise UserError(f"{flag} {str(path)!r} is a folder: pass the path of a JSON file")
    return check_output(path, tool, overwrite, flag)


def check_report_outputs(json_path: Path, companions: list[Path], tool: str, overwrite: bool,
                         flag: str = "--out-dir/--name") -> None:
    """A report's files may be written: its JSON under :func:`check_output`'s rules (only a JSON ``tool`` wrote
    is replaced, and only with ``overwrite``); its companions (markdown, plots) that exist only beside that JSON
    and only with ``overwrite``, so a file of the same name that some other hand put there is never replaced.
    Nothing is changed on disk. A resumable benchmark, whose rerun rewrites its own report, passes
    ``overwrite=True``."""
    check_json_output(json_path, tool, overwrite, flag)
    pick = f"pick another {flag.replace('/', ' or ')}"
    taken = [path for path in companions if path.exists()]
    if taken and _file_mark(Path(json_path)) != tool:  # (beside the tool's own JSON, check_output needed --overwrite)
        raise UserError(f"{taken[0]} exists and is not part of a report {tool} wrote (no {Path(json_path).name} "
                        f"of {tool}'s beside it): it is left as it is; {pick}")


def write_report_json(files: list[Path], data: dict, tool: str, overwrite: bool = False,
                      flag: str = "--out-dir/--name", default=None) -> Path:
    """Write a report's JSON (``files[0]``, as :func:`write_json_output`) once :func:`check_report_outputs`
    has accepted all its ``files`` again (the folder may have changed during the work); write the companions
    after it."""
    check_report_outputs(files[0], files[1:], tool, overwrite, flag)
    return write_json_output(files[0], data, tool, overwrite, flag, default)


def write_json_output(path: str | Path, data: dict, tool: str, overwrite: bool = False, flag: str = "--out",
                      default=None) -> Path:
    """Write ``data`` (with a ``"written_by": tool`` mark) to a JSON file atomically, under the rules above
    (``default``: :func:`json.dump`'s, for values JSON has no type for)."""
    out = check_json_output(path, tool, overwrite, flag)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({**data, "written_by": tool}, f, indent=2, default=default)
        os.replace(with_umask(tmp), out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _file_mark(path: Path) -> str | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data.get("written_by") if isinstance(data, dict) else None
