"""scripts/eval_noise.py: the spread of shapes-geneval over seed sets and the paired difference."""

import json
import math

import pytest
import torch
from conftest import load_script

eval_noise = load_script("scripts/eval_noise.py")


def test_spread_and_paired_difference_formulas():
    s = eval_noise.spread([0.30, 0.34, 0.32, 0.36])
    assert s["mean"] == pytest.approx(0.33) and s["std"] == pytest.approx(0.0258199, rel=1e-5)
    assert s["sem"] == pytest.approx(s["std"] / 2)
    # a model 0.05 above the base on every set but one: the pairing removes the sets' shared noise
    d = eval_noise.paired([0.30, 0.34, 0.32, 0.36], [0.35, 0.39, 0.37, 0.40])
    assert d["mean"] == pytest.approx(0.0475) and d["std"] == pytest.approx(0.005)
    assert d["ratio"] == pytest.approx(0.0475 / 0.0025)
    assert eval_noise.paired([0.3, 0.4], [0.3, 0.4])["ratio"] == 0.0
    assert eval_noise.paired([0.25, 0.5], [0.75, 1.0])["ratio"] == math.inf  # exact binary fractions


def test_a_run_writes_json_table_and_plot_and_keeps_them(tiny_base, tmp_path, capsys):
    from diffusers import StableDiffusion3Pipeline
    from dgpo.models.adapters import AdapterRoles
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_base), text_encoder_3=None, tokenizer_3=None)
    roles = AdapterRoles(pipe.transformer)
    with torch.no_grad():
        for p in roles.add("policy", rank=2):
            p.add_(0.1 * torch.randn_like(p))
    roles.save_diffusers("policy", tmp_path / "lora")
    argv = ["--model", str(tiny_base), "--lora", str(tmp_path / "lora"), "--seed-sets", "2", "--per-prompt", "1",
            "--out-dir", str(tmp_path / "out"), "--name", "n"]
    assert eval_noise.main(argv) == 0
    result = json.loads((tmp_path / "out" / "n.json").read_text())
    assert list(result["models"]) == ["base", str(tmp_path / "lora")]
    assert len(result["models"]["base"]["per_set"]["geneval"]) == 2
    assert "paired_geneval" in result["models"][str(tmp_path / "lora")]
    assert (tmp_path / "out" / "n.md").is_file() and (tmp_path / "out" / "n.png").is_file()
    capsys.readouterr()
    assert eval_noise.main(argv) == 2  # kept: a second run needs --overwrite
    assert "exists" in capsys.readouterr().err
    assert eval_noise.main(argv[:2] + ["--seed-sets", "1"]) == 2
