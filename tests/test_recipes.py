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
