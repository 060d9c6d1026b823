"""Smoke tests proving every part of the local stack is real."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.harness.stack import Stack

V1, V2 = "smoke-v1", "smoke-v2"


@pytest.fixture(scope="module")
def stack(real_components: None) -> Iterator[Stack]:
    with Stack(
        variants={V1: {}, V2: {}},
        route="smoke",
        initial_weights={V1: 80, V2: 20},
        rps=60,
        controller_manager=True,
        max_seconds=300,
    ) as s:
        yield s


def test_apiserver_is_real_and_recent(stack: Stack) -> None:
    info = client.VersionApi(stack.api).get_code()
    assert (int(info.major), int(info.minor.rstrip("+"))) >= (1, 30), info.git_version
    assert stack.cluster.server.startswith("https://127.0.0.1:")


def test_crd_schema_rejects_invalid_object_with_422(stack: Stack) -> None:
    bad = {
        "apiVersion": "mlrollouts.io/v1alpha1",
        "kind": "ModelRollout",
        "metadata": {"name": "bad", "namespace": stack.namespace},
        "spec": {
            "stable": {"service": "a"},
            "candidate": {"service": "b"},
            "trafficRouting": {"gatewayAPI": {"httpRoute": "r"}},
            "steps": [{"setWeight": 150}],
            "analysis": {"prometheus": {"address": "http://p:9090"}},
        },
    }
    with pytest.raises(ApiException) as e:
        client.CustomObjectsApi(stack.api).create_namespaced_custom_object(
            "mlrollouts.io", "v1alpha1", stack.namespace, "modelrollouts", bad
        )
    assert e.value.status == 422
    assert "spec.steps[0].setWeight" in e.value.body


def test_controller_manager_creates_replicasets(stack: Stack) -> None:
    apps = client.AppsV1Api(stack.api)
    dep = client.V1Deployment(
        metadata=client.V1ObjectMeta(name="smoke-model"),
        spec=client.V1DeploymentSpec(
            replicas=1,
            selector=client.V1LabelSelector(match_labels={"app": "smoke"}),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels={"app": "smoke"}),
                spec=client.V1PodSpec(containers=[client.V1Container(name="m", image="model:1")]),
            ),
        ),
    )
    apps.create_namespaced_deployment(stack.namespace, dep)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        rs = apps.list_namespaced_replica_set(stack.namespace, label_selector="app=smoke").items
        if rs:
            break
        time.sleep(0.5)
    assert rs, "kube-controller-manager created no ReplicaSet for the Deployment"


def test_traffic_generator_sees_httproute_patch(stack: Stack) -> None:
    assert stack.loadgen is not None
    co = client.CustomObjectsApi(stack.api)
    for weight in (35, 20):  # a change, then back to the 80/20 split the next test measures
        co.patch_namespaced_custom_object(
            "gateway.networking.k8s.io",
            "v1",
            stack.namespace,
            "httproutes",
            stack.route,
            [{"op": "replace", "path": "/spec/rules/0/backendRefs/1/weight", "value": weight}],
            _content_type="application/json-patch+json",
        )
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and stack.loadgen.weights.get(V2) != weight:
            time.sleep(0.1)
        assert stack.loadgen.weights.get(V2) == weight


def test_prometheus_sees_the_80_20_split(stack: Stack) -> None:
    assert stack.prom is not None
    time.sleep(22)  # let a 20 s rate window fill at the 80/20 weights
    rates = {}
    for svc in (V1, V2):
        res = stack.prom.query(f'sum(rate(model_requests_total{{service="{svc}"}}[20s]))')
        assert res, f"no series for {svc}"
        rates[svc] = float(res[0]["value"][1])
    share = rates[V2] / (rates[V1] + rates[V2])
    print(f"\nper-variant request rates {rates}; candidate share {share:.3f} (want 0.20 +- 0.05)")
    assert abs(share - 0.20) <= 0.05


def test_every_harness_process_listens_on_loopback_only(stack: Stack) -> None:
    import re
    import shutil
    import subprocess

    if shutil.which("ss") is None:
        pytest.skip("`ss` (iproute2) is not installed, cannot list listening sockets")
    assert stack.prom is not None and stack.prom._proc is not None
    pids = {*stack.cluster.pids.values(), stack.prom._proc.pid, *(s.pid for s in stack.servers.values())}
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    seen: dict[int, list[str]] = {}
    for line in out.splitlines():
        fields = line.split()
        for pid in map(int, re.findall(r"pid=(\d+)", line)):
            if pid in pids:
                seen.setdefault(pid, []).append(fields[3])
    print(f"\nlistening sockets of harness processes: {seen}")
    assert set(seen) == pids, f"some harness processes listen nowhere: {pids - set(seen)}"
    bad = [addr for addrs in seen.values() for addr in addrs if not addr.startswith("127.0.0.1:")]
    assert not bad, f"listening beyond loopback: {bad}"
