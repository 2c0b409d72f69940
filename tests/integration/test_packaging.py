"""The wheel carries everything an installed convsync needs: both packages, the migrations and
the cookbook as package data. Installed into a fresh venv, ``convsync migrate`` run from an
empty directory with DATABASE_URL alone applies every migration."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import asyncpg
import pytest

from tests.harness import REPO
from worker.migrate import load_migrations

SOURCES = ("pyproject.toml", "README.md", "worker", "convsync_tools", "migrations", "cookbook")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of the source tree (the checkout gets no build/ folder)."""
    tree = tmp_path_factory.mktemp("tree")
    for name in SOURCES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, tree / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, tree / name)
    out = tmp_path_factory.mktemp("wheel")
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*pip_wheel, "--wheel-dir", out, tree], check=True, capture_output=True)
    [built] = out.glob("convsync-*.whl")
    return built


def test_the_wheel_holds_both_packages_and_the_data(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in ("worker", "convsync_tools"):
        modules = {p.relative_to(REPO).as_posix() for p in (REPO / package).rglob("*.py")}
        assert modules <= names, sorted(modules - names)
    for folder, packaged in (("migrations", "worker/migrations"),
                             ("cookbook", "convsync_tools/cookbook")):  # fmt: skip
        files = {f"{packaged}/{p.name}" for p in (REPO / folder).glob("*.sql")}
        assert files, folder
        assert files == {n for n in names if n.startswith(packaged + "/")}
    assert not [n for n in names if n.startswith(("tests/", "bench/", "spec/"))]


async def test_an_installed_convsync_migrates_from_anywhere_with_only_database_url(
    wheel: Path, empty_db_url: str, tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    # The wheel alone into the fresh venv; its dependencies are seen from ours (a .pth line
    # adds our site-packages after the venv's own, and runs none of our .pth files).
    site = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip_install = [
        sys.executable,
        "-m",
        "pip",
        "--python",
        str(python),
        "install",
        "-q",
        "--no-deps",
    ]
    subprocess.run([*pip_install, "--no-index", wheel], check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"PATH": os.environ["PATH"], "DATABASE_URL": empty_db_url}
    result = subprocess.run(
        [venv / "bin" / "convsync", "migrate"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    where = subprocess.run(
        [python, "-c", "import worker; print(worker.__file__)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(where).is_relative_to(site), f"worker imported from {where}, not the install"
    conn = await asyncpg.connect(empty_db_url)
    try:
        applied = [r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")]
    finally:
        await conn.close()
    assert sorted(applied) == [m.name for m in load_migrations()]
