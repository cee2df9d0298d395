"""The package as a user installs it: the wheel built from this source tree, installed into a fresh virtual
environment outside the tree, its commands typed from an empty directory with an empty cache. Nothing may
depend on files that only a clone has (the default recipes, the shipped base).

The fresh environment gets the package from the wheel alone; its dependencies (torch, diffusers …) are the
test environment's, reached through a path file, so the test installs nothing from a registry. The test
environment's own editable install of the package is not visible there (its import hook is not loaded),
which the first command checks.
"""

import os
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SOURCE_IGNORE = shutil.ignore_patterns(".git", ".venv", "runs", "build", "*.egg-info", "__pycache__", "wandb",
                                       ".pytest_cache", "*.whl")
TINY_TRAIN = ["run.epochs=2", "run.time_budget_min=0", "rollout.prompts_per_epoch=2", "rollout.group_size=2",
              "rollout.steps=2", "eval.per_prompt=1", "eval.sampler.steps=2", "eval.fd=false",
              "model.lora_rank=2", "model.lora_alpha=2", "objective.timesteps_per_sample=1"]
TINY_DISTILL = ["run.iterations=2", "run.time_budget_min=0", "optim.batch_size=2", "eval.per_prompt=1",
                "eval.fd=false", "student.lora_rank=2", "student.lora_alpha=2", "fake.lora_rank=2",
                "fake.lora_alpha=2"]


def _sets(keys):
    return [a for k in keys for a in ("--set", k)]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(run, user_dir, env_dir): the wheel installed into a fresh environment; ``run`` types a command there
    from the empty ``user_dir``."""
    root = tmp_path_factory.mktemp("installed")
    source, wheels, env_dir, user, cache = (root / n for n in ("source", "wheels", "env", "user", "cache"))
    # the wheel is built from a copy, so building writes nothing into the user's tree (build/, *.egg-info)
    shutil.copytree(REPO, source, symlinks=True, ignore=SOURCE_IGNORE)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    str(source), "-w", str(wheels)], check=True, capture_output=True, text=True)
    wheel = next(wheels.glob("dgpo-*.whl"))
    venv.EnvBuilder(with_pip=True).create(env_dir)      # pip from the interpreter's own bundle: no download
    env_python = env_dir / "bin" / "python"
    env_site = Path(subprocess.run([str(env_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   check=True, capture_output=True, text=True).stdout.strip())
    (env_site / "test_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([str(env_python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
                   check=True, capture_output=True, text=True)
    user.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(DGPO_CACHE=str(cache), PATH=f"{env_dir / 'bin'}{os.pathsep}{os.environ['PATH']}",
               WANDB_MODE="offline", HF_HUB_OFFLINE="1")

    def run(*argv):
        command = shutil.which(argv[0], path=str(env_dir / "bin")) or argv[0]
        done = subprocess.run([command, *argv[1:]], cwd=user, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{' '.join(argv)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done.stdout

    return run, user, env_dir


def test_the_installed_wheel_runs_every_default_recipe_from_an_empty_directory(installed):
    run, user, env_dir = installed
    where = run(str(env_dir / "bin" / "python"), "-c",
                "import dgpo, tdm_r1, dgpo.recipes as r; print(dgpo.__file__, tdm_r1.__file__, r.recipes_dir())")
    assert all(str(env_dir) in p for p in where.split()), where   # the wheel's package, not the source tree
    assert "configs/dgpo/shapes.yaml" in run("dgpo", "--help") + run("dgpo", "train", "--help")
    assert "(shipped with the package" in run("dgpo", "pretrain", "--no-eval")
    shipped_net = run(str(env_dir / "bin" / "python"), "-c", "from dgpo.worlds import quality as Q; "
                      "print(Q.shipped_path(Q.QualityConfig()).is_file(), Q.feature_network(32).config.key())")
    assert shipped_net.split()[0] == "True", shipped_net          # the FD's network ships in the wheel, not trained
    out = run("dgpo", "train", *_sets(TINY_TRAIN))                    # the default recipe, from the wheel
    assert "test shapes-geneval" in out and (user / "runs/dgpo-shapes/final/lora").is_dir()
    run("dgpo", "sample", "--lora", "runs/dgpo-shapes/final/lora", "--split", "test", "--steps", "2",
        "--per-prompt", "1", "--out", "samples")
    assert (user / "samples/grid.png").is_file() and len(list((user / "samples").glob("0*.png"))) == 33
    assert "configs/tdm/shapes.yaml" in run("tdm-r1", "distill", "--help")
    run("tdm-r1", "distill", *_sets(TINY_DISTILL))
    assert (user / "runs/tdm-shapes/final/lora/sampler.json").is_file()
    assert sorted(p.name for p in user.iterdir()) == ["runs", "samples"]   # nothing else written where the user is
