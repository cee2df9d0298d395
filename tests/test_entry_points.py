"""Every command, typed as a user types it, from an EMPTY cache: nothing lazily built may pass CI and fail a
user. Each runs as its own process (the installed console scripts) with tiny settings on the same code
path; the first `dgpo train` builds the tiny base on first use and computes FD with the project's default
feature network, which ships with the package (nothing is trained for it), as on a fresh machine.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import TINY_BASE, TINY_BASE_CONFIG

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
TINY_TRAIN = ["run.epochs=2", "run.time_budget_min=0", "rollout.prompts_per_epoch=2", "rollout.group_size=3",
              "rollout.steps=2", "eval.per_prompt=1", "eval.sampler.steps=2", "run.checkpoint_every=1",
              "model.lora_rank=2", "model.lora_alpha=2", "objective.timesteps_per_sample=1"]
TINY_DISTILL = ["run.iterations=2", "run.time_budget_min=0", "optim.batch_size=4", "eval.per_prompt=1",
                "student.lora_rank=2", "student.lora_alpha=2", "fake.lora_rank=2", "fake.lora_alpha=2"]


def _sets(keys):
    return [a for k in keys for a in ("--set", k)]


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """A user's working directory, an empty cache, and a `run(command, *args)` that types a command."""
    home = tmp_path_factory.mktemp("user")
    cache = home / "cache"
    env = {**os.environ, "DGPO_CACHE": str(cache), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    from dgpo.cli import load_base_config
    from dgpo.config import to_dict
    (home / "tiny.yaml").write_text(yaml.safe_dump(to_dict(load_base_config(TINY_BASE_CONFIG, TINY_BASE))))

    def run(*argv):
        done = subprocess.run([shutil.which(argv[0], path=env["PATH"]), *argv[1:]], cwd=home, env=env,
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{' '.join(argv)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done.stdout

    return home, cache, run


def test_every_command_from_an_empty_cache(user):
    home, cache, run = user
    assert not cache.exists()
    # the main job: pretrains the base; FD with the shipped feature network, none trained into the cache
    out = run("dgpo", "train", *_sets([f"model.base_config={home / 'tiny.yaml'}", *TINY_TRAIN]))
    assert "test shapes-geneval" in out and (home / "runs/dgpo-shapes/final/lora").is_dir()
    assert not list((cache / "quality").glob("*.safetensors")) and list((cache / "base").iterdir())
    assert json.loads((home / "runs/dgpo-shapes/summary.json").read_text())["last"]["eval_fd"] is not None

    out = run("dgpo", "pretrain", "tiny.yaml", "--per-prompt", "1")
    base = out.split("base model: ")[1].split(" (cached)")[0]
    assert (Path(base) / "model_index.json").is_file()
    run("dgpo", "sample", "--model", base, "--split", "test", "--steps", "2", "--out", "samples")
    assert len(list((home / "samples").glob("*.png"))) == 34  # 33 test prompts + the grid
    run("dgpo", "eval", "--model", base, "--per-prompt", "1", "--steps", "2", "--out", "eval.json")
    assert "geneval" in json.loads((home / "eval.json").read_text())
    run("dgpo", "eval", "--samples", "samples")
    run("dgpo", "export", "runs/dgpo-shapes", "--step", "1", "--out", "lora-step1")
    assert (home / "lora-step1/pytorch_lora_weights.safetensors").is_file()

    run("tdm-r1", "distill", *_sets([f"teacher.base_config={home / 'tiny.yaml'}", *TINY_DISTILL]))
    assert (home / "runs/tdm-shapes/final/lora/sampler.json").is_file()
    run("tdm-r1", "sample", "--model", base, "--lora", "runs/tdm-shapes/final/lora", "--nfe", "4",
        "--split", "test", "--out", "student-samples")
    assert (home / "student-samples/grid.png").is_file()
