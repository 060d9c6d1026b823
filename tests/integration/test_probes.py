"""Readiness and liveness on the real control plane: two replicas, one through a proxy that can be cut.

/readyz is 200 for the leader and for a standby that reaches the API server and can list what it
watches; a standby whose API connection is cut becomes not ready (503) within about a lease
duration while staying alive (/healthz 200: a restart would not help it), and is ready again once
the connection is back. A replica that is stopping hands the Lease over and is not ready.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.harness.cluster import write_kubeconfig
from tests.harness.faultproxy import FaultProxy, Faults
from tests.harness.procs import free_port, stop_proc
from tests.harness.stack import Stack

LEASE = 6  # the harness's --leader-election-lease-duration


def probe(port: int, path: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def wait_probe(
    port: int, path: str, status: int, timeout: float, **fields: Any
) -> tuple[float, dict[str, Any]]:
    """Seconds until ``path`` answers ``status`` (with ``fields`` in its body), and that body."""
    t0 = time.monotonic()
    last: tuple[int, dict[str, Any]] | None = None
    while time.monotonic() - t0 < timeout:
        try:
            last = probe(port, path)
        except OSError:
            last = None  # not listening yet
        if last and last[0] == status and all(last[1].get(k) == v for k, v in fields.items()):
            return time.monotonic() - t0, last[1]
        time.sleep(0.5)
    raise AssertionError(f"{path} on {port}: wanted {status} {fields} within {timeout:.0f}s, last {last}")


@pytest.fixture(scope="module")
def stack(real_components: None) -> Iterator[Stack]:
    with Stack(variants={"probe-v1": {"error_rate": 0.0}}, route="probe", rps=1, max_seconds=600) as s:
        yield s


def test_leader_and_standby_are_ready_a_standby_cut_from_the_api_is_not(stack: Stack) -> None:
    assert stack.workdir is not None
    leader_port, standby_port = free_port(), free_port()
    leader = stack.start_operator(["--liveness", f"http://127.0.0.1:{leader_port}/healthz"], "leader.log")
    took, body = wait_probe(leader_port, "/readyz", 200, 60, role="leader")
    print(f"leader ready {took:.1f}s after its first answer: {body}")

    proxy = FaultProxy(upstream=stack.cluster.server, pki=stack.workdir / "pki")
    proxy.start()
    token = yaml.safe_load(stack.operator_kubeconfig.read_text())["users"][0]["user"]["token"]
    kc = stack.workdir / "standby-proxy.kubeconfig"
    write_kubeconfig(kc, proxy.url, stack.workdir / "pki" / "ca.crt", token)
    original = stack.operator_kubeconfig
    stack.operator_kubeconfig = kc
    try:
        standby = stack.start_operator(
            ["--liveness", f"http://127.0.0.1:{standby_port}/healthz"], "standby.log"
        )
    finally:
        stack.operator_kubeconfig = original
    try:
        took, body = wait_probe(standby_port, "/readyz", 200, 60, role="standby")
        print(f"standby ready: {body}")
        assert probe(leader_port, "/readyz") == (200, {"ready": True, "role": "leader", "problems": []})

        # Cut the standby from the API server: every request through the proxy is dropped.
        proxy.faults = Faults(drop=1.0, writes_only=False)
        took, body = wait_probe(standby_port, "/readyz", 503, LEASE * 4)
        print(f"standby cut from the API server -> not ready in {took:.1f}s: {body['problems']}")
        assert body["role"] == "standby" and any("API server" in p for p in body["problems"]), body
        assert took <= LEASE * 3, took  # the lease duration, plus a retry period and probe timing
        assert probe(standby_port, "/healthz")[0] == 200  # alive: a restart would not bring the API back
        assert probe(leader_port, "/readyz")[0] == 200  # the leader is unaffected

        # The connection comes back: ready again.
        proxy.faults = Faults()
        took, _ = wait_probe(standby_port, "/readyz", 200, LEASE * 4, role="standby")
        print(f"connection back -> standby ready again in {took:.1f}s")
    finally:
        stop_proc(standby, grace=10)
        proxy.stop()

    stack.stop_operator()
    assert leader.poll() is not None
    with pytest.raises(OSError):  # a stopped replica answers nothing
        probe(leader_port, "/readyz")


def _lease_only_kubeconfig(stack: Stack) -> Any:
    """A ServiceAccount that may use the Lease and nothing else (no ModelRollouts, no Experiments)."""
    from kubernetes import client

    from tests.harness.cluster import kubectl_apply

    ns, name = "model-rollouts", "lease-only"
    rules = [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "update"]}
    ]
    kubectl_apply(
        stack.api,
        [
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": ns}},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
             "metadata": {"name": name, "namespace": ns}, "rules": rules},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
             "metadata": {"name": name, "namespace": ns},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
             "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ns}]},
        ],
    )  # fmt: skip
    answer = client.CoreV1Api(stack.api).create_namespaced_service_account_token(
        name,
        ns,
        client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=[stack.cluster.server], expiration_seconds=3600)
        ),
    )
    assert answer.status is not None
    token = str(answer.status.token)
    assert stack.workdir is not None
    path = stack.workdir / "lease-only.kubeconfig"
    write_kubeconfig(path, stack.cluster.server, stack.workdir / "pki" / "ca.crt", token)
    return path


def test_a_replica_that_cannot_list_what_it_watches_is_not_ready(stack: Stack) -> None:
    """RBAC without the watched kinds: it can lead (the Lease is allowed) but serves nothing, so it is
    alive and not ready, and says why."""
    port = free_port()
    original = stack.operator_kubeconfig
    stack.operator_kubeconfig = _lease_only_kubeconfig(stack)
    try:
        proc = stack.start_operator(
            ["--liveness", f"http://127.0.0.1:{port}/healthz", "--leader-election-id", "lease-only"],
            "lease-only.log",
        )
    finally:
        stack.operator_kubeconfig = original
    try:
        wait_probe(port, "/healthz", 200, 60)
        _took, body = wait_probe(port, "/readyz", 503, 60, role="leader")
        assert any("cannot list" in p and "answered 403" in p for p in body["problems"]), body
        time.sleep(LEASE)
        status, body = probe(port, "/readyz")
        assert status == 503 and body["role"] == "leader", body
        assert probe(port, "/healthz")[0] == 200
    finally:
        stop_proc(proc, grace=10)
        if stack.operator is proc:
            stack.operator = None
