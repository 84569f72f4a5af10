"""Project rules that CI guards: the README's two set-up commands, and .ci/run calling the test one."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setup_block() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Set up and run", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [ln.split("#")[0].strip() for ln in block.splitlines() if ln.split("#")[0].strip()]


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    commands = _setup_block()
    assert commands == ["make demo", "make test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci


def test_makefile_installs_the_cpu_torch_wheel_and_the_package():
    makefile = (ROOT / "Makefile").read_text()
    assert "torch==2.13.0" in makefile and "-e '.[dev,serve,ray]'" in makefile
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'"torch>=2\.4,<3"', pyproject), "torch stays a range for users"
