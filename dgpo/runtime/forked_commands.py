"""Run many short commands of the project, each in a process of its own, without paying the interpreter's start
for each: the diagnostics that try dozens of bad inputs (``scripts/diagnostics/bad_inputs.py``).

Importing torch, diffusers and transformers costs several seconds of CPU per process, far more than a command
that refuses its input. :func:`run_command` starts each command in a child forked from one server process
(:mod:`multiprocessing`'s ``forkserver``) that has imported the commands' modules once and computed nothing;
the child then does what the console script does — ``sys.exit(dgpo.cli.main(argv))``, or runs a script as
``__main__`` — in its own working directory and environment, its output in files. Exit status, output and
files written are the command's own, as when it is typed; only the interpreter's start is shared.
"""

from __future__ import annotations

import multiprocessing
import os
import runpy
import sys
import tempfile
import traceback
from pathlib import Path

_context = None


def console_scripts() -> dict:
    """The package's commands (pyproject.toml ``[project.scripts]``): name → entry point."""
    from importlib.metadata import distribution
    return {ep.name: ep for ep in distribution("dgpo").entry_points if ep.group == "console_scripts"}


def _server():
    """The forkserver context, its server importing once (no computation: forking after torch has run threads
    is unsafe) the commands' modules, the CLIs first (they set the libraries' logging environment, e.g.
    TRANSFORMERS_VERBOSITY, before importing them, as a typed command does), then the trainer."""
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload([ep.module for ep in console_scripts().values()] + ["dgpo.trainer"])
    return _context


def _child(argv: list[str], cwd: str, env: dict, out: str, err: str) -> None:
    """In the forked child: become the command (working directory, environment, output files) and exit with
    its status."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(handle, fd)
        os.close(handle)
    sys.argv = list(argv)
    try:
        if argv[0].endswith(".py"):
            runpy.run_path(argv[0], run_name="__main__")
            status = 0
        else:
            status = console_scripts()[argv[0]].load()(list(argv[1:]))
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            status = e.code or 0
        else:                                       # sys.exit("message"): printed, status 1, as Python does
            print(e.code, file=sys.stderr)
            status = 1
    except BaseException:  # noqa: BLE001 - an uncaught exception: the traceback and status 1, as Python does
        traceback.print_exc()
        status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def run_command(argv: list[str], cwd: str | Path, env: dict, timeout: float) -> tuple[int | None, str, str]:
    """Run ``argv`` — ``["dgpo", ...]``, ``["tdm-r1", ...]`` or ``["path/to/script.py", ...]`` — in ``cwd`` with
    exactly the environment ``env``; (exit status, stdout, stderr). Status None: still running after ``timeout``
    seconds (the child is killed)."""
    with tempfile.TemporaryDirectory() as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        child = _server().Process(target=_child, args=(list(argv), str(cwd), dict(env), out, err))
        child.start()
        child.join(timeout)
        if child.is_alive():
            child.kill()
            child.join()
            status = None
        else:
            status = child.exitcode
        read = lambda path: Path(path).read_text(errors="replace") if os.path.exists(path) else ""  # noqa: E731
        return status, read(out), read(err)
