"""The base shipped inside the package: it is what the default config resolves to (no pretraining, nothing
written to the cache), it loads and samples in stock diffusers, its recorded config is the config file it names,
and it knows the words well enough to draw what single-object prompts ask for."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dgpo.cli import DEFAULT_BASE_CONFIG, load_base_config, main
from dgpo.config import to_dict
from dgpo.recipes import recipe_name
from dgpo.worlds import shapes
from dgpo.worlds.shapes_base.pretrain import base_key, ensure_base
from dgpo.worlds.shapes_base.shipped import SHIPPED_ROOT, shipped_base, shipped_bases, shipped_record

from conftest import assert_margin

REPO = Path(__file__).resolve().parents[1]


def _folder_files(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def shipped() -> Path:
    folder = shipped_base(base_key(load_base_config()))
    assert folder is not None, "the default base config's base is not shipped"
    return folder


def test_the_default_base_is_shipped_and_resolves_without_pretraining(shipped, cache_dir):
    before = sorted(p.name for p in (cache_dir / "base").glob("*")) if (cache_dir / "base").exists() else []
    assert ensure_base(load_base_config(), log=pytest.fail) == shipped  # log: nothing to pretrain, nothing to say
    after = sorted(p.name for p in (cache_dir / "base").glob("*")) if (cache_dir / "base").exists() else []
    assert after == before


def test_every_shipped_base_records_the_config_file_it_names(shipped):
    assert shipped_bases(), "no base shipped"
    for key, folder in shipped_bases().items():
        record = shipped_record(folder)
        config_file = REPO / record["config"]
        assert config_file.is_file(), record
        recorded = yaml.safe_load((folder / "pretrain_config.yaml").read_text())
        named = to_dict(load_base_config(config_file))
        recorded.pop("threads"), named.pop("threads")  # the one key that changes no weight
        assert recorded == named
        assert base_key(load_base_config(config_file)) == key
        assert record["command"].startswith(f"dgpo pretrain {record['config']} --ignore-shipped")
    assert shipped_record(shipped)["config"] == recipe_name(DEFAULT_BASE_CONFIG)


def test_shipped_bases_fit_the_package_budget():
    total = sum(p.stat().st_size for p in SHIPPED_ROOT.rglob("*") if p.is_file())
    assert total <= 30 * 2**20, f"{total / 2**20:.1f} MB shipped"


def test_stock_diffusers_loads_and_samples_the_shipped_base(shipped, outcome_seed):
    """It draws what it is asked for: the verifier passes at least a quarter of 9 images of the single-object
    prompts (the base scores 1.00 on them at 64 images each; a broken base gets ~0; a coloured object, e.g. a
    red circle, it draws only 25-75% of the time). Measured margin (the fraction passed over 0.25), seeds 0-2 at
    1 and 2 threads: 4.0× (9 of 9 passed at every seed)."""
    from diffusers import StableDiffusion3Pipeline
    pipe = StableDiffusion3Pipeline.from_pretrained(str(shipped), text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    prompts = [p for p in shapes.prompts("all") if shapes.category(p) == "single_object"] * 3
    out = pipe(prompts, num_inference_steps=20, guidance_scale=1.5, max_sequence_length=0, output_type="np",
               generator=torch.Generator().manual_seed(outcome_seed)).images
    assert out.shape == (9, 32, 32, 3)
    images = (np.clip(out, 0, 1) * 255).round().astype(np.uint8)
    found = float(np.mean(shapes.score_batch(images, prompts)))
    assert_margin(found, 0.25, "fraction of images the verifier passes")


def test_dgpo_pretrain_prints_the_shipped_base_and_writes_nothing_into_it(shipped, capsys):
    before = _folder_files(shipped)
    assert main(["pretrain", "--no-eval"]) == 0
    assert f"base model: {shipped} (shipped with the package" in capsys.readouterr().out
    if (shipped / "eval.json").is_file():  # the evaluation it ships is printed, not recomputed
        assert main(["pretrain"]) == 0
        assert "shapes-geneval" in capsys.readouterr().out
        assert json.loads((shipped / "eval.json").read_text())["n_images"] >= 33 * 64
    assert _folder_files(shipped) == before


def test_dgpo_pretrain_evaluates_the_shipped_base_once_and_keeps_the_result_in_the_cache(shipped, capsys):
    """The shipped folder is never written to; its evaluation is kept in the cache, so a second call only prints."""
    if (shipped / "eval.json").is_file():
        pytest.skip("this base ships its evaluation")
    before = _folder_files(shipped)
    assert main(["pretrain", "--per-prompt", "1", "--set", "threads=1"]) == 0
    first = capsys.readouterr().out
    assert "evaluating the shipped base once" in first and "shapes-geneval" in first
    assert main(["pretrain", "--per-prompt", "1"]) == 0
    second = capsys.readouterr().out
    assert "evaluating" not in second and second.split("base model:")[1].splitlines()[1:] == \
        first.split("evaluating the shipped base once")[1].splitlines()[1:]
    assert _folder_files(shipped) == before
