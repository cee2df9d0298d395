"""The repository's promises to a new user: CI runs the README's test command."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_ci_runs_the_readme_test_command():
    commands = readme_commands()
    tests = [c for c in commands if "pytest" in c]
    assert len(tests) == 1, commands
    assert tests[0] in (ROOT / ".ci" / "run").read_text()


def test_readme_main_command_runs_the_demo():
    assert any(c.endswith("&& dgpo train") for c in readme_commands())


def test_dgpo_never_imports_tdm_r1():
    for path in (ROOT / "dgpo").rglob("*.py"):
        assert "tdm_r1" not in path.read_text(), path
