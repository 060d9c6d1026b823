"""The shipped examples work on a default install.

``manifests/examples/`` is applied exactly as shipped, with the real ``kubectl`` built in the cache,
to the real stack, with the operator started without the harness's ``--allowed-provider-address``:
the empty allowlist that the chart's default values give (checked against ``manifests/install.yaml``,
which is rendered from them). The rollout and the experiment must start moving traffic, not end
``Invalid``. Then the platform points the example ClusterMetricProvider at its Prometheus (here
the stack's) and the rollout's analysis really passes on the example's own queries.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.harness.cluster import CACHE, KUBE_VERSION
from tests.harness.objects import phase
from tests.harness.procs import REPO
from tests.harness.stack import Stack, httproute

EXAMPLES = REPO / "manifests" / "examples"
KUBECTL = CACHE / "kube" / KUBE_VERSION / "bin" / "kubectl"
P, X = "modelrollouts", "modelexperiments"


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == kind), {})


@pytest.fixture(scope="module")
def stack(real_components: None) -> Iterator[Stack]:
    if not KUBECTL.exists():
        print(f"\nSKIP: no kubectl at {KUBECTL} (make kube-bins)")
        pytest.skip(f"no kubectl at {KUBECTL} (make kube-bins)")
    with Stack(
        variants={"fraud-scorer-v1": {"error_rate": 0.0}, "fraud-scorer-v2": {"error_rate": 0.0}},
        route="fraud-scorer",
        route_managed_by="ModelRollout/fraud-scorer",  # the opt-in the example's header asks for
        rps=20,
        max_seconds=600,
    ) as s:
        s.apply(
            httproute("recsys", s.namespace, {"recsys-v1": 100, "recsys-v2": 0}, "ModelExperiment/recsys-ab")
        )
        s.start_operator(allow_inline=False)
        yield s


def kubectl(stack: Stack, *args: str) -> str:
    out = subprocess.run(
        [str(KUBECTL), "--kubeconfig", str(stack.cluster.kubeconfig), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_a_default_install_admits_no_inline_provider_address() -> None:
    install = [d for d in yaml.safe_load_all((REPO / "manifests" / "install.yaml").read_text()) if d]
    deployment = next(d for d in install if d["kind"] == "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0].get("args") or []
    assert not [a for a in args if "allowed-provider-address" in a], args


def test_the_examples_as_shipped_start_on_a_default_install(stack: Stack) -> None:
    assert stack.prom is not None
    ns = stack.namespace
    # What the examples did before: an inline address. Without a ClusterMetricProvider of that
    # address, a default install refuses it by name (a provider's address is admitted inline too).
    inline = yaml.safe_load((EXAMPLES / "modelrollout.yaml").read_text())
    inline["metadata"] = {"name": "inline", "namespace": ns}
    inline["spec"]["trafficRouting"]["gatewayAPI"]["httpRoute"] = "inline"
    inline["spec"]["analysis"].pop("provider")
    inline["spec"]["analysis"]["prometheus"] = {"address": "http://prometheus.monitoring:9090"}
    stack.apply(
        httproute("inline", ns, {"fraud-scorer-v1": 100, "fraud-scorer-v2": 0}, "ModelRollout/inline")
    )
    stack.apply(inline)
    bad = stack.wait_for(P, "inline", lambda o: phase(o) == "Invalid", 60)
    assert "spec.analysis.prometheus.address" in bad["status"]["message"]

    kubectl(stack, "delete", "modelrollout", "inline", "-n", ns, "--wait=false")

    kubectl(stack, "apply", "-f", str(EXAMPLES / "clustermetricprovider.yaml"))
    kubectl(
        stack,
        "apply",
        "-n",
        ns,
        "-f",
        str(EXAMPLES / "modelrollout.yaml"),
        "-f",
        str(EXAMPLES / "modelexperiment.yaml"),
    )

    # The rollout's first step needs no measurement: it moves 10% to the candidate at once.
    ro = stack.wait_for(
        P, "fraud-scorer", lambda o: phase(o) == "Progressing" and o["status"]["weight"] == 10, 60
    )
    assert condition(ro, "Valid")["status"] == "True", ro["status"]
    stack.wait_route({"fraud-scorer-v1": 90, "fraud-scorer-v2": 10}, timeout=15)
    ex = stack.wait_for(X, "recsys-ab", lambda o: phase(o) == "Running", 60)
    assert condition(ex, "Valid")["status"] == "True", ex["status"]
    routes = json.loads(kubectl(stack, "get", "httproute", "recsys", "-n", ns, "-o", "json"))
    weights = {b["name"]: b["weight"] for b in routes["spec"]["rules"][0]["backendRefs"]}
    assert weights == {"recsys-v1": 50, "recsys-v2": 50}

    # The platform points the provider at its Prometheus; the example's own queries then pass.
    patch = {"spec": {"prometheus": {"address": stack.prom.url}}}
    kubectl(stack, "patch", "clustermetricprovider", "prometheus", "--type", "merge", "-p", json.dumps(patch))
    ro = stack.wait_for(
        P, "fraud-scorer", lambda o: condition(o, "Healthy").get("reason") == "AnalysisPassing", 150
    )
    assert phase(ro) == "Progressing" and ro["status"]["weight"] == 10  # in its 2m pause
    measured = {m["name"]: m for m in ro["status"]["lastAnalysis"]}
    assert measured["error-rate"]["outcome"] == "value" and measured["error-rate"]["verdict"] == "pass"
    assert measured["positive-feedback"]["outcome"] == "value", measured["positive-feedback"]
