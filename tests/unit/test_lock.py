"""The locks the image is built from (and `pip install` uses): every runtime dependency of
pyproject.toml pinned to a version it allows, with hashes, and nothing else; the builder's
tools satisfy [build-system]; the dev tools (./dev setup) pinned within their bounds, on the
same runtime versions. Regenerate with ci/lock.sh."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.harness import REPO

LOCK = REPO / "requirements.lock"
BUILD_LOCK = REPO / "requirements-build.lock"
DEV_LOCK = REPO / "requirements-dev.lock"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
# The image's interpreter: CPython 3.11 on Linux.
TARGET: dict[str, str] = {
    **{k: str(v) for k, v in default_environment().items()},
    "python_version": "3.11",
    "sys_platform": "linux",
}
# name==version, an environment marker maybe (uvloop: not on Windows), then its hashes.
PIN = re.compile(
    r"^([A-Za-z0-9._-]+)==([^\s;]+)(?:\s*;[^-]+)?((?:\s+--hash=sha256:[0-9a-f]{64})+)$"
)


def pins(path: Path) -> dict[str, str]:
    """name -> version of a pip-compile lock; fails on an entry not pinned with hashes."""
    logical, pending = [], ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        if pending + line:
            logical.append((pending + line).strip())
        pending = ""
    found: dict[str, str] = {}
    for entry in logical:
        match = PIN.match(entry)
        assert match, f"{path.name}: not pinned with hashes: {entry[:80]}"
        found[canonicalize_name(match[1])] = match[2]
    return found


def applies(requirement: Requirement, extras: tuple[str, ...] = ("",)) -> bool:
    marker = requirement.marker
    return marker is None or any(marker.evaluate({**TARGET, "extra": e}) for e in extras)


def runtime_requirements() -> list[Requirement]:
    return [r for r in map(Requirement, PYPROJECT["project"]["dependencies"]) if applies(r)]


def closure(requirements: list[Requirement]) -> set[str]:
    """Names of ``requirements`` and of everything they need, from the installed metadata."""
    seen: set[str] = set()
    todo = [(r, tuple(r.extras) or ("",)) for r in requirements]
    while todo:
        requirement, extras = todo.pop()
        name = canonicalize_name(requirement.name)
        if name in seen:
            continue
        seen.add(name)
        for text in importlib.metadata.requires(requirement.name) or []:
            needed = Requirement(text)
            if applies(needed, extras):
                todo.append((needed, tuple(needed.extras) or ("",)))
    return seen


def test_every_runtime_dependency_is_pinned_to_a_version_pyproject_allows() -> None:
    locked = pins(LOCK)
    for requirement in runtime_requirements():
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{name} is not in requirements.lock: run ci/lock.sh"
        assert requirement.specifier.contains(locked[name], prereleases=True), (
            f"requirements.lock pins {name}=={locked[name]}, pyproject wants {requirement}"
        )


def test_the_lock_holds_the_runtime_closure_and_nothing_else() -> None:
    try:
        needed = closure(runtime_requirements())
    except importlib.metadata.PackageNotFoundError as error:
        pytest.skip(f"not installed here, so its dependencies are unknown: {error}")
    assert set(pins(LOCK)) == needed, "requirements.lock drifted: run ci/lock.sh"


def test_the_builders_tools_are_locked_and_satisfy_the_build_system() -> None:
    locked = pins(BUILD_LOCK)
    assert {"pip", "setuptools", "wheel"} <= set(locked)
    for text in PYPROJECT["build-system"]["requires"]:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert requirement.specifier.contains(locked[name], prereleases=True), text
    assert not set(locked) & set(pins(LOCK)) - {"packaging"}, "build tools stay out of the image"


def test_the_image_and_the_readme_install_from_the_lock() -> None:
    dockerfile = (REPO / "Dockerfile").read_text(encoding="utf-8")
    assert "--require-hashes -r requirements-build.lock" in dockerfile
    assert re.search(r"--require-hashes\s+(?:\\\s+)?(?:--\S+\s+)*-r requirements\.lock", dockerfile)
    assert "--no-deps" in dockerfile
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "pip install --require-hashes -r requirements.lock" in readme


def test_the_dev_tools_are_bounded_and_locked_on_the_runtime_versions() -> None:
    locked = pins(DEV_LOCK)
    extras = PYPROJECT["project"]["optional-dependencies"]
    for text in extras["dev"] + extras["embedded"]:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{name} is not in requirements-dev.lock: run ci/lock.sh"
        assert requirement.specifier.contains(locked[name], prereleases=True), (
            f"requirements-dev.lock pins {name}=={locked[name]}, pyproject wants {requirement}"
        )
        assert any(s.operator in ("<", "<=", "==", "~=") for s in requirement.specifier), (
            f"{text}: give the dev tool an upper bound"
        )
    runtime = pins(LOCK)
    drifted = {n: (v, runtime[n]) for n, v in locked.items() if n in runtime and runtime[n] != v}
    assert not drifted, f"the dev lock moved runtime pins (dev, runtime): {drifted}"
    assert set(runtime) <= set(locked), "the dev lock lacks runtime packages: run ci/lock.sh"


def test_dev_setup_installs_from_the_locks_only() -> None:
    dev = (REPO / "dev").read_text(encoding="utf-8")
    installs = [line.strip() for line in dev.splitlines() if "pip install" in line]
    setup = [line for line in installs if "bench" not in line]
    for lock in ("requirements.lock", "requirements-dev.lock", "requirements-build.lock"):
        assert any(f"--require-hashes -r {lock}" in line for line in setup), lock
    assert all("--require-hashes" in line or "--no-deps" in line for line in setup), setup
