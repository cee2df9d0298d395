"""Run folders: a run folder is its run's identity.

A new run claims a folder that is new or empty (with ``--overwrite``: a folder of an earlier run of the
same command, whose files are removed first; anything else in it is refused, see
:mod:`dgpo.runtime.output_dir`), so two runs never mix their checkpoints. When the user did not name the folder
(the config's default ``run.out_dir``), a taken default is not an error: the run gets the next free
``NAME-2``, ``NAME-3`` … and says so. ``--resume RUN`` reads and writes RUN itself, wherever the folder was
moved and whatever the working directory: the ``run.out_dir`` saved in its config is not followed.
"""

from __future__ import annotations

import copy
import os
import tempfile
from dataclasses import replace
from pathlib import Path

import yaml

from dgpo.config import apply_overrides, flat_dict, from_dict, to_dict
from dgpo.errors import UserError
from dgpo.runtime import writer_lock
from dgpo.runtime.output_dir import check_output, claim_run_dir, with_umask

#: What the training commands write into a run folder (``dgpo train``, ``tdm-r1 distill``); tracker logs
#: go to wandb/ and (tensorboard) dgpo/.
RUN_LAYOUT = ["config.yaml", "plugins.json", "metrics.jsonl", "summary.md", "summary.json", "reward_curve.png", "curves.png",
              "samples/epoch-*.png", "samples/iter-*.png", "checkpoints/step-*/*", "checkpoints/.step-*/*",
              "final/*", ".final.tmp/*", "wandb/*", "dgpo/*"]


def next_free(path: str | Path, tool: str) -> Path:
    """``path`` if a new run may claim it, else the first free ``path-2``, ``path-3`` …"""
    path = Path(path)
    candidate, n = path, 1
    while True:
        try:
            check_output(candidate, tool, overwrite=False)
            return candidate
        except UserError:
            n += 1
            candidate = path.with_name(f"{path.name}-{n}")


def start_run(cfg, tool: str, overwrite: bool = False, named: bool = True, log=print):
    """Claim ``cfg.run.out_dir`` for a new run and save the resolved config in it; returns the config with
    ``run.out_dir`` set to the folder used. ``named``: the user chose the folder (``--out`` or
    ``--set run.out_dir=…``), so a taken one is refused rather than numbered."""
    wanted = Path(cfg.run.out_dir)
    folder = wanted if named or overwrite else next_free(wanted, tool)
    if folder != wanted:
        log(f"{wanted} holds an earlier run; this run goes to {folder} (--out names the folder, --resume continues a run)")
    claim_run_dir(folder, tool, RUN_LAYOUT, overwrite)
    cfg = replace(cfg, run=replace(cfg.run, out_dir=str(folder)))
    save_config(cfg, folder)
    return cfg


#: Keys a resumed run may change with ``--set``: how long it runs, how often it evaluates and checkpoints, where
#: it logs and on how many threads. Any other key (model, method, world, reward, seed, …) would make the
#: checkpoint another run's: refused.
SCHEDULE_KEYS = ("run.time_budget_min", "run.epochs", "run.iterations", "run.checkpoint_every", "run.keep_checkpoints",
                 "run.threads", "run.tracker", "run.stop_at_gain", "run.stop_after", "run.max_memory_gb", "eval.every",
                 "eval.every_minutes", "eval.early_every_minutes", "eval.early_minutes", "eval.interim_per_prompt",
                 "optim.max_skipped_steps")


def read_run_config(config_cls, run_dir: str | Path, overrides=()):
    """The config of the run in ``run_dir`` (with ``--set`` overrides of :data:`SCHEDULE_KEYS` only), pointed
    at ``run_dir`` itself; an override of any other key is refused, naming the keys and both values. Reads only:
    a run that another process writes may be read (a benchmark reads its student's config)."""
    folder = Path(run_dir)
    saved = folder / "config.yaml"
    if not saved.is_file():
        raise UserError(f"--resume: {str(run_dir)!r} is not a run folder (no config.yaml)")
    data = yaml.safe_load(saved.read_text())
    if hasattr(config_cls, "saved_data"):  # a config type that reads older run folders its own way
        data = config_cls.saved_data(data)
    old = flat_dict(to_dict(from_dict(config_cls, copy.deepcopy(data))), sep=".")
    apply_overrides(data, overrides)
    data.setdefault("run", {})["out_dir"] = str(folder.resolve())
    cfg = from_dict(config_cls, data)
    new = flat_dict(to_dict(cfg), sep=".")
    changed = [k for k in new if k != "run.out_dir" and old.get(k) != new[k] and k not in SCHEDULE_KEYS]
    if changed:
        diff = "; ".join(f"{k}: {old.get(k)!r} in the run, {new[k]!r} asked" for k in changed)
        raise UserError(f"--resume {str(run_dir)!r}: --set would make it another run ({diff}); a resumed run may "
                        f"change only its schedule ({', '.join(SCHEDULE_KEYS)}) — start a new run for the rest")
    return cfg


def reopen_run(config_cls, run_dir: str | Path, overrides=()):
    """:func:`read_run_config` of a run this process is going to write (``--resume``): its writer lock is taken
    first, so a run that still runs is refused, naming its process."""
    if (Path(run_dir) / "config.yaml").is_file():
        writer_lock.hold(run_dir)
    return read_run_config(config_cls, run_dir, overrides)


def resumable(folder: str | Path | None) -> Path | None:
    """``folder`` if it holds a checkpoint to continue from, else None."""
    from dgpo.runtime.checkpoint import list_checkpoints
    if folder is None or not Path(folder).is_dir() or not list_checkpoints(Path(folder)):
        return None
    return Path(folder)


def start_or_reopen(config_cls, wanted, tool: str):
    """``--resume-or-start RUN``, one command for a job's first submission and every requeue: the config ``wanted``
    (CONFIG and --set, ``run.out_dir`` = RUN) continues the run in RUN from its newest checkpoint if it has one —
    only if it is that run's config, schedule keys aside — and otherwise starts there: a new folder, or RUN's
    earlier start that died before its first checkpoint (its files are replaced, as by --overwrite)."""
    folder = Path(wanted.run.out_dir)
    if resumable(folder) is None:
        return start_run(wanted, tool, overwrite=folder.exists(), named=True)
    saved = flat_dict(to_dict(reopen_run(config_cls, folder)), sep=".")  # the lock too: this process writes it
    asked = flat_dict(to_dict(wanted), sep=".")
    differ = [k for k in asked if k != "run.out_dir" and k not in SCHEDULE_KEYS and saved.get(k) != asked[k]]
    if differ:
        diff = "; ".join(f"{k}: {saved.get(k)!r} in the run, {asked[k]!r} asked" for k in differ[:3])
        raise UserError(f"--resume-or-start {str(folder)!r} holds another run ({diff}); give the command that "
                        f"started it, or a new folder")
    return replace(wanted, run=replace(wanted.run, out_dir=str(folder.resolve())))


def finish_run(run_dir: Path, start, resume, log=print) -> None:
    """Bring the run in ``run_dir`` to its end, whatever stopped it: a finished run (``final/``) is left alone,
    an interrupted one continues from its newest checkpoint (``resume()``), a folder without one — or no
    folder — starts again (``start()``). What a benchmark does to run in pieces."""
    from dgpo.runtime.checkpoint import list_checkpoints
    if (run_dir / "final").is_dir():
        log(f"== {run_dir.name}: finished earlier")
    elif list_checkpoints(run_dir):
        log(f"== {run_dir.name}: continuing")
        resume()
    else:
        log(f"== {run_dir.name}: training")
        start()


def save_config(cfg, folder: Path) -> None:
    """The resolved config as ``config.yaml`` (atomically)."""
    fd, tmp = tempfile.mkstemp(prefix=".config.", suffix=".tmp", dir=folder)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    os.replace(with_umask(tmp), folder / "config.yaml")
