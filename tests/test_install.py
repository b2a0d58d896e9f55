"""pyproject.toml's requirements and constraints.txt's pins agree.

`make` installs ``.[all,dev]`` against constraints.txt (every version pinned, reproducible); a user runs
``pip install -e ".[all]"`` against pyproject.toml's bounds alone. A bound raised past a pin (or a pin
moved outside a bound) would make the first fail to resolve: caught here, in milliseconds, instead.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python 3.11+, which the Makefile and CI run


def _pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    pins = [line.split("==") for line in lines if line.strip() and not line.startswith("#")]
    return {canonicalize_name(name): version.strip() for name, version in pins}


def _requirements() -> dict[str, list[Requirement]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    groups = {"core": project["dependencies"], **project["optional-dependencies"]}
    return {group: [Requirement(line) for line in lines] for group, lines in groups.items()}


def test_every_pin_in_constraints_meets_pyproject():
    pins = _pins()
    assert "typing-extensions" in pins and "lightning" in pins, "constraints.txt lost its pins"
    missed = [
        f"[{group}] {requirement} but constraints.txt pins {pins[name]}"
        for group, requirements in _requirements().items()
        for requirement in requirements
        if (name := canonicalize_name(requirement.name)) in pins
        and not requirement.specifier.contains(pins[name], prereleases=True)
    ]
    assert not missed, missed


def test_extras_name_only_this_project_or_packages_the_pins_cover():
    """Every package an extra (but [tensorrt], NVIDIA only) names is pinned, so `make` installs what was tested."""
    pins = _pins()
    unpinned = [
        f"[{group}] {requirement.name}"
        for group, requirements in _requirements().items()
        if group != "tensorrt"
        for requirement in requirements
        if canonicalize_name(requirement.name) not in {*pins, "repblocks"}
    ]
    assert not unpinned, unpinned
