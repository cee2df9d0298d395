"""Worlds are plug-ins: a world written in a test file (its own prompts, split and metric) trains and
evaluates through the commands without touching the library."""

import json

import numpy as np

from dgpo.cli import main
from dgpo.errors import UserError
from dgpo.worlds.registry import make_world, register_world, world_names
from test_train import TINY_RUN  # also registers the test reward


class BrightWorld:
    """Three prompts; the task metric is the mean pixel value (per prompt colour as the categories)."""

    name = "bright"
    metric = "brightness"
    reward = "test_brightness"  # its own reward: a run with an empty reward.name trains on it
    split = {"train": ["a photo of a red circle", "a photo of a blue square"], "test": ["a photo of a green triangle"]}

    def prompts(self, split):
        return self.split["train"] + self.split["test"] if split == "all" else list(self.split[split])

    def check_prompts(self, prompts):
        pass

    def embedded_base(self, base_config, log=print):
        raise UserError("the bright world has no base of its own: set model.base")

    def score(self, images, prompts, fd=True):
        b = images.reshape(len(images), -1).mean(axis=1) / 255.0
        per = {p.split()[-2]: float(np.mean([x for x, q in zip(b, prompts) if q == p])) for p in set(prompts)}
        return {"geneval": float(b.mean()), "per_category": per, "partial": float(b.mean()),
                "n_images": len(images), "n_prompts": len(set(prompts))}


register_world("bright", BrightWorld)


def test_the_shapes_world_is_registered():
    assert "shapes" in world_names() and make_world("shapes").metric == "shapes-geneval"
    assert len(make_world().prompts("test")) == 33


def test_a_world_from_a_test_file_trains_and_evaluates(tiny_base, tmp_path, capsys):
    sets = [a for s in [f"model.base={tiny_base}", "world=bright", "run.epochs=2", "run.time_budget_min=0", *TINY_RUN,
                        "reward.name="]  # empty: the world's own reward
            for a in ("--set", s)]
    assert main(["train", *sets, "--out", str(tmp_path / "run")]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert list(summary["last"]["eval_per_category"]) == ["green"]  # the world's own test split and categories
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if "reward" in r] == [1, 2]
    images_mean_brightness = [r["reward"] for r in rows if "reward" in r]
    assert all(0 < r < 1 for r in images_mean_brightness)  # a brightness, not a 0/1 shapes verdict
    capsys.readouterr()
    assert main(["train", "--set", "world=bright", "--out", str(tmp_path / "no-base")]) == 2
    assert "no base of its own: set model.base" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny_base), "--world", "bright", "--per-prompt", "2", "--steps", "2"]) == 0
    assert "| model | brightness | green |" in capsys.readouterr().out  # the world's metric and categories
    assert main(["eval", "--model", str(tiny_base), "--world", "nowhere"]) == 2
    assert "world 'nowhere' is not registered" in capsys.readouterr().err


def test_tdm_runs_on_a_world_from_a_test_file(tiny_base, tmp_path):
    from tdm_r1.cli import main as tdm
    sets = [a for s in [f"teacher.base={tiny_base}", "world=bright", "run.iterations=2", "run.time_budget_min=0",
                        "optim.batch_size=4", "eval.per_prompt=1", "eval.fd=false", "student.lora_rank=2",
                        "student.lora_alpha=2", "fake.lora_rank=2", "fake.lora_alpha=2"] for a in ("--set", s)]
    assert tdm(["distill", *sets, "--out", str(tmp_path / "tdm")]) == 0
    summary = json.loads((tmp_path / "tdm" / "summary.json").read_text())
    assert list(summary["last"]["eval_per_category"]) == ["green"]
