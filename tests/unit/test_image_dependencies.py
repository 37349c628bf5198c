"""Each image installs only its own dependency groups (deploy/Dockerfile's KILN_GROUPS, as docker-compose.yml builds
them): every module its processes import must come from those groups' packages, or the container dies as it starts.
The development environment holds every group, so nothing else notices a package missing from one.

Each image's modules are imported in a fresh interpreter that refuses every package outside the image's groups, by
uv.lock's dependency graph."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Per image (docker-compose.yml): its groups, the packages whose every module its processes may import, and the
# operator commands it must run (`docker compose run --rm <service> kiln ...`).
IMAGES = {
    "api": (["api"], ["services.api"], ["migrate", "secrets"]),
    "trainer": (["trainer", "ops"], ["services.trainer", "services.sync"], ["secrets", "backup", "restore"]),
    "predictor": (["predictor"], ["services.predictor"], []),
}

# Run in the fresh interpreter: refuse the refused packages' modules, then import everything the image runs.
IMPORT_AS_THE_IMAGE = """
import importlib, importlib.abc, json, pkgutil, sys

refused, packages, commands = json.loads(sys.argv[1])

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in refused:
            raise ModuleNotFoundError(f"No module named {name!r} (not in this image's groups)", name=name)
        return None

sys.meta_path.insert(0, Refuse())
for package in packages:
    module = importlib.import_module(package)
    if hasattr(module, "__path__"):
        for found in pkgutil.walk_packages(module.__path__, package + "."):
            if not found.name.endswith(".__main__"):
                importlib.import_module(found.name)
for command in commands:
    import deploy.local.cli
    try:
        deploy.local.cli.main([command, "--help"])
    except SystemExit as done:
        assert done.code == 0, (command, done.code)
"""


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_every_module_an_image_runs_imports_with_its_own_groups_alone(image: str) -> None:
    groups, packages, commands = IMAGES[image]
    refused = sorted(_modules_of(_all_distributions() - _installed_with(groups)) - _first_party_modules())
    argument = json.dumps([refused, packages, commands])

    ran = subprocess.run(
        [sys.executable, "-c", IMPORT_AS_THE_IMAGE, argument], cwd=ROOT, capture_output=True, text=True, check=False
    )

    assert ran.returncode == 0, f"the {image} image ({', '.join(groups)}) cannot run:\n{ran.stderr[-3000:]}"


def _lock() -> dict[str, dict[str, Any]]:
    packages = tomllib.loads((ROOT / "uv.lock").read_text())["package"]
    return {_normal(package["name"]): package for package in packages}


def _installed_with(groups: list[str]) -> set[str]:
    """The distributions `uv sync --no-default-groups --group ...` installs: the project's dependencies and the
    groups', with their extras, and all they need, whatever their markers (so never stricter than the image)."""
    lock = _lock()
    project = lock["kiln"]
    wanted = [*project["dependencies"], *(need for group in groups for need in project["dev-dependencies"][group])]
    names: set[str] = set()
    extras: set[tuple[str, str]] = set()
    while wanted:
        requirement = wanted.pop()
        name = _normal(requirement["name"])
        package = lock[name]
        new_extras = {(name, extra) for extra in requirement.get("extra", [])} - extras
        if name not in names:
            names.add(name)
            wanted += package.get("dependencies", [])
        extras |= new_extras
        for _, extra in new_extras:
            wanted += package.get("optional-dependencies", {}).get(extra, [])
    return names


def _all_distributions() -> set[str]:
    return set(_lock())


def _modules_of(distributions: set[str]) -> set[str]:
    """The top-level modules these distributions put in the environment, by the environment's own records."""
    return {
        module
        for module, owners in packages_distributions().items()
        if owners and all(_normal(owner) in distributions for owner in owners)
    }


def _first_party_modules() -> set[str]:
    return {"shared", "services", "deploy", "tests", "bench"}


def _normal(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")
