"""The GPU scripts stay runnable on every handle: their CPU smoke tests (a lent GPU runs them at full size)."""

import json
import math

import pytest

from conftest import load_script

pytestmark = pytest.mark.slow


@pytest.fixture
def gpu_speed_check():
    return load_script("scripts/gpu_speed_check.py")


@pytest.mark.parametrize("family, extra", [
    ("flux", ["--width", "64"]),
    ("sd3", ["--text-layers", "1", "--skip-sampling", "--methods", "dgpo,flow_grpo"]),
])
def test_one_dgpo_and_one_flow_grpo_epoch_per_family(family, extra, gpu_speed_check, tmp_path):
    argv = ["--out", str(tmp_path), "--family", family, "--layers", "1", "--resolution", "64", "--epochs", "1",
            "--rollout-steps", "2", "--group-size", "2", "--dtype", "fp32", *extra]
    assert gpu_speed_check.main(argv) == 0
    report = json.loads((tmp_path / "gpu_speed_check.json").read_text())
    methods = report["rl"]["methods"]
    assert sorted(methods) == ["dgpo", "flow_grpo"]
    for m in methods.values():
        assert m["reported"]["finite"] and m["reported"]["epoch_s"] > 0 and m["reported"]["nfe_update"] > 0
    assert report["transformer_params"] > 0


def test_the_scale_checks_dgpo_epochs_are_the_recipes(tmp_path):
    """gpu_scale_check runs its epochs through the DGPO recipe (``Trainer`` on the in-memory model): the loss is
    log 2 at θ = ref, the update makes policy and reference passes, the policy moves; every measurement is there."""
    argv = ["--out", str(tmp_path), "--layers", "1", "--resolution", "64", "--text-layers", "1", "--dtype", "fp32",
            "--rollout-steps", "2", "--group-size", "2", "--epochs", "2", "--lora-rank", "4"]
    assert load_script("scripts/gpu_scale_check.py").main(argv) == 0
    report = json.loads((tmp_path / "gpu_scale_check.json").read_text())
    assert report["checks"] == {"loss_is_log2_at_init": True, "grad_finite_nonzero": True,
                                "policy_moves_from_reference": True}
    assert report["transformer_params"] > 0 and report["lora_params"] > 0
    assert report["config"]["objective"]["name"] == "dgpo" and report["config"]["rollout"]["guidance_scale"] == 4.5
    for row in report["epochs"]:
        assert row["image_shape"] == [4, 64, 64, 3]
        assert all(row[k] > 0 for k in ("rollout_s", "decode_s", "update_s", "epoch_s"))
        assert row["nfe_rollout"] == 4 * 2 * 2 and row["nfe_update"] == 4 * 2  # CFG rollouts; policy + reference
    assert math.isclose(report["epochs"][0]["loss"], math.log(2), abs_tol=1e-5)
    assert [p.name for p in tmp_path.iterdir()] == ["gpu_scale_check.json"]  # the trainer wrote nothing
