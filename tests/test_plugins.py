"""Plug-ins: a reward and a method written in files of their own (examples/), loaded by `dgpo train --plugin`,
train end to end without touching the library; a resumed run loads them again by itself."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.torch import load_file

from dgpo.cli import main
from dgpo.methods import Objective, register_objective
from dgpo.worlds import shapes
from test_train import TINY_RUN  # also registers the test reward

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
METHOD, REWARD = str(EXAMPLES / "reward_weighted_regression.py"), str(EXAMPLES / "object_count_reward.py")


def _train(tiny_base, out, *extra, plugins=()):
    sets = [a for s in [f"model.base={tiny_base}", "run.epochs=2", "run.time_budget_min=0", "run.checkpoint_every=1",
                        *TINY_RUN, *extra] for a in ("--set", s)]
    return main(["train", *sets, "--out", str(out), *[a for p in plugins for a in ("--plugin", p)]])


def test_a_method_from_a_file_with_its_own_section_trains_end_to_end(tiny_base, tmp_path):
    out = tmp_path / "run"
    assert _train(tiny_base, out, "objective.name=rwr", "rwr.weight=0.5", plugins=[METHOD]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["rwr"] == {"weight": 0.5, "t_min": 0.0}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if "weighted_fraction" in r] == [1, 2]
    lora = load_file(str(out / "final" / "lora" / "pytorch_lora_weights.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in lora.items())  # it trained
    assert json.loads((out / "plugins.json").read_text()) == [METHOD]


def test_a_resumed_run_loads_its_plugins_again(tiny_base, tmp_path):
    out = tmp_path / "run"
    assert _train(tiny_base, out, "objective.name=rwr", "reward.name=object_count", plugins=[METHOD, REWARD]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "dgpo.cli", "train", "--resume", str(out), "--set", "run.epochs=3"],
                          capture_output=True, text=True, env=env, timeout=300)  # a fresh process: nothing registered
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "checkpoints" / "step-3").is_dir()


def test_the_reward_example_scores_presence():
    from dgpo.plugins import load_plugin
    from dgpo.rewards import make_reward
    load_plugin(REWARD)
    reward = make_reward("object_count")
    prompts = ["a photo of three circles", "a photo of a square left of a triangle", "a photo of three circles"]
    images = np.stack([shapes.render(prompts[0], 32, 0), shapes.render(prompts[1], 32, 1), np.zeros((32, 32, 3), np.uint8)])
    assert reward(images, prompts).tolist() == [1.0, 1.0, 0.0]


def test_a_plugin_that_is_missing_or_broken_is_one_clear_line(tiny_base, tmp_path, capsys):
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    assert _train(tiny_base, tmp_path / "a", plugins=[str(tmp_path / "nope.py")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert _train(tiny_base, tmp_path / "b", plugins=[str(broken)]) == 2
    assert "boom" in capsys.readouterr().err
    assert _train(tiny_base, tmp_path / "c", "objective.name=nope") == 2
    assert "not a registered objective" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in "abc")


def test_a_method_cannot_take_a_shared_sections_name():
    from dataclasses import dataclass

    @dataclass
    class Settings:
        pass

    class Clash(Objective):
        name = "run"
        config_section = Settings
    with pytest.raises(ValueError, match="shared section 'run'"):
        register_objective(Clash)


def test_a_model_family_from_a_file_trains_with_dgpo_and_tdm(tmp_path):
    """examples/pixel_flow_model.py: a flow model with no diffusers pipeline, behind the model-handle protocol."""
    model = tmp_path / "pixel-flow"
    done = subprocess.run([sys.executable, str(EXAMPLES / "pixel_flow_model.py"), str(model)], capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    plugin = str(EXAMPLES / "pixel_flow_model.py")
    out = tmp_path / "run"
    assert main(["train", "--plugin", plugin, "--out", str(out), *[a for s in [
        f"model.base={model}", "run.epochs=2", "run.time_budget_min=0", *TINY_RUN, "model.lora_targets=attention",
        "optim.lr=1e-2"] for a in ("--set", s)]]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if "reward" in r] == [1, 2]
    lora = load_file(str(out / "final" / "lora" / "pytorch_lora_weights.safetensors"))
    assert any(".to_q." in k for k in lora) and any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)
    from tdm_r1.cli import main as tdm
    assert tdm(["distill", "--plugin", plugin, "--out", str(tmp_path / "tdm"), *[a for s in [
        f"teacher.base={model}", "run.iterations=1", "run.time_budget_min=0", "optim.batch_size=4", "eval.per_prompt=1",
        "eval.fd=false", "student.lora_rank=2", "student.lora_alpha=2", "fake.lora_rank=2", "fake.lora_alpha=2"]
        for a in ("--set", s)]]) == 0
    assert (tmp_path / "tdm" / "final" / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_the_shared_section_names_are_the_training_configs():
    import dataclasses
    from dgpo.methods.registry import SHARED_SECTIONS
    from dgpo.train_config import TrainConfig
    assert set(SHARED_SECTIONS) == {f.name for f in dataclasses.fields(TrainConfig)}
