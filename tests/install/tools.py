"""Shared by the install tests (tests/install) and the end-to-end tests (tests/e2e).

The tools are real binaries: helm, helm-unittest (``untt``) and kubeconform built by
``hack/build-tools.sh`` from their pinned Go modules, kubectl built by ``hack/build-kube.sh``,
podman from Debian. A test whose tool is missing skips with the reason printed; with
``MODEL_ROLLOUTS_REQUIRE_INSTALL=1`` (CI) it fails instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness.cluster import CACHE, KUBE_VERSION
from tests.harness.procs import REPO

CHART = REPO / "charts" / "model-rollouts"
MANIFESTS = REPO / "manifests"
TOOLS_BIN = CACHE / "tools" / "bin"
IMAGE = os.environ.get("MODEL_ROLLOUTS_IMAGE", "localhost/model-rollouts:dev")
# Podman on these machines: runc (crun refuses the host's hybrid cgroups), explicit ulimits.
PODMAN = ["podman", "--runtime", "runc"]
PODMAN_RUN_FLAGS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024", "--network", "host"]


def named_explicitly(config: pytest.Config, here: Path) -> bool:
    """Whether ``here`` (a test directory) was named on pytest's command line."""
    if os.environ.get("MODEL_ROLLOUTS_INSTALL_TESTS") == "1":
        return True
    for arg in config.args:
        p = Path(arg.split("::")[0]).resolve()
        if p == here or here in p.parents:
            return True
    return False


def missing(reason: str) -> None:
    """Skip (printing why), or fail where CI requires every install/e2e component."""
    if os.environ.get("MODEL_ROLLOUTS_REQUIRE_INSTALL") == "1":
        pytest.fail(f"required component missing: {reason}")
    print(f"\nSKIP: {reason}")
    pytest.skip(reason)


def tool(name: str) -> Path:
    """helm, untt, kubeconform (hack/build-tools.sh) or kubectl (hack/build-kube.sh)."""
    where = CACHE / "kube" / KUBE_VERSION / "bin" if name == "kubectl" else TOOLS_BIN
    path = where / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        hint = "make kube-bins" if name == "kubectl" else "make tools"
        missing(f"{name} not found in {where}; run `{hint}`")
    return path


def run(argv: list[str | Path], **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure raise with its output (so a test failure shows why)."""
    check = kw.pop("check", True)
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, argv))} exited {proc.returncode}\n"
            f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"
        )
    return proc


def helm(
    *args: str | Path, kubeconfig: Path | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "HELM_CACHE_HOME": str(CACHE / "helm" / "cache"),
        "HELM_CONFIG_HOME": str(CACHE / "helm" / "config"),
        "HELM_DATA_HOME": str(CACHE / "helm" / "data"),
    }
    if kubeconfig is not None:
        env["KUBECONFIG"] = str(kubeconfig)
    return run([tool("helm"), *args], env=env, check=check)


def render(
    values: dict[str, Any] | None = None,
    *,
    release: str = "model-rollouts",
    namespace: str = "model-rollouts",
    values_files: list[Path] = (),  # type: ignore[assignment]
) -> list[dict[str, Any]]:
    """`helm template` the chart; the objects it renders."""
    args: list[str | Path] = ["template", release, CHART, "--namespace", namespace]
    for f in values_files:
        args += ["-f", f]
    if values:
        args += ["-f", "-"]
    out = run([tool("helm"), *args], input=yaml.safe_dump(values) if values else None).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    for d in docs:
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name):
            return d
    raise AssertionError(f"no {kind} {name or ''} among {[(d['kind'], d['metadata']['name']) for d in docs]}")


def podman_reason() -> str | None:
    """Why podman cannot run the operator image here, or None."""
    if not shutil.which("podman") or not shutil.which("runc"):
        return "podman and runc not found (Debian: apt-get install podman runc)"
    proc = subprocess.run([*PODMAN, "image", "exists", IMAGE], capture_output=True, text=True)
    if proc.returncode != 0:
        return f"image {IMAGE} not built; run `make image`"
    return None
