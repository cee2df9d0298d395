"""Kills at random moments (scripts/chaos.py): a run SIGKILLed mid-rollout, mid-update or mid-checkpoint-write
and resumed ends with the same final weights and metrics, bit for bit, as the run that was never interrupted —
for DGPO, a baseline, TDM, TDM-R1, a 2-process run and a run whose reward server is killed too; and a run
preempted by SIGTERM at random moments and requeued with the same `--resume-or-start` command, each stop a
checkpoint and exit status 75."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import load_script

pytestmark = pytest.mark.slow

TRAIN = ["run.epochs=8", "run.time_budget_min=0", "rollout.prompts_per_epoch=2", "rollout.group_size=3",
         "rollout.steps=2", "eval.per_prompt=1", "eval.sampler.steps=2", "eval.fd=false", "eval.every=4",
         "eval.every_minutes=0", "run.checkpoint_every=1", "optim.micro_batch=2", "model.lora_rank=2", "model.lora_alpha=2",
         "objective.timesteps_per_sample=2", "run.threads=1"]
DISTILL = ["run.iterations=8", "run.time_budget_min=0", "optim.batch_size=4", "eval.per_prompt=1", "eval.fd=false",
           "eval.every=4", "run.checkpoint_every=1", "run.threads=1"]


def _sets(keys):
    return [a for k in keys for a in ("--set", k)]


@pytest.fixture(scope="module")
def student(tiny_base, tmp_path_factory):
    """A finished tiny TDM run for TDM-R1 to start from."""
    from tdm_r1.cli import main
    out = tmp_path_factory.mktemp("student") / "tdm"
    assert main(["distill", "--out", str(out), *_sets([f"teacher.base={tiny_base}", *DISTILL, "run.iterations=2"])]) == 0
    return out


@pytest.mark.parametrize("case", ["dgpo", "flow_grpo", "tdm", "tdm_r1", "dgpo_2_processes", "dgpo_reward_server",
                                  "dgpo_sigterm"])
def test_killed_and_resumed_run_ends_as_the_uninterrupted_one(case, tiny_base, student, tmp_path, capsys):
    flags = ["--kills", "3", "--seed", "1"]
    if case in ("dgpo", "dgpo_2_processes", "dgpo_reward_server", "dgpo_sigterm"):
        command = ["dgpo.cli", "train", *_sets([f"model.base={tiny_base}", *TRAIN])]
    elif case == "flow_grpo":
        command = ["dgpo.cli", "train", "configs/flow_grpo/shapes.yaml", *_sets([f"model.base={tiny_base}", *TRAIN])]
    elif case == "tdm":
        command = ["tdm_r1.cli", "distill", *_sets([f"teacher.base={tiny_base}", *DISTILL])]
    else:
        command = ["tdm_r1.cli", "train", *_sets([f"teacher.base={tiny_base}", f"r1.init_run={student}", *DISTILL,
                                                  "r1.group_size=2"])]
    if case == "dgpo_sigterm":  # preemptions: every launch `--resume-or-start RUN`, each stop a checkpoint and 75
        flags += ["--signal", "SIGTERM", "--kills", "4"]
        command += ["--set", "run.epochs=30"]
    if case == "dgpo_2_processes":
        flags += ["--processes", "2", "--kills", "2"]
    if case == "dgpo_reward_server":  # long enough for the server's outages to fall inside the training
        flags += ["--reward-server", "shapes_partial", "--server-kills", "2", "--kills", "1"]
        command += ["--set", "run.epochs=40"]
    out = tmp_path / "chaos"
    code = load_script("scripts/chaos.py").main([*flags, "--out", str(out), "--", *command])
    result = json.loads((out / "chaos.json").read_text())
    assert code == 0 and result["equal"], result
    assert result["kills"] >= 1 and result["metrics_rows"] > 8
    if case == "dgpo_reward_server":
        assert result["server_kills"] >= 1
    if case == "dgpo_sigterm":
        # 75 for each stop at a safe point; 0 for a signal that came once the run had left its loop (it finishes);
        # -15 for one that came while Python started, before the command handled it: that launch changed nothing
        stops = [stop for stop in result["stops"] if not (stop["status"] == -15 and stop["folder_unchanged"])]
        statuses = [stop["status"] for stop in stops]
        assert 75 in statuses and set(statuses[:-1]) == {75} and statuses[-1] in (0, 75), result["stops"]
        assert not any(stop["killed_after_grace"] for stop in result["stops"])
    assert "the same final weights and metrics" in capsys.readouterr().out
    # a killed process tree takes a moment to be gone on a loaded machine (two test workers share the cores):
    # what is still there after 30 s was left behind
    deadline = time.monotonic() + 30
    while _processes_mentioning(str(out)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _processes_mentioning(str(out)), "a killed run left processes behind"


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in args:
            found.append(args)
    return found
