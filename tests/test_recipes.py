"""Every recipe under configs/ loads with its keys checked, and the SD3.5-Medium recipes hold the settings they
say they hold (they need GPUs and local weights, so nothing here runs them)."""

from pathlib import Path

import pytest

from dgpo.trainer import load_train_config

ROOT = Path(__file__).resolve().parents[1]
RL_RECIPES = sorted(str(p.relative_to(ROOT)) for d in ("dgpo", "flow_grpo", "diffusion_dpo", "nft")
                    for p in (ROOT / "configs" / d).glob("*.yaml"))


@pytest.fixture
def prompt_file(tmp_path):
    """A two-line prompt-file world standing in for a user's GenEval / OCR / Pick-a-Pic prompts."""
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a photo of a cat", "split": "train"}\n{"prompt": "a photo of a dog", "split": "test"}\n')
    return path


@pytest.mark.parametrize("recipe", RL_RECIPES)
def test_every_rl_recipe_loads(recipe, prompt_file):
    load_train_config(ROOT / recipe, [f"world={prompt_file}"] if "sd35m" in recipe else [])


@pytest.mark.parametrize("task, reward, beta", [("geneval", "remote", 100), ("ocr", "ocr", 100),
                                                ("pickscore", "pickscore", 10)])
def test_the_sd35_medium_recipes_hold_the_released_settings(task, reward, beta, prompt_file):
    cfg = load_train_config(ROOT / "configs" / "dgpo" / f"sd35m_{task}.yaml", [f"world={prompt_file}"])
    assert (cfg.model.resolution, cfg.model.lora_rank, cfg.model.mixed_precision) == (512, 32, "bf16")
    assert (cfg.rollout.steps, cfg.rollout.guidance_scale, cfg.optim.lr) == (10, 4.5, 3e-4)
    assert (cfg.reward.name, cfg.objective.beta) == (reward, beta)
    text = (ROOT / "configs" / "dgpo" / f"sd35m_{task}.yaml").read_text()
    assert "GPUs:" in text and "accelerate launch" in text  # each recipe states what it expects


@pytest.mark.parametrize("name, kind, processes, machines", [("cpu_2_processes", "MULTI_GPU", 2, 1),
                                                            ("gpus_8", "MULTI_GPU", 8, 1),
                                                            ("two_nodes", "MULTI_GPU", 16, 2),
                                                            ("cpu_2_processes_fsdp", "FSDP", 2, 1),
                                                            ("gpus_8_fsdp", "FSDP", 8, 1)])
def test_accelerate_configs_load_in_accelerate(name, kind, processes, machines):
    """Each launch config parses with accelerate's own loader and launches what its name says (the CPU one is
    what tests/test_multiprocess.py launches; the GPU ones cannot run here)."""
    from accelerate.commands.config.config_args import load_config_from_file
    cfg = load_config_from_file(str(ROOT / "configs" / "accelerate" / f"{name}.yaml"))
    assert (str(cfg.distributed_type).split(".")[-1], cfg.num_processes, cfg.num_machines) == (kind, processes, machines)


@pytest.mark.parametrize("env, says", [({"ACCELERATE_USE_DEEPSPEED": "true"}, "DeepSpeed accelerate config"),
                                       ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "set fsdp_version: 2"),
                                       ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2",
                                         "FSDP_RESHARD_AFTER_FORWARD": "false"}, "Set it to true"),
                                       ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2",
                                         "FSDP_OFFLOAD_PARAMS": "true"}, "set it to false")])
def test_a_launch_config_that_cannot_be_honoured_is_refused_in_one_line(env, says, monkeypatch):
    """DeepSpeed (ZeRO-1/2 would shard a few MB of LoRA optimiser state), FSDP1 (which wraps a model to train all
    of it), and FSDP2 settings that would undo the sharding or are not supported: one clear error instead of a
    run that does something else than its config says."""
    from dgpo.errors import UserError
    from dgpo.runtime.processes import Processes
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(UserError, match=says):
        Processes.launched()


def test_the_fsdp_launch_configs_ask_for_what_the_sharding_does():
    """The FSDP configs set the FSDP_* variables (through accelerate's own launcher code) that
    :func:`dgpo.runtime.sharding.sharded_launch` accepts: version 2, gathered weights freed after each forward, no offload."""
    from accelerate.commands.config.config_args import load_config_from_file
    from dgpo.runtime.sharding import sharded_launch
    for name in ("cpu_2_processes_fsdp", "gpus_8_fsdp"):
        fsdp = load_config_from_file(str(ROOT / "configs" / "accelerate" / f"{name}.yaml")).fsdp_config
        env = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": str(fsdp["fsdp_version"]),
               "FSDP_RESHARD_AFTER_FORWARD": str(fsdp["fsdp_reshard_after_forward"]).lower(),
               "FSDP_OFFLOAD_PARAMS": str(fsdp["fsdp_offload_params"]).lower()}
        assert sharded_launch(env), name
    assert not sharded_launch({})


DISTILL_RECIPES = sorted(str(p.relative_to(ROOT)) for d in ("tdm", "tdm_r1") for p in (ROOT / "configs" / d).glob("*.yaml"))


@pytest.mark.parametrize("recipe", DISTILL_RECIPES)
def test_every_tdm_recipe_loads(recipe, prompt_file):
    from tdm_r1.config import load_distill_config
    load_distill_config(ROOT / recipe, [f"world={prompt_file}"] if "sd35m" in recipe else [])


@pytest.mark.parametrize("task, reward, beta, rl_cfg, surrogate_t_min, reward_t_min",
                         [("geneval", "remote", 1, 2.5, 0.55, 0.25), ("ocr", "ocr", 10, 4.5, 0.3, 0.3)])
def test_the_sd35_medium_r1_recipes_hold_the_released_per_task_settings(task, reward, beta, rl_cfg, surrogate_t_min,
                                                                         reward_t_min, prompt_file):
    from tdm_r1.cli import load_r1_config
    path = ROOT / "configs" / "tdm_r1" / f"sd35m_{task}.yaml"
    cfg = load_r1_config(path, [f"world={prompt_file}"])
    assert (cfg.teacher.resolution, cfg.teacher.mixed_precision, cfg.student.lora_rank, cfg.student.lora_alpha) == \
        (512, "bf16", 32, 64)
    assert (cfg.r1.group_size, cfg.r1.rl_cfg, cfg.r1.t_min, cfg.r1.trunc_steps) == (24, rl_cfg, reward_t_min, 4)
    s = cfg.surrogate
    assert (s.lr, s.beta, s.normalization, s.t_min, s.clip_range) == (3e-4, beta, "gradient_equivalent",
                                                                       surrogate_t_min, 1e-3)
    assert (cfg.reward.name, cfg.optim.generator_lr, cfg.student.ema_decay) == (reward, 7.5e-5, 0.9)
    assert "GPUs:" in path.read_text() and "tdm-r1 convert" in path.read_text()


# ------------------------------------------------------------------------------- the recipes in the package

def test_the_package_reaches_the_repositorys_recipes_and_the_wheel_carries_every_one():
    """One copy of every recipe: the package's recipe folder (dgpo/configs, found with importlib.resources) is
    the repository's configs/, and the wheel's package-data pattern (configs/*/*.yaml) matches every file in it,
    so an installed package has them all."""
    import tomllib
    from dgpo.recipes import recipes_dir
    assert recipes_dir().resolve() == (ROOT / "configs").resolve()
    assert (ROOT / "dgpo" / "configs").is_symlink() and not (ROOT / "configs").is_symlink()
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["dgpo"]
    assert patterns == ["configs/*/*.yaml"]
    every_file = sorted(p for p in (ROOT / "configs").rglob("*") if p.is_file())
    assert every_file == sorted((ROOT / "configs").glob("*/*.yaml")) and len(every_file) > 15


def test_a_recipe_named_as_the_readme_names_it_is_found_from_any_directory(tmp_path, monkeypatch):
    from dgpo.config import ConfigError
    from dgpo.recipes import recipe, resolve_config_path
    monkeypatch.chdir(tmp_path)
    assert resolve_config_path("configs/dgpo/shapes.yaml") == recipe("dgpo/shapes.yaml")
    assert load_train_config("configs/flow_grpo/shapes.yaml").objective.name == "flow_grpo"
    # a user's own file of that name, where they are, comes first
    own = tmp_path / "configs" / "dgpo" / "shapes.yaml"
    own.parent.mkdir(parents=True)
    own.write_text("objective:\n  name: nft\n")
    assert resolve_config_path("configs/dgpo/shapes.yaml") == Path("configs/dgpo/shapes.yaml")
    assert load_train_config("configs/dgpo/shapes.yaml").objective.name == "nft"
    with pytest.raises(ConfigError, match="configs/dgpo/missing.yaml' does not exist"):
        load_train_config("configs/dgpo/missing.yaml")


def test_help_names_the_default_recipe_and_where_the_recipes_live(capsys):
    from dgpo.cli import main
    from dgpo.recipes import recipes_dir
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    squeezed = "".join(capsys.readouterr().out.split())   # argparse wraps lines, at hyphens too
    assert "defaultconfigs/dgpo/shapes.yaml" in squeezed and "".join(str(recipes_dir()).split()) in squeezed
