"""The GPU scripts stay runnable on every handle: their CPU smoke tests (a lent GPU runs them at full size)."""

import json
from pathlib import Path

import pytest

from conftest import load_script

pytestmark = pytest.mark.slow


@pytest.fixture
def gpu_speed_check(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "scripts"))  # it imports gpu_scale_check
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
