"""Pretraining data and resumable pretraining: cache keys of existing bases are kept, the grammar pool and its
corrupted captions are deterministic, a pretraining stopped in pieces ends bit-identical to one run straight
through, and concurrent first use of a key trains once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_BASE, TINY_BASE_CONFIG, assert_margin

from dgpo.runtime.checkpoint import list_checkpoints
from dgpo.cli import load_base_config, main
from dgpo.config import to_dict
from dgpo.models.handle import load_pipeline
from dgpo.worlds.shapes_base.pretrain import (FlowPaused, base_key, ensure_base, partial_dir, pool_captions, render_pool,
                                  training_captions)
from dgpo.worlds import shapes_captions as C
from dgpo.worlds import shapes_fidelity as F

REPO = Path(__file__).resolve().parents[1]
GRAMMAR = [*TINY_BASE, "data.captions=grammar", "data.renders_per_prompt=1", "data.fidelity=0.7",
           "flow.steps=6", "flow.warmup_steps=2", "flow.checkpoint_every=2"]


def test_keys_of_existing_bases_are_unchanged():
    # computed on the code before captions / fidelity / checkpoint_every existed
    assert base_key(load_base_config(REPO / "configs/base/shapes.yaml")) == "faced2811a54"
    assert base_key(load_base_config()) == "91b45c1bfe5d"  # the default: the shipped grammar base, p = 0.5
    assert base_key(load_base_config(REPO / "configs/base/shapes_patch1.yaml")) == "a92ff9640456"
    assert base_key(load_base_config(TINY_BASE_CONFIG, TINY_BASE)) == "aee6cc9d8748"
    assert base_key(load_base_config(TINY_BASE_CONFIG, [*TINY_BASE, "flow.checkpoint_every=7"])) == "aee6cc9d8748"
    keys = {base_key(load_base_config(TINY_BASE_CONFIG, [*TINY_BASE, *extra])) for extra in
            ([], ["data.captions=grammar"], ["data.fidelity=0.7"], ["data.captions=grammar", "data.fidelity=0.7"])}
    assert len(keys) == 4


def test_grammar_config_is_patch1_with_grammar_captions_and_more_steps():
    patch1 = to_dict(load_base_config(REPO / "configs/base/shapes_patch1.yaml"))
    grammar = to_dict(load_base_config(REPO / "configs/base/shapes_grammar.yaml"))
    assert (grammar["data"].pop("captions"), patch1["data"].pop("captions")) == ("grammar", "benchmark")
    assert grammar["data"]["fidelity"] == 1.0
    assert grammar["flow"].pop("steps") == 40000 > patch1["flow"].pop("steps")
    assert grammar == patch1


def test_grammar_pool_and_its_corrupted_captions(outcome_seed):
    """Margin framing (the corrupted fraction): tolerance 8σ vs |observed − expected|, σ the binomial
    standard error of 57 600 entries (8σ = 0.015; it was 4σ of 5760 entries, 0.024), the observed deviation
    at least one entry (1/n).
    Measured margin (seeds 0-2, 1 and 2 threads): 6.6-8.8x."""
    cfg = load_base_config(TINY_BASE_CONFIG, [*GRAMMAR, f"seed={outcome_seed}"])
    assert pool_captions(cfg) == C.pretraining_captions()
    images, prompt_list, prompt_idx = render_pool(cfg)
    assert images.shape == (576, 32, 32, 3) and prompt_list == C.pretraining_captions()
    assert all(C.score_caption(images[i], prompt_list[prompt_idx[i]]) == 1.0 for i in range(0, 576, 23))

    many = np.repeat(np.arange(576), 100)
    train_list, train_idx = training_captions(cfg, prompt_list, many)
    again = training_captions(cfg, prompt_list, many)
    assert train_list == again[0] and np.array_equal(train_idx, again[1])  # seeded: the same every time
    assert set(train_list) <= set(prompt_list)
    noisy = [train_list[i] for i in train_idx]
    corrupted = np.mean([prompt_list[j] != c for j, c in zip(many, noisy)])
    expected = F.expected_corrupted_fraction(prompt_list, 0.7, prompt_list)  # 0.3 * 565 / 576
    sigma = np.sqrt(expected * (1 - expected) / len(many))
    assert_margin(8 * sigma, max(abs(corrupted - expected), 1 / len(many)),
                  "corrupted fraction: 8 standard errors vs |observed - expected|", rate=corrupted, expected=expected)
    default = load_base_config(TINY_BASE_CONFIG, TINY_BASE)
    assert training_captions(default, prompt_list, many)[0] is prompt_list


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    pipe = load_pipeline(path)
    out = {f"{name}.{k}": v for name in ("transformer", "vae", "text_encoder", "text_encoder_2")
           for k, v in getattr(pipe, name).state_dict().items()}
    out["vae.scaling_factor"] = torch.tensor(pipe.vae.config.scaling_factor, dtype=torch.float64)
    out["vae.shift_factor"] = torch.tensor(pipe.vae.config.shift_factor, dtype=torch.float64)
    return out


def test_pretraining_in_pieces_is_bit_identical(tmp_path, monkeypatch, capsys):
    cfg = load_base_config(TINY_BASE_CONFIG, GRAMMAR)
    monkeypatch.setenv("DGPO_CACHE", str(tmp_path / "straight"))
    straight = ensure_base(cfg, log=lambda *a: None)

    monkeypatch.setenv("DGPO_CACHE", str(tmp_path / "pieces"))
    work = partial_dir(cfg)
    # piece 1: the command line stops after the first flow step, with a checkpoint
    sets = [x for s in GRAMMAR for x in ("--set", s)]
    assert main(["pretrain", TINY_BASE_CONFIG, *sets, "--no-eval", "--max-minutes", "0"]) == 3
    assert "Run the same command again" in capsys.readouterr().out
    assert (work / "autoencoder" / "state.json").is_file()
    assert [p.name for p in list_checkpoints(work)] == ["step-1"]
    shutil.rmtree(work / "checkpoints")  # as if killed before the first checkpoint: stage 1 survives

    # piece 2: reuses stage 1, checkpoints at step 2 (periodic) and 3 (stopped)
    logs = []
    with pytest.raises(FlowPaused) as paused:
        ensure_base(cfg, log=logs.append, stop=lambda done: done >= 3)
    assert (paused.value.step, paused.value.total) == (3, 6)
    assert any("reusing stage 1" in line for line in logs), logs
    assert [p.name for p in list_checkpoints(work)] == ["step-2", "step-3"]

    # piece 3: continues at step 3 and finishes
    logs = []
    pieces = ensure_base(cfg, log=logs.append)
    assert any("resuming the flow stage at step 3 of 6" in line for line in logs), logs
    assert not work.exists() and (pieces / "model_index.json").is_file()
    summary = json.loads((pieces / "pretrain_summary.json").read_text())
    assert (summary["captions"], summary["fidelity"], summary["pool_captions"]) == ("grammar", 0.7, 576)

    a, b = _tensors(straight), _tensors(pieces)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]


CONCURRENT = """
import json, sys
from dgpo.cli import load_base_config
from dgpo.worlds.shapes_base.pretrain import ensure_base
cfg = load_base_config(sys.argv[2], json.loads(sys.argv[1]))
path = ensure_base(cfg, log=lambda message: print("LOG", message, flush=True))
print("PATH", path, flush=True)
"""


def test_concurrent_first_use_trains_once(tmp_path):
    env = {**os.environ, "DGPO_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(REPO)}
    overrides = json.dumps([*TINY_BASE, "seed=3", "threads=1"])  # one thread each: two processes share 2 cores
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT, overrides, TINY_BASE_CONFIG], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err[-2000:]
    paths = {line.split(" ", 1)[1] for out, _ in results for line in out.splitlines() if line.startswith("PATH ")}
    assert len(paths) == 1
    path = Path(paths.pop())
    trained = [out for out, _ in results if "pretraining it in" in out]
    assert len(trained) == 1, [out for out, _ in results]
    assert (path / "model_index.json").is_file() and (path / "pretrain_summary.json").is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, f"{path.name}.lock"])
    load_pipeline(path)  # a complete, loadable pipeline


def test_snapshot_of_an_unfinished_pretraining_is_the_base_it_would_save(tmp_path, monkeypatch, capsys):
    """`dgpo pretrain --snapshot DIR` rebuilds a pipeline from the work folder alone; at the last checkpoint
    it equals, bit for bit, the base the pretraining saves (so a mid-run snapshot is what that run has)."""
    from dgpo.worlds.shapes_base.pretrain import PartialBase, pretrain
    monkeypatch.setenv("DGPO_CACHE", str(tmp_path / "cache"))
    cfg = load_base_config(TINY_BASE_CONFIG, GRAMMAR)
    sets = [x for s in GRAMMAR for x in ("--set", s)]
    assert main(["pretrain", TINY_BASE_CONFIG, *sets, "--snapshot", str(tmp_path / "none")]) == 2  # nothing to snapshot yet
    assert "no unfinished pretraining" in capsys.readouterr().err and not (tmp_path / "none").exists()
    saved = pretrain(cfg, tmp_path / "saved", log=lambda *a: None, work=PartialBase(partial_dir(cfg)))
    assert saved["key"] and partial_dir(cfg).is_dir()  # pretrain() keeps its work folder; ensure_base removes it
    assert main(["pretrain", TINY_BASE_CONFIG, *sets, "--snapshot", str(tmp_path / "snap")]) == 0
    assert "flow step 6 of 6" in capsys.readouterr().out
    a, b = _tensors(tmp_path / "saved"), _tensors(tmp_path / "snap")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    assert main(["pretrain", TINY_BASE_CONFIG, *sets, "--snapshot", str(tmp_path / "snap")]) == 2  # taken: refused
    assert main(["pretrain", TINY_BASE_CONFIG, *sets, "--snapshot", str(tmp_path / "snap"), "--overwrite"]) == 0
