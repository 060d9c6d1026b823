"""Argo CD health checks and actions for ModelRollout and ModelExperiment, under gopher-lua and Lua 5.1.

The cases are Argo CD's own files (health_test.yaml, actions/action_test.yaml) with fixtures in
testdata/ captured from real objects on the local stack (tests/install/capture_argocd_testdata.py).
Each runs twice: in gopher-lua v1.1.2 with only the libraries Argo CD opens (hack/argocd-lua, built
by `make tools`; the interpreter Argo CD embeds) and in lupa's C Lua 5.1 with the same sandbox.
"""

from __future__ import annotations

import copy
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.install.argocd_lua import gopher_binary, kinds, load, run_gopher, run_script
from tests.install.tools import missing

Runner = Callable[[Path, dict[str, Any]], Any]


@pytest.fixture(params=["gopher-lua", "lua51"])
def run(request: pytest.FixtureRequest) -> Runner:
    """The interpreter: gopher-lua as Argo CD embeds it, and C Lua 5.1 through lupa."""
    if request.param == "gopher-lua":
        if gopher_binary() is None:
            missing("hack/argocd-lua (gopher-lua v1.1.2) is not built: run `make tools`")
        return run_gopher
    pytest.importorskip("lupa.lua51", reason="lupa (PyPI) with its Lua 5.1 is needed: `make venv`")
    return run_script


KIND_DIRS = kinds()
HEALTH_CASES = [
    pytest.param(d, case, id=f"{d.name}:{case['inputPath']}")
    for d in KIND_DIRS
    for case in load(d / "health_test.yaml")["tests"]
]
DISCOVERY_CASES = [
    pytest.param(d, case, id=f"{d.name}:{case['inputPath']}")
    for d in KIND_DIRS
    for case in load(d / "actions" / "action_test.yaml").get("discoveryTests", [])
]
ACTION_CASES = [
    pytest.param(d, case, id=f"{d.name}:{case['action']}:{case['inputPath']}")
    for d in KIND_DIRS
    for case in load(d / "actions" / "action_test.yaml").get("actionTests", [])
]


def test_both_kinds_are_customized() -> None:
    assert sorted(d.name for d in KIND_DIRS) == ["ModelExperiment", "ModelRollout"]
    assert all(d.parent.name == "mlrollouts.io" for d in KIND_DIRS)


@pytest.mark.parametrize(("kind_dir", "case"), HEALTH_CASES)
def test_health(kind_dir: Path, case: dict[str, Any], run: Runner) -> None:
    obj = load(kind_dir / case["inputPath"])
    got = run(kind_dir / "health.lua", obj)
    assert got == case["healthStatus"]


@pytest.mark.parametrize(("kind_dir", "case"), DISCOVERY_CASES)
def test_action_discovery(kind_dir: Path, case: dict[str, Any], run: Runner) -> None:
    obj = load(kind_dir / "actions" / case["inputPath"])
    got = run(kind_dir / "actions" / "discovery.lua", obj)
    assert {(k, bool(v.get("disabled", False))) for k, v in got.items()} == {
        (r["name"], bool(r.get("disabled", False))) for r in case["result"]
    }


@pytest.mark.parametrize(("kind_dir", "case"), ACTION_CASES)
def test_action(kind_dir: Path, case: dict[str, Any], run: Runner) -> None:
    obj = load(kind_dir / "actions" / case["inputPath"])
    got = run(kind_dir / "actions" / case["action"] / "action.lua", copy.deepcopy(obj))
    assert got == load(kind_dir / "actions" / case["expectedOutputPath"])
    # Actions only ask, through an annotation: spec (Git's) and status (the operator's) are untouched.
    assert got["spec"] == obj["spec"] and got.get("status") == obj.get("status")
    assert {k: v for k, v in got["metadata"].items() if k != "annotations"} == {
        k: v for k, v in obj["metadata"].items() if k != "annotations"
    }
    assert got["metadata"]["annotations"][f"mlrollouts.io/{case['action']}"] == "2026-01-01T00:00:00Z"


def test_every_action_has_a_script_and_a_test(run: Runner) -> None:
    for d in KIND_DIRS:
        scripts = {p.parent.name for p in (d / "actions").glob("*/action.lua")}
        tested = {c["action"] for c in load(d / "actions" / "action_test.yaml").get("actionTests", [])}
        offered = set(run(d / "actions" / "discovery.lua", {"metadata": {"name": "x"}}))
        assert scripts == tested == offered, d.name


def _phases(kind: str) -> list[str]:
    if kind == "ModelRollout":
        from model_rollouts.api.rollout import ModelRolloutStatus as Status
    else:
        from model_rollouts.api.experiment import ModelExperimentStatus as Status  # type: ignore[assignment]
    return list(typing.get_args(Status.model_fields["phase"].annotation))


EXPECTED = {
    "Pending": "Progressing",
    "Progressing": "Progressing",
    "Running": "Progressing",
    "Paused": "Suspended",
    "Baking": "Progressing",  # a rollout's bake or holdout after reaching 100%: it can still roll back
    "Promoted": "Healthy",
    "Concluded": "Healthy",
    "Idle": "Healthy",
    "RolledBack": "Degraded",
    "Aborted": "Degraded",
    "Invalid": "Degraded",
}


@pytest.mark.parametrize("kind_dir", KIND_DIRS, ids=lambda d: d.name)
def test_every_phase_of_the_api_has_its_health(kind_dir: Path, run: Runner) -> None:
    """Each phase the API can write maps to the health the issue promises (a new phase fails here)."""
    for phase in _phases(kind_dir.name):
        assert phase in EXPECTED, f"{kind_dir.name} phase {phase}: decide its Argo CD health"
        obj = {
            "metadata": {"name": "x", "generation": 2},
            "spec": {},
            "status": {"phase": phase, "observedGeneration": 2, "message": "m"},
        }
        assert run(kind_dir / "health.lua", obj)["status"] == EXPECTED[phase], phase


@pytest.mark.parametrize("kind_dir", KIND_DIRS, ids=lambda d: d.name)
def test_unobserved_generation_is_progressing(kind_dir: Path, run: Runner) -> None:
    obj = {
        "metadata": {"name": "x", "generation": 3},
        "spec": {},
        "status": {
            "phase": "Promoted" if kind_dir.name == "ModelRollout" else "Concluded",
            "observedGeneration": 2,
        },
    }
    assert run(kind_dir / "health.lua", obj) == {
        "status": "Progressing",
        "message": "Waiting for the operator to observe generation 3",
    }


def test_gopher_lua_opens_only_argo_cds_libraries(tmp_path: Path) -> None:
    """hack/argocd-lua offers a script what Argo CD offers one from argocd-cm, no more."""
    if gopher_binary() is None:
        missing("hack/argocd-lua (gopher-lua v1.1.2) is not built: run `make tools`")
    probe = tmp_path / "probe.lua"
    probe.write_text(
        'local clock = require("os")\n'
        "return {absent = os == nil and string == nil and math == nil and io == nil and debug == nil"
        " and coroutine == nil, date = clock.date('!%Y-%m-%dT%XZ'), time = clock.time(),"
        " insert = type(table.insert), version = _VERSION}\n"
    )
    assert run_gopher(probe, {}) == {
        "absent": True,
        "date": "2026-01-01T00:00:00Z",
        "time": 1767225600,
        "insert": "function",
        "version": "Lua 5.1",
    }
    # The string library's methods are not there either: a script using one fails as in Argo CD.
    probe.write_text('return {x = ("abc"):upper()}\n')
    with pytest.raises(RuntimeError):
        run_gopher(probe, {})


def test_sandbox_is_argo_cds() -> None:
    """What Argo CD's gopher-lua VM does not offer a script from argocd-cm is not there here either."""
    pytest.importorskip("lupa.lua51", reason="lupa (PyPI) with its Lua 5.1 is needed: `make venv`")
    from tests.install.argocd_lua import _runtime

    lua = _runtime()
    assert lua.eval("io == nil and debug == nil and os == nil and string == nil and math == nil")
    assert lua.eval("require('os').date('!%Y-%m-%dT%XZ')") == "2026-01-01T00:00:00Z"
    assert lua.eval("require('os').execute == nil and require('os').getenv == nil")
    assert lua.eval(
        "type(tostring) == 'function' and type(ipairs) == 'function' and type(table.insert) == 'function'"
    )
    assert lua.eval("_VERSION") == "Lua 5.1"


VALID_HEALTH = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}


@pytest.mark.parametrize(("kind_dir", "case"), HEALTH_CASES)
def test_health_status_is_one_argo_cd_accepts(kind_dir: Path, case: dict[str, Any], run: Runner) -> None:
    got = run(kind_dir / "health.lua", load(kind_dir / case["inputPath"]))
    assert got["status"] in VALID_HEALTH and isinstance(got["message"], str) and got["message"]
