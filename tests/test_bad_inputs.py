"""Every bad input of scripts/diagnostics/bad_inputs.py — run through the real command line in an empty folder
with an empty cache — ends with one line, exit status 2, and nothing written (docs/bad-input.md)."""

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "diagnostics" / "bad_inputs.py"
spec = importlib.util.spec_from_file_location("bad_inputs", SCRIPT)
bad_inputs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bad_inputs)


@pytest.mark.parametrize("case", bad_inputs.CASES, ids=[c[0] for c in bad_inputs.CASES])
def test_bad_input_is_one_line_status_2_and_touches_nothing(case):
    row = bad_inputs.run_case(*case)
    assert row["status"] == 2 and row["lines"] == 1 and row["left_alone"], row
