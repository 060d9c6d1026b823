"""`kubectl mlrollouts --help` starts without the heavy libraries: they load in the commands that use them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("scipy", "matplotlib", "kubernetes", "urllib3", "jsonschema", "pydantic", "numpy")

PROBE = """
import json, sys
from click.testing import CliRunner
from model_rollouts.cli import cli
result = CliRunner().invoke(cli, sys.argv[1:])
modules = sorted({m.split(".")[0] for m in sys.modules})
print(json.dumps({"exit": result.exit_code, "output": result.output, "modules": modules}))
"""


def run(*args: str) -> tuple[int, str, list[str]]:
    """The command in a fresh interpreter: exit code, output, and the heavy libraries it loaded."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120, check=True
    )
    r = json.loads(out.stdout.splitlines()[-1])
    return r["exit"], r["output"], [m for m in HEAVY if m in r["modules"]]


@pytest.mark.parametrize("args", [["--help"], ["get", "--help"], ["report", "--help"], ["lint", "--help"]])
def test_help_loads_no_heavy_library(args: list[str]) -> None:
    code, output, loaded = run(*args)
    assert code == 0 and "Usage:" in output
    assert loaded == []


def test_every_command_is_still_listed() -> None:
    _, out, _ = run("--help")
    for command in (
        "list",
        "get",
        "status",
        "promote",
        "abort",
        "retry",
        "pause",
        "resume",
        "lint",
        "report",
    ):
        assert f"  {command} " in out, command


def test_a_command_loads_what_it_needs() -> None:
    # lint checks with the API models and jsonschema, imported when it runs
    code, output, loaded = run("lint", "-f", "-")  # empty stdin: no objects, no errors
    assert code == 0, output
    assert {"pydantic", "jsonschema"} <= set(loaded)
