"""Packaging: the wheel builds with no deprecation warning, says its licence as an SPDX expression,
ships the LICENSE, takes its version from ``model_rollouts.__version__``, and keeps the plugin's
libraries out of the operator's dependencies."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

from model_rollouts import __version__

REPO = Path(__file__).resolve().parents[2]
PLUGIN_ONLY = ("rich", "jsonschema", "cel-python")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """``pip wheel --no-deps .`` as a user runs it (an isolated build with the declared setuptools)."""
    out = tmp_path_factory.mktemp("wheel")
    # A copy of what the sdist holds, so the build leaves no build/ or egg-info in the checkout.
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(
        REPO / "operator", src / "operator", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-v",
            "--no-deps",
            "--no-cache-dir",
            "-w",
            str(out),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    log = proc.stdout + proc.stderr
    if proc.returncode != 0 and re.search(
        r"(Could not find a version|No matching distribution|connection)", log, re.I
    ):
        print(f"\nSKIP: the build backend cannot be installed here: {log[-400:]}")
        pytest.skip("setuptools cannot be downloaded for the isolated build (no package index)")
    assert proc.returncode == 0, log[-3000:]
    wheels = list(out.glob("model_rollouts-*.whl"))
    assert len(wheels) == 1, wheels
    return log, wheels[0]


def test_the_build_has_no_deprecation_warning(built: tuple[str, Path]) -> None:
    log, _ = built
    # setuptools says e.g. "BuildBackendWarning: `project.license` as a TOML table is deprecated" or
    # "SetuptoolsDeprecationWarning: ...", framed by "!!" lines; pip says "DEPRECATION: ...".
    found = [line for line in log.splitlines() if re.search(r"(?i)deprecat|\w+Warning: |^\s*!!\s*$", line)]
    assert found == []


def test_the_wheel_metadata(built: tuple[str, Path]) -> None:
    _, wheel = built
    with zipfile.ZipFile(wheel) as z:
        meta_name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(z.read(meta_name).decode())
        licences = [n for n in z.namelist() if n.endswith("/licenses/LICENSE")]
        assert licences and "Apache License" in z.read(licences[0]).decode()[:200]
    assert meta["Version"] == __version__
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta.get_all("License-File") == ["LICENSE"]
    assert not [c for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]
    assert {u.split(",")[0] for u in meta.get_all("Project-URL") or []} >= {"Homepage", "Source", "Changelog"}
    assert "plugin" in (meta.get_all("Provides-Extra") or [])
    requires = meta.get_all("Requires-Dist") or []
    for name in PLUGIN_ONLY:  # the operator (and its image) does not need the plugin's libraries
        lines = [r for r in requires if re.match(rf"{name}\b", r)]
        assert lines and all('extra == "plugin"' in r for r in lines), (name, lines)
    scripts = z_entry_points(wheel)
    assert {"model-rollouts", "kubectl-mlrollouts", "kubectl_complete-mlrollouts"} <= set(scripts)


def z_entry_points(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt"))
        text = z.read(name).decode()
    return [line.split("=")[0].strip() for line in text.splitlines() if "=" in line]


def test_the_build_requirement_is_bounded_and_supports_spdx() -> None:
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    (req,) = project["build-system"]["requires"]
    assert re.fullmatch(r"setuptools>=(7[7-9]|[89]\d)[\d.]*,<\d+", req), req
    assert project["project"]["license"] == "Apache-2.0"
    assert (REPO / "CHANGELOG.md").read_text().count(f"## [{__version__}]") == 1


@pytest.mark.parametrize("command", [["model-rollouts", "--version"], ["kubectl-mlrollouts", "version"]])
def test_both_commands_show_the_package_version(command: list[str]) -> None:
    exe = Path(sys.executable).parent / command[0]
    out = subprocess.run([str(exe), *command[1:]], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == f"{command[0]} {__version__}"
