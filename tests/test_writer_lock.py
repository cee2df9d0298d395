"""One writer per run folder (dgpo.runtime.writer_lock): while one process writes a run, a second writer — a
resume, an overwrite — is refused with one line naming the holder, and the folder is left exactly as it was; a
holder that was killed blocks nothing."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dgpo.errors import UserError
from dgpo.runtime import writer_lock
from dgpo.runtime.run_folder import reopen_run, start_run
from dgpo.trainer import load_train_config, train_config_class

HOLD = """
import sys, time
from dgpo.runtime import writer_lock
writer_lock.hold(sys.argv[1])
print("held", flush=True)
time.sleep(600)
"""


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def run_dir(tmp_path):
    """A run folder as `dgpo train --out RUN` claims it (config saved), its lock then let go by this process."""
    cfg = load_train_config(None, [f"run.out_dir={tmp_path / 'run'}"])
    start_run(cfg, "dgpo train")
    writer_lock.release(tmp_path / "run")
    return tmp_path / "run"


@pytest.fixture
def holder(run_dir):
    """Another process that holds ``run_dir``'s writer lock (as a running `dgpo train` does)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield proc
    proc.kill()
    proc.wait()


def test_a_second_writer_is_refused_naming_the_holder_and_nothing_changes(run_dir, holder):
    before = _snapshot(run_dir)
    with pytest.raises(UserError) as resumed:
        reopen_run(train_config_class(), run_dir)
    message = str(resumed.value)
    assert f"process {holder.pid} on {socket.gethostname()}" in message and "one writer" in message
    assert "\n" not in message
    cfg = load_train_config(None, [f"run.out_dir={run_dir}"])
    with pytest.raises(UserError, match=f"process {holder.pid}"):
        start_run(cfg, "dgpo train", overwrite=True)  # --overwrite would clear a live run's files
    assert _snapshot(run_dir) == before


def test_a_run_that_another_process_writes_can_be_read(run_dir, holder):
    """Reading a run's config is not writing it: a benchmark reads its student's config while another benchmark
    (or the student's own resume) holds the student's folder."""
    from dgpo.runtime.run_folder import read_run_config
    cfg = read_run_config(train_config_class(), run_dir)
    assert Path(cfg.run.out_dir) == run_dir.resolve() and str(run_dir.resolve()) not in writer_lock._HELD


def test_a_killed_holder_blocks_nothing(run_dir, holder):
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    cfg = reopen_run(train_config_class(), run_dir)  # the kernel dropped the lock with the process
    assert Path(cfg.run.out_dir) == run_dir.resolve()
    writer_lock.release(run_dir)


def test_the_holder_is_recorded_and_the_same_process_may_reopen(run_dir):
    reopen_run(train_config_class(), run_dir)
    reopen_run(train_config_class(), run_dir)  # idempotent within one process (a benchmark resumes its own runs)
    record = (run_dir / writer_lock.LOCK_NAME).read_text()
    assert f'"pid": {os.getpid()}' in record and socket.gethostname() in record
    writer_lock.release(run_dir)


def test_an_undone_run_leaves_no_lock_file(tmp_path):
    """A run that stops before its first checkpoint is undone (release_run_dir): the folder it created goes, and
    in a folder that was there before, nothing of the run stays — the lock file included."""
    from dgpo.runtime.output_dir import release_run_dir
    given = tmp_path / "given"
    given.mkdir()
    for folder in (tmp_path / "new", given):
        start_run(load_train_config(None, [f"run.out_dir={folder}"]), "dgpo train")
        assert (folder / writer_lock.LOCK_NAME).is_file()
        assert release_run_dir(folder)
    assert not (tmp_path / "new").exists() and list(given.iterdir()) == []


def test_the_holder_message_survives_an_unreadable_record(run_dir, holder):
    (run_dir / writer_lock.LOCK_NAME).write_text("garbage")
    with pytest.raises(UserError, match="being written by another process"):
        reopen_run(train_config_class(), run_dir)


def test_a_finished_run_lets_go_of_its_folder(tiny_base, tmp_path):
    """The lock lives as long as the run, not the process: after `Trainer.run`, another process may resume."""
    from dgpo.trainer import Trainer, prepare_run_dir
    cfg = load_train_config(None, [f"model.base={tiny_base}", f"run.out_dir={tmp_path / 'run'}", "run.epochs=1",
                                   "run.time_budget_min=0", "rollout.prompts_per_epoch=2", "rollout.group_size=2",
                                   "rollout.steps=2", "eval.per_prompt=1", "eval.sampler.steps=2", "eval.fd=false",
                                   "model.lora_rank=2", "model.lora_alpha=2", "objective.timesteps_per_sample=1"])
    trainer = Trainer(prepare_run_dir(cfg, False), log=lambda *a: None)
    assert str((tmp_path / "run").resolve()) in writer_lock._HELD
    trainer.run()
    assert str((tmp_path / "run").resolve()) not in writer_lock._HELD
    proc = subprocess.run([sys.executable, "-c", HOLD.replace("time.sleep(600)", ""), str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "held", proc.stderr
