"""Preemption (dgpo.runtime.preemption): SIGTERM or SIGUSR1 inside the run loop checkpoints at the next safe point
and ends the command with status 75 and one line; outside it, the command stops at once and a new run leaves
nothing; ``--resume-or-start RUN`` starts a run or continues it, so one job script serves every requeue."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from dgpo.errors import UserError
from dgpo.runtime.checkpoint import list_checkpoints
from dgpo.runtime.loop import Run, Schedule
from dgpo.runtime.preemption import PREEMPTED_STATUS, PREEMPTION, Preempted, signals_from_env
from test_run_stop_at_gain import ScriptedRecipe


class SignalledAt(ScriptedRecipe):
    """A scripted recipe whose step ``at`` receives ``sig`` mid-step (as a scheduler's signal lands)."""

    def __init__(self, at: int, sig=signal.SIGTERM):
        super().__init__([0.5] * 50)
        self.at, self.sig = at, sig

    def train_step(self):
        if self.counters.step + 1 == self.at:
            os.kill(os.getpid(), self.sig)
        return super().train_step()


@pytest.fixture
def installed():
    PREEMPTION.install()
    yield PREEMPTION
    PREEMPTION.uninstall()


def _run(recipe, tmp_path, steps=10, checkpoint_every=4):
    recipe.runner = Run(recipe, tmp_path, Schedule(steps, eval_every=3, checkpoint_every=checkpoint_every),
                        step_key="epoch", grid_prefix="epoch", log=lambda *a: None)
    return recipe.runner


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_in_the_loop_checkpoints_at_the_step_and_ends_with_75(installed, tmp_path, sig):
    runner = _run(SignalledAt(6, sig), tmp_path)
    with pytest.raises(Preempted) as stopped:
        runner.loop()
    assert stopped.value.checkpoint == "epoch 6" and stopped.value.signal_name == sig.name
    assert [p.name for p in list_checkpoints(tmp_path)][-1] == "step-6"       # not on checkpoint_every's grid
    assert not (tmp_path / "final").exists()
    line = stopped.value.message()
    assert "\n" not in line and f"--resume-or-start {tmp_path}" in line
    resumed = _run(ScriptedRecipe([0.5] * 50), tmp_path)                       # the requeue continues at 6
    resumed.loop(resume=True)
    assert resumed.counters.step == 10 and (tmp_path / "final").is_dir()


def test_the_step_and_its_evaluation_finish_before_the_stop(installed, tmp_path):
    """A signal during a step that is due an evaluation (step 6, eval every 3): the evaluation is written before
    the checkpoint, so the resumed run's metrics are the uninterrupted run's."""
    _run(ScriptedRecipe([0.5] * 50), tmp_path / "straight").loop()
    with pytest.raises(Preempted):
        _run(SignalledAt(6), tmp_path / "stopped").loop()
    _run(ScriptedRecipe([0.5] * 50), tmp_path / "stopped").loop(resume=True)
    rows = [[{k: v for k, v in json.loads(line).items() if k != "train_seconds"}
             for line in (tmp_path / n / "metrics.jsonl").read_text().splitlines()] for n in ("straight", "stopped")]
    assert rows[0] == rows[1] and [r["epoch"] for r in rows[1] if "eval_geneval" in r] == [0, 3, 6, 9, 10]


def test_outside_the_loop_a_signal_stops_at_once(installed):
    with pytest.raises(Preempted) as stopped:
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(10**6):  # the handler runs between bytecodes
            pass
    assert stopped.value.checkpoint == "" and "not kept" in stopped.value.message()


def test_without_the_handler_the_loop_never_stops_for_preemption(tmp_path):
    """Library use (no training command installed the handler): nothing is read, the run goes to its end."""
    runner = _run(ScriptedRecipe([0.5] * 50), tmp_path)
    runner.loop()
    assert runner.counters.step == 10


def test_the_signals_are_configurable(monkeypatch):
    monkeypatch.setenv("DGPO_PREEMPT_SIGNALS", "USR2, SIGTERM")
    assert signals_from_env() == [signal.SIGUSR2, signal.SIGTERM]
    monkeypatch.setenv("DGPO_PREEMPT_SIGNALS", "SIGKILL")
    with pytest.raises(UserError, match="cannot be caught"):
        signals_from_env()


# --------------------------------------------------------------------------------------- --resume-or-start

def test_resume_or_start_starts_then_continues_then_refuses_another_config(tmp_path):
    from dgpo.cli import build_parser, run_config_from_args, DEFAULT_TRAIN_CONFIG
    from dgpo.runtime import writer_lock
    from dgpo.runtime.checkpoint import save_checkpoint
    from dgpo.trainer import load_train_config, train_config_class
    run_dir = tmp_path / "run"
    parse = lambda *argv: build_parser().parse_args(["train", "--resume-or-start", str(run_dir), *argv])
    start = lambda *argv: run_config_from_args(parse(*argv), train_config_class(), load_train_config,
                                               DEFAULT_TRAIN_CONFIG, "dgpo train")
    cfg = start("--set", "run.seed=3")                                        # nothing there: a new run
    assert Path(cfg.run.out_dir) == run_dir.resolve() and cfg.run.seed == 3
    writer_lock.release(run_dir)
    again = start("--set", "run.seed=3")                                      # no checkpoint yet: started over
    assert (run_dir / "config.yaml").is_file() and again.run.seed == 3
    writer_lock.release(run_dir)
    save_checkpoint(run_dir, 5, {"w": torch.zeros(1)}, {"counters": {"epoch": 5}}, 2)
    marker = run_dir / "metrics.jsonl"
    marker.write_text('{"epoch": 5}\n')
    resumed = start("--set", "run.seed=3", "--set", "run.time_budget_min=20")  # a checkpoint: continued, not cleared
    assert resumed.run.time_budget_min == 20 and marker.read_text() == '{"epoch": 5}\n'
    writer_lock.release(run_dir)
    with pytest.raises(UserError, match="run.seed: 3 in the run, 4 asked"):
        start("--set", "run.seed=4")
    writer_lock.release(run_dir)
    with pytest.raises(UserError, match="drop --out"):
        start("--out", str(tmp_path / "other"))


def test_a_preempted_command_says_one_line_and_exits_75(monkeypatch, capsys, tmp_path):
    import dgpo.cli as cli

    def preempted(args):
        raise Preempted("SIGTERM", "epoch 7", tmp_path)
    monkeypatch.setattr(cli, "cmd_train", preempted)  # the parser built below binds it
    code = cli.run_command(cli.build_parser(), ["train"])
    err = capsys.readouterr().err.strip()
    assert code == PREEMPTED_STATUS == 75 and len(err.splitlines()) == 1
    assert err.startswith("preempted (SIGTERM): checkpointed at epoch 7")
