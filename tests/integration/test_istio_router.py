"""The Istio router against a real kube-apiserver with Istio's real CRDs (istio.io/api v1.32.0).

What the API server itself does with the router's JSON patch: stores only the weights, refuses
the whole patch (422) when a tested value moved, and never sees a write for a VirtualService that
does not opt in (its resourceVersion does not change).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from model_rollouts.traffic.gateway_api import OPT_IN
from model_rollouts.traffic.istio import GROUP, PLURAL, VERSION, IstioRouter
from model_rollouts.traffic.router import Arm, NotOptedIn
from tests.harness.cluster import ControlPlane, MissingComponent, install_crds, istio_crds

NAMESPACE = "ml"


@pytest.fixture(scope="module")
def api() -> Iterator[Any]:
    try:
        crds = istio_crds()
    except MissingComponent as e:
        if os.environ.get("MODEL_ROLLOUTS_REQUIRE_INTEGRATION") == "1":
            pytest.fail(f"integration components missing and required: {e}")
        print(f"\nSKIP istio router: {e}")
        pytest.skip(str(e))
    cp = ControlPlane(controller_manager=False)
    try:
        cp.start()
        api = cp.api_client()
        install_crds(api, crds)
        client.CoreV1Api(api).create_namespace(client.V1Namespace(metadata={"name": NAMESPACE}))
        yield api
    finally:
        cp.stop()


def virtualservice(name: str, annotations: dict[str, str] | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": NAMESPACE}
    if annotations is not None:
        meta["annotations"] = annotations
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "VirtualService",
        "metadata": meta,
        "spec": {
            "hosts": ["fraud"],
            "http": [
                {
                    "name": "testers",
                    "match": [{"headers": {"x-tester": {"exact": "1"}}}],
                    "route": [{"destination": {"host": "fraud-v2"}}],
                },
                {
                    "name": "primary",
                    "route": [
                        {"destination": {"host": "fraud-v1", "port": {"number": 80}}, "weight": 100},
                        {"destination": {"host": "fraud-v2", "port": {"number": 80}}, "weight": 0},
                    ],
                    "mirror": {"host": "fraud-shadow"},
                    "mirrorPercentage": {"value": 5.0},
                    "retries": {"attempts": 2},
                },
            ],
        },
    }


def create(api: Any, doc: dict[str, Any]) -> dict[str, Any]:
    co = client.CustomObjectsApi(api)
    out: dict[str, Any] = co.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, doc)
    return out


def read(api: Any, name: str) -> dict[str, Any]:
    out: dict[str, Any] = client.CustomObjectsApi(api).get_namespaced_custom_object(
        GROUP, VERSION, NAMESPACE, PLURAL, name
    )
    return out


def test_only_the_weights_change_and_the_result_is_read_back(api: Any) -> None:
    before = create(api, virtualservice("written", {OPT_IN: "ModelRollout/fraud"}))
    r = IstioRouter(api, NAMESPACE, "written", route_name="primary", owner=("ModelRollout", "fraud"))
    r.check(["fraud-v1", "fraud-v2"])
    assert r.set_weights({"fraud-v1": 80, "fraud-v2": 20}) == {"fraud-v1": 80, "fraud-v2": 20}
    after = read(api, "written")
    assert r.get_weights() == {"fraud-v1": 80, "fraud-v2": 20}
    expected = copy.deepcopy(before["spec"])
    expected["http"][1]["route"][0]["weight"] = 80
    expected["http"][1]["route"][1]["weight"] = 20
    assert after["spec"] == expected  # every other route, match, mirror and retry as it was
    assert after["metadata"]["annotations"] == before["metadata"]["annotations"]
    # Already so: no write at all.
    rv = after["metadata"]["resourceVersion"]
    assert r.set_weights({"fraud-v1": 80, "fraud-v2": 20}) == {"fraud-v1": 80, "fraud-v2": 20}
    assert read(api, "written")["metadata"]["resourceVersion"] == rv


@pytest.mark.parametrize("annotations", [None, {OPT_IN: "ModelRollout/someone-else"}, {OPT_IN: ""}])
def test_a_virtualservice_without_the_opt_in_is_never_written(
    api: Any, annotations: dict[str, str] | None
) -> None:
    name = f"closed-{len(str(annotations))}"
    created = create(api, virtualservice(name, annotations))
    r = IstioRouter(api, NAMESPACE, name, route_name="primary", owner=("ModelRollout", "fraud"))
    with pytest.raises(NotOptedIn):
        r.check(["fraud-v1", "fraud-v2"])
    with pytest.raises(NotOptedIn):
        r.set_weights({"fraud-v1": 0, "fraud-v2": 100})
    after = read(api, name)
    assert after["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]
    assert after["spec"] == created["spec"]


def test_the_api_server_refuses_the_patch_when_a_destination_moved(api: Any) -> None:
    create(api, virtualservice("moved", {OPT_IN: "*"}))
    r = IstioRouter(api, NAMESPACE, "moved", route_name="primary", owner=("ModelRollout", "fraud"))
    stale = r.read()
    # Someone reorders the destinations after the router read the VirtualService.
    current = read(api, "moved")
    current["spec"]["http"][1]["route"].reverse()
    client.CustomObjectsApi(api).replace_namespaced_custom_object(
        GROUP, VERSION, NAMESPACE, PLURAL, "moved", current
    )
    with pytest.raises(ApiException) as err:  # a write from the state as read before the reorder
        r.write(stale, {Arm("stable", "fraud-v1"): 10, Arm("candidate", "fraud-v2"): 90})
    assert err.value.status == 422
    routes = read(api, "moved")["spec"]["http"][1]["route"]
    assert [(d["destination"]["host"], d["weight"]) for d in routes] == [("fraud-v2", 0), ("fraud-v1", 100)]


def test_opt_in_withdrawn_after_the_read_refuses_the_patch(api: Any) -> None:
    create(api, virtualservice("withdrawn", {OPT_IN: "ModelRollout/fraud"}))
    r = IstioRouter(api, NAMESPACE, "withdrawn", route_name="primary", owner=("ModelRollout", "fraud"))
    stale = r.read()
    client.CustomObjectsApi(api).patch_namespaced_custom_object(
        GROUP,
        VERSION,
        NAMESPACE,
        PLURAL,
        "withdrawn",
        {"metadata": {"annotations": {OPT_IN: "ModelRollout/b"}}},
    )
    with pytest.raises(ApiException) as err:  # a write from the state as read before the withdrawal
        r.write(stale, {Arm("stable", "fraud-v1"): 10, Arm("candidate", "fraud-v2"): 90})
    assert err.value.status == 422
    fresh = IstioRouter(api, NAMESPACE, "withdrawn", route_name="primary")
    assert fresh.get_weights() == {"fraud-v1": 100, "fraud-v2": 0}
