"""scripts/profile_epoch.py on the tiny base: an epoch's phases, their transformer evaluations, the limit, and
a report that is never written over without --overwrite."""

import json

import pytest

from conftest import load_script

# DGPO made small through bench_rl's override mechanism (--set after its shared settings): P·G = 2·3 samples,
# 2 rollout steps at CFG 1.5 (one call of 2·6 per step), M = 2 noise levels, one micro-batch of the 6.
SMALL = ["rollout.prompts_per_epoch=2", "rollout.group_size=3", "rollout.steps=2", "model.lora_rank=2",
         "model.lora_alpha=2", "objective.timesteps_per_sample=2"]


def test_profile_epoch_phases_nfe_limit_and_refusal(tiny_base, tmp_path, capsys):
    """One DGPO epoch profiled. Its phases sum to most of the epoch and no more (the trainer rounds each to the
    millisecond: 1.5 ms of slack); the NFE of each phase is the trainer's, the census's and DGPO's formula, from
    the calls the phases make (a rollout call of 2·6 per step, a policy forward + backward and a reference forward
    with the LoRA off per level); the limit is positive and below the actual time, phase by phase and for the
    epoch. The limit is timed apart from the epoch, so noise could put it above a phase whose time is all
    transformer; here each phase's share above it is structural, not noise: the rollout's holds the VAE decode and
    the sampler's steps, the update's the loss, the optimiser step and the EMA. Measured (6 runs, 1 thread, a
    2-core machine at load 2.5): rollout 0.64-0.66, update 0.34-0.38, epoch 0.51-0.53."""
    from dgpo.trainer import load_train_config, nfe_per_epoch
    profile = load_script("scripts/profile_epoch.py")
    out = tmp_path / "report"
    argv = ["--methods", "dgpo", "--epochs", "1", "--warmup", "1", "--repeats", "3", "--base", str(tiny_base),
            "--out-dir", str(out), *(x for s in SMALL for x in ("--set", s))]
    assert profile.main(argv) == 0
    report = json.loads((out / "profile_epoch.json").read_text())
    assert report["written_by"] == "profile_epoch" and report["machine"]["torch_threads"] == 1
    dgpo = report["methods"]["dgpo"]
    (epoch,) = dgpo["epochs"]

    phases = epoch["rollout_s"] + epoch["reward_s"] + epoch["update_s"]
    assert 0.5 * epoch["epoch_s"] < phases <= epoch["epoch_s"] + 0.0015
    assert epoch["other_s"] == pytest.approx(epoch["epoch_s"] - phases)

    cfg = load_train_config(profile.REPO / "configs/dgpo/shapes.yaml", dgpo["settings"]["overrides"])
    rollout_nfe = 6 * 2 * 2                                     # samples × steps × CFG's two branches
    assert epoch["nfe"] == nfe_per_epoch(cfg) == rollout_nfe + 6 * 2 * 2   # + samples × M × (policy + reference)
    assert epoch["rollout_nfe"] == epoch["census_rollout_nfe"] == rollout_nfe
    assert epoch["update_nfe"] == epoch["census_update_nfe"] == epoch["nfe"] - rollout_nfe
    assert epoch["census_other_nfe"] == 0
    kinds = {(k["phase"], k["describe"]): k["calls_per_epoch"] for k in dgpo["call_kinds"]}
    assert kinds == {("rollout", "fwd×12"): 2, ("update", "fwd+bwd×6"): 2, ("update", "fwd×6 (LoRA off)"): 2}

    for phase in ("rollout", "update"):
        assert epoch[f"{phase}_limit_s"] > 0
    assert epoch["reward_limit_s"] == 0 and dgpo["mean"]["share_above"]["reward"] == 1.0
    assert epoch["limit_s"] == pytest.approx(epoch["rollout_limit_s"] + epoch["update_limit_s"])
    # The share above the limit is its formula of the measured seconds. Whether it is positive is the measurement,
    # not a property: on a tiny model on a loaded machine the calls timed alone can come out slower than in the
    # epoch (the update's share was −0.46 in one run), so only the formula is asserted.
    share, mean = dgpo["mean"]["share_above"], dgpo["mean"]
    for key in ("rollout", "update"):
        assert share[key] == pytest.approx(1 - mean[f"{key}_limit_s"] / mean[f"{key}_s"]) and share[key] < 1
    assert share["epoch"] == pytest.approx(1 - mean["limit_s"] / mean["epoch_s"]) and share["epoch"] < 1
    table = (out / "profile_epoch.md").read_text()
    assert "| dgpo (DGPO) |" in table and "1 thread(s)" in table and (out / "profile_epoch.png").stat().st_size > 0

    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert profile.main(argv) == 2                              # no --overwrite: refused before any work
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already exists" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
