"""The project's frame: the README's two commands, what CI runs, where plugins come from.

These read the files a fresh clone has; running ``./dev.sh`` itself would build a second
virtual environment inside the test suite, so the test checks what it would do instead.
"""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

from kernel.plugins import ENTRY_POINT_GROUP

ROOT = Path(__file__).resolve().parents[2]
BUILT_INS = {"health"}


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    first_block = re.search(r"```\w*\n(.*?)```", text, re.DOTALL)
    assert first_block, "the README opens with a code block"
    # Nothing but the title comes before it.
    assert text[: first_block.start()].strip().startswith("# ")
    assert text[: first_block.start()].strip().count("\n") == 0
    return [line.split("#", 1)[0].strip() for line in first_block.group(1).splitlines()]


def test_readme_opens_with_the_run_and_test_commands() -> None:
    assert _readme_commands() == ["./dev.sh run", "./dev.sh test"]


def test_both_commands_make_their_own_venv_and_test_covers_the_template() -> None:
    script = (ROOT / "dev.sh").read_text(encoding="utf-8")
    run = script.split("run)", 1)[1].split(";;", 1)[0]
    test = script.split("test)", 1)[1].split(";;", 1)[0]
    assert "python3 -m venv" in script.split("ensure_env()", 1)[1]
    for body in (run, test):
        assert body.strip().startswith("ensure_env")
    assert 'anima-gateway" run' in run
    assert re.search(r"pytest tests plugin-template/tests\b", test)


def test_ci_runs_exactly_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    commands = [
        line.strip()
        for line in ci.splitlines()
        if line.strip() and not line.lstrip().startswith(("#", "set ", "cd "))
    ]
    test_command = _readme_commands()[1]
    assert commands in (["exec " + test_command], [test_command])


def test_built_in_plugins_are_registered_through_the_entry_point_group() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    declared = pyproject["project"]["entry-points"][ENTRY_POINT_GROUP]
    assert set(declared) >= BUILT_INS
    assert all(value.startswith("plugins.") for value in declared.values())
    assert pyproject["project"]["scripts"]["anima-gateway"] == "kernel.cli:main"
    # And the installed project agrees with the file.
    installed = {e.name: e.value for e in metadata.entry_points(group=ENTRY_POINT_GROUP)}
    assert {k: v for k, v in installed.items() if k in declared} == declared


def test_the_template_is_a_project_of_its_own_with_an_entry_point() -> None:
    template = tomllib.loads((ROOT / "plugin-template" / "pyproject.toml").read_text())
    assert template["project"]["name"] != "anima-gateway"
    assert set(template["project"]["entry-points"][ENTRY_POINT_GROUP]) == {"example"}
    assert list((ROOT / "plugin-template" / "tests").glob("test_*.py"))
