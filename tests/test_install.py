"""The README's one install command installs what the README then tells people to run."""

from __future__ import annotations

import re

import pytest
from conftest import REPO


def test_the_readme_install_command_covers_the_tools_the_readme_runs():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    readme = (REPO / "README.md").read_text()
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    (install,) = re.findall(r'^pip install -e "\.\[(\w+)\]"$', readme, re.M)  # the one command
    installed = {re.split(r"[<>=\[ ]", r, maxsplit=1)[0].lower() for r in extras[install]}
    # the notebooks' commands (papermill notebooks/NB.ipynb ...) and the tests' tools
    assert {"papermill", "pytest", "ruff"} <= installed, installed
    runs = set(re.findall(r"^\s*(?:\S+=\S+ )?(papermill|pytest|ruff) ", readme, re.M))
    assert runs and runs <= installed
    # every extra the notebooks need comes with it
    notebooks = {re.split(r"[<>=\[ ]", r, maxsplit=1)[0].lower() for r in extras["notebooks"]}
    assert notebooks <= installed
