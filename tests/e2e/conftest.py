"""End-to-end tests: the operator installed as platform teams install it, on a real cluster.

The cluster is, in order: the one ``KUBECONFIG`` names (MODEL_ROLLOUTS_E2E_KUBECONFIG=1 opts
in, so a developer's own KUBECONFIG is never touched by accident); a kind cluster from
pytest-kind where a Docker engine runs; else the local control plane of tests/harness (real
etcd and kube-apiserver on loopback), which is what CI uses. The operator's image runs under
podman as the chart's Deployment would run it.

Collected only when this directory is named on the command line (`make e2e`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.install.tools import missing, named_explicitly

HERE = Path(__file__).resolve().parent


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if collection_path.resolve() != HERE and not named_explicitly(config, HERE):
        return True
    return None


@dataclass
class Cluster:
    kubeconfig: Path
    kind: str  # "kubeconfig" | "kind" | "local"
    control_plane: object | None = None


def _docker_engine() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=15).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    if os.environ.get("MODEL_ROLLOUTS_E2E_KUBECONFIG") == "1" and os.environ.get("KUBECONFIG"):
        yield Cluster(Path(os.environ["KUBECONFIG"]), "kubeconfig")
        return
    if _docker_engine():
        try:
            from pytest_kind import KindCluster  # type: ignore[import-not-found]
        except ImportError:
            pass
        else:
            kind = KindCluster("model-rollouts-e2e")
            kind.create()
            try:
                yield Cluster(Path(kind.kubeconfig_path), "kind")
            finally:
                kind.delete()
            return
    from tests.harness.cluster import ControlPlane, MissingComponent, gateway_api_crds, install_crds

    try:
        cp = ControlPlane(controller_manager=True).start()
    except MissingComponent as e:
        missing(f"no cluster: no KUBECONFIG opt-in, no Docker engine for kind, and {e}")
        return
    try:
        install_crds(cp.api_client(), gateway_api_crds())
        yield Cluster(cp.kubeconfig, "local", cp)
    finally:
        cp.stop()
