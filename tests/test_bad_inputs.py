"""Every bad input of scripts/diagnostics/bad_inputs.py — run through the real command line in an empty folder
with an empty cache — ends with one line, exit status 2, and nothing written (docs/bad-input.md)."""

import pytest
from conftest import load_script

pytestmark = pytest.mark.slow

bad_inputs = load_script("scripts/diagnostics/bad_inputs.py")


@pytest.mark.parametrize("case", bad_inputs.CASES, ids=[c[0] for c in bad_inputs.CASES])
def test_bad_input_is_one_line_status_2_and_touches_nothing(case):
    row = bad_inputs.run_case(*case)
    assert row["status"] == 2 and row["lines"] == 1 and row["left_alone"], row
    assert len(row["message"]) <= bad_inputs.MAX_MESSAGE, row
