"""The run loop's schedule. ``run.stop_at_gain``: a run ends once ``run.stop_after`` consecutive evaluations
reach the base + the gain (what the RL benchmark's "time to target" needs), and not before; a dip in between
restarts the count. Evaluation by minutes of training alone, for DGPO and TDM alike."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from dgpo.runtime.loop import Counters, Run, Schedule


class ScriptedRecipe:
    """A recipe whose evaluations return scripted scores: the loop's stopping rule, without a model."""

    label = "scripted"
    world = SimpleNamespace(metric="shapes-geneval")

    def __init__(self, scores):
        self.scores = list(scores)
        self.counters = Counters()
        self.weight = torch.zeros(1)

    def _row(self, per_prompt=0):
        score = self.scores[min(len(self.scores) - 1, self.counters.step)]
        return {"epoch": self.counters.step, "eval_geneval": score, "eval_geneval_se": 0.01,
                "images_per_prompt": per_prompt or 32,
                "eval_per_category": {"colors": score}, "eval_partial": score, "eval_fd": None,
                "train_seconds": self.counters.train_seconds, "nfe": self.counters.nfe}

    initial_evaluation = evaluate = _row

    def train_step(self):
        return self.runner.timed_step(lambda: ({"loss": 0.0}, 1))

    def postfix(self, row):
        return {}

    def generators(self):
        return {}

    def state_tensors(self):
        return {"weight": self.weight}, {}

    def load_state(self, tensors, state):
        self.weight = tensors["weight"]

    def export(self, folder):
        (folder / "weights.txt").write_text("scripted")

    def plot(self, rows, out):
        pass

    def summary_names(self, first, last):
        return "base", "trained"


def _run(tmp_path, scores, gain, after=2, steps=20):
    recipe = ScriptedRecipe(scores)
    recipe.runner = Run(recipe, tmp_path, Schedule(steps, eval_every=1, checkpoint_every=100, stop_at_gain=gain,
                                                   stop_after=after), step_key="epoch", grid_prefix="epoch",
                        log=lambda *a: None)
    out = recipe.runner.loop()
    return recipe, out


def test_the_run_ends_at_the_second_consecutive_evaluation_at_the_target(tmp_path):
    #          base  1     2     3     4     5     6 ...
    scores = [0.50, 0.60, 0.70, 0.55, 0.66, 0.72, 0.90, 0.90]
    recipe, out = _run(tmp_path, scores, gain=0.15)  # target 0.65: reached at 2, lost at 3, reached at 4 and 5
    assert recipe.counters.step == 5
    assert out["last"]["eval_geneval"] == 0.72
    evals = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines() if "eval_geneval" in l]
    assert [r["epoch"] for r in evals] == [0, 1, 2, 3, 4, 5]
    assert (tmp_path / "final" / "weights.txt").is_file()


@pytest.mark.parametrize("gain,after,steps_run", [(0.0, 2, 20), (0.5, 2, 20), (0.15, 1, 2), (0.15, 3, 20)])
def test_no_early_end_without_a_gain_or_without_enough_evaluations_at_it(tmp_path, gain, after, steps_run):
    scores = [0.50, 0.60, 0.70, 0.55, 0.66, 0.72, 0.60, 0.60]  # never three in a row at 0.65
    recipe, _ = _run(tmp_path, scores, gain=gain, after=after)
    assert recipe.counters.step == steps_run


def test_target_rule_ignores_the_base_evaluation():
    s = Schedule(10, stop_at_gain=0.1, stop_after=1)
    assert not s.target_reached([0.9])  # the base alone never counts
    assert s.target_reached([0.5, 0.6])
    assert not s.target_reached([0.5, 0.59])


class MinuteSteps(ScriptedRecipe):
    """Each step takes ``seconds_per_step`` of training, one minute unless a subclass says (a fake clock)."""

    seconds_per_step = 60.0

    def train_step(self):
        row = super().train_step()
        self.counters.train_seconds += self.seconds_per_step
        return row


def test_evaluation_by_minutes_alone(tmp_path):
    """eval.every=0 with eval.every_minutes=3 (DGPO's and TDM's configs both allow it): the run evaluates at the
    start, each time 3 more minutes of training have passed, and at the end, never by step count."""
    recipe = MinuteSteps([0.5] * 20)
    recipe.runner = Run(recipe, tmp_path, Schedule(10, eval_every=0, eval_every_minutes=3, checkpoint_every=100),
                        step_key="epoch", grid_prefix="epoch", log=lambda *a: None)
    recipe.runner.loop()
    evals = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines() if "eval_geneval" in l]
    assert [r["epoch"] for r in evals] == [0, 3, 6, 9, 10]


class HalfMinuteSteps(MinuteSteps):
    seconds_per_step = 30.0


def test_dense_early_evaluation_then_the_regular_cadence(tmp_path):
    """eval.early_every_minutes=1 for the first early_minutes=4, then every_minutes=3: evaluations at the start,
    at 1, 2, 3, 4 minutes of training, then at 6 and 9 (the regular cadence's slots), and at the end (10)."""
    recipe = HalfMinuteSteps([0.5] * 40)
    recipe.runner = Run(recipe, tmp_path, Schedule(20, eval_every=0, eval_every_minutes=3, checkpoint_every=100,
                                                   eval_early_every_minutes=1, eval_early_minutes=4),
                        step_key="epoch", grid_prefix="epoch", log=lambda *a: None)
    recipe.runner.loop()
    evals = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines() if "eval_geneval" in l]
    assert [r["epoch"] / 2 for r in evals] == [0, 1, 2, 3, 4, 6, 9, 10]


def _evals(tmp_path):
    return [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines() if "eval_geneval" in l]


@pytest.mark.parametrize("budget,steps,expected", [
    (9, 20, [(0, 32), (3, 8), (6, 8), (9, 32)]),               # the budget's end: its slot's evaluation is the full one
    (0, 10, [(0, 32), (3, 8), (6, 8), (9, 8), (10, 32)]),       # run.epochs' end: an interim one at 9, the full one at 10
    (0, 9, [(0, 32), (3, 8), (6, 8), (9, 32)]),                 # the last step on a slot: full, not twice
])
def test_interim_evaluations_are_cheaper_and_the_first_and_last_are_full(tmp_path, budget, steps, expected):
    """eval.interim_per_prompt=8: the curve's points between the start and the result take 8 images per prompt
    (rows marked eval_interim); the base's and the result's evaluation keep per_prompt, so the run's reported gain
    keeps its noise."""
    recipe = MinuteSteps([0.5] * 20)
    recipe.runner = Run(recipe, tmp_path, Schedule(steps, time_budget_min=budget, eval_every=0, eval_every_minutes=3,
                                                   checkpoint_every=100, eval_interim_per_prompt=8),
                        step_key="epoch", grid_prefix="epoch", log=lambda *a: None)
    out = recipe.runner.loop()
    evals = _evals(tmp_path)
    assert [(r["epoch"], r["images_per_prompt"]) for r in evals] == expected
    assert [bool(r.get("eval_interim")) for r in evals] == [n == 8 for _, n in expected]
    assert out["first"]["images_per_prompt"] == out["last"]["images_per_prompt"] == 32


def test_a_target_reached_on_interim_evaluations_ends_with_a_full_one(tmp_path):
    """run.stop_at_gain decided on two interim evaluations: the run stops there and evaluates the result once more at
    per_prompt, at the same step."""
    recipe = MinuteSteps([0.5, 0.5, 0.5, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7])
    recipe.runner = Run(recipe, tmp_path, Schedule(20, eval_every=0, eval_every_minutes=3, checkpoint_every=100,
                                                   stop_at_gain=0.15, eval_interim_per_prompt=8),
                        step_key="epoch", grid_prefix="epoch", log=lambda *a: None)
    out = recipe.runner.loop()
    assert [(r["epoch"], r["images_per_prompt"]) for r in _evals(tmp_path)] == [(0, 32), (3, 8), (6, 8), (6, 32)]
    assert recipe.counters.step == 6 and out["last"]["images_per_prompt"] == 32


def test_without_interim_per_prompt_every_evaluation_is_full(tmp_path):
    recipe = MinuteSteps([0.5] * 20)
    recipe.runner = Run(recipe, tmp_path, Schedule(10, eval_every=0, eval_every_minutes=3, checkpoint_every=100),
                        step_key="epoch", grid_prefix="epoch", log=lambda *a: None)
    recipe.runner.loop()
    assert [(r["epoch"], r["images_per_prompt"], "eval_interim" in r) for r in _evals(tmp_path)] == [
        (e, 32, False) for e in (0, 3, 6, 9, 10)]


def test_the_early_cadence_and_interim_size_are_config_keys_of_both_recipes():
    from dgpo.config import from_dict
    from dgpo.runtime.loop import RunSettings
    from dgpo.train_config import train_config_class
    from tdm_r1.config import load_distill_config
    tdm = load_distill_config(None, ["eval.early_every_minutes=0.5", "eval.every_minutes=3", "eval.interim_per_prompt=4"])
    dgpo = from_dict(train_config_class(), {"eval": {"early_every_minutes": 0.5, "early_minutes": 2,
                                                     "interim_per_prompt": 4}})
    for cfg, early_minutes in ((tdm, 5.0), (dgpo, 2.0)):
        s = Schedule.of(RunSettings(), 10, cfg.eval)
        assert (s.eval_early_every_minutes, s.eval_early_minutes, s.eval_interim_per_prompt) == (0.5, early_minutes, 4)


def test_tdm_configs_take_evaluation_by_minutes_alone():
    from tdm_r1.config import load_distill_config
    cfg = load_distill_config(None, ["eval.every=0", "eval.every_minutes=10"])
    assert (cfg.eval.every, cfg.eval.every_minutes) == (0, 10.0)
