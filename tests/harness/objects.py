"""Shared scaffolding of the integration tests: the operator's objects, how to build, read and clear them.

- ``fraud_stack``: the two-variant stack most modules run on (``fraud-v1`` stable, ``fraud-v2``
  candidate behind the HTTPRoute ``fraud``), with the operator started;
- ``fresh_fraud``: a per-test fixture body on that stack (healthy candidate, all traffic on stable;
  afterwards every object of the given kinds deleted, waiting until they are gone);
- ``delete_all`` / ``delete_one`` / ``wait_none``: clear objects and wait until the API server no longer
  lists them;
- ``rollout`` / ``experiment``: manifest builders; ``phase``, ``status``, ``weight``, ``cond``,
  ``event_reasons``: readers of an object and its Events.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.harness.cluster import ControlPlane
from tests.harness.queries import ERROR_RATE, FEEDBACK, POSITIVE
from tests.harness.stack import Stack, httproute

GROUP, VERSION = "mlrollouts.io", "v1alpha1"
ROLLOUTS, EXPERIMENTS = "modelrollouts", "modelexperiments"
CLUSTER_PROVIDERS = "clustermetricproviders"
STABLE, CANDIDATE, ROUTE = "fraud-v1", "fraud-v2", "fraud"


# -- reading an object ------------------------------------------------------------------------------
def status(obj: dict[str, Any]) -> dict[str, Any]:
    return obj.get("status") or {}


def phase(obj: dict[str, Any]) -> str | None:
    return status(obj).get("phase")


def weight(obj: dict[str, Any]) -> int | None:
    return status(obj).get("weight")


def cond(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    """The condition of that type, or ``{}``."""
    return next((c for c in status(obj).get("conditions", []) if c["type"] == type_), {})


def event_reasons(stack: Stack, name: str) -> set[str]:
    """The reasons of the Events about the object of that name in the stack's namespace."""
    evs = (
        client.CoreV1Api(stack.api)
        .list_namespaced_event(stack.namespace, field_selector=f"involvedObject.name={name}")
        .items
    )
    return {str(e.reason) for e in evs}


# -- clearing objects -------------------------------------------------------------------------------
def items(stack: Stack, plural: str) -> list[dict[str, Any]]:
    """Every object of the kind in the stack's namespace."""
    got: dict[str, Any] = client.CustomObjectsApi(stack.api).list_namespaced_custom_object(  # type: ignore[assignment]
        GROUP, VERSION, stack.namespace, plural
    )
    found: list[dict[str, Any]] = got["items"]
    return found


def delete_all(
    stack: Stack,
    *plurals: str,
    cluster: Sequence[str] = (),
    timeout: float = 30,
    ignore_errors: bool = False,
) -> None:
    """Delete every object of the namespaced ``plurals`` and of the cluster-scoped ``cluster`` kinds,
    then wait up to ``timeout`` seconds until the namespaced ones are no longer listed (finalisers
    run). ``ignore_errors``: an object the API server refuses to delete (or already gone) is skipped."""
    co = client.CustomObjectsApi(stack.api)
    for plural in plurals:
        for obj in items(stack, plural):
            with contextlib.suppress(*((ApiException,) if ignore_errors else ())):
                co.delete_namespaced_custom_object(
                    GROUP, VERSION, stack.namespace, plural, obj["metadata"]["name"]
                )
    for plural in cluster:
        listed: dict[str, Any] = co.list_cluster_custom_object(GROUP, VERSION, plural)  # type: ignore[assignment]
        for obj in listed["items"]:
            co.delete_cluster_custom_object(GROUP, VERSION, plural, obj["metadata"]["name"])
    wait_none(stack, *plurals, timeout=timeout)


def wait_none(stack: Stack, *plurals: str, timeout: float = 30) -> None:
    """Wait up to ``timeout`` seconds until no object of these kinds is listed (no failure after it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(items(stack, plural) for plural in plurals):
        time.sleep(0.5)


def delete_one(stack: Stack, plural: str, name: str, timeout: float = 30) -> None:
    """Delete one object (already gone is fine) and wait until a GET answers 404; else fail."""
    co = client.CustomObjectsApi(stack.api)
    with contextlib.suppress(ApiException):
        co.delete_namespaced_custom_object(GROUP, VERSION, stack.namespace, plural, name)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            co.get_namespaced_custom_object(GROUP, VERSION, stack.namespace, plural, name)
        except ApiException as e:
            if e.status == 404:
                return
        time.sleep(0.5)
    raise AssertionError(f"{plural}/{name} was not deleted")


# -- the two-variant stack --------------------------------------------------------------------------
@contextlib.contextmanager
def fraud_stack(
    max_seconds: int, rps: int = 50, operator_args: list[str] | None = None, audit: bool = False
) -> Iterator[Stack]:
    """The stack with a healthy stable and candidate behind the route ``fraud``, the operator running.

    ``audit``: the API server logs every request for mlrollouts.io resources (``stack.cluster.audit_events``).
    """
    with Stack(
        variants={STABLE: {"error_rate": 0.0}, CANDIDATE: {"error_rate": 0.0}},
        route=ROUTE,
        rps=rps,
        max_seconds=max_seconds,
        cluster=ControlPlane(audit=audit),
    ) as s:
        s.start_operator(operator_args)
        yield s


def fresh_fraud(
    stack: Stack, *plurals: str, cluster: Sequence[str] = (), restart_operator: bool = False
) -> Iterator[Stack]:
    """A per-test fixture body on ``fraud_stack``: a healthy candidate (and, with ``restart_operator``,
    an operator again if a test stopped it), all traffic on stable; afterwards ``delete_all``."""
    stack.servers[CANDIDATE].set(error_rate=0.0)
    if restart_operator and stack.operator is None:
        stack.start_operator()
    stack.apply(httproute(ROUTE, stack.namespace, {STABLE: 100, CANDIDATE: 0}))
    yield stack
    delete_all(stack, *plurals, cluster=cluster)


# -- manifests --------------------------------------------------------------------------------------
def guardrail(failure_limit: int = 1) -> dict[str, Any]:
    """The error-rate guardrail: at most 5% errors."""
    return {"name": "error-rate", "query": ERROR_RATE, "max": 0.05, "failureLimit": failure_limit}


COMPARISON: dict[str, Any] = {
    "name": "positive-feedback",
    "successes": POSITIVE,
    "trials": FEEDBACK,
    "test": "nonInferiority",
    # Wide enough that a healthy candidate passes within about a minute at the harness's traffic even
    # on an unlucky run (at 0.1 one CI run in ~15 sat 2 minutes with the bound at -0.105).
    "margin": 0.15,
}


def rollout(
    name: str,
    prom: str,
    steps: list[dict[str, Any]],
    *,
    stable: str = STABLE,
    candidate: dict[str, Any] | None = None,
    route: str = ROUTE,
    compare: bool = True,
    **extra: Any,
) -> dict[str, Any]:
    """A ModelRollout: the error-rate guardrail and (``compare``) the non-inferiority comparison of
    positive feedback, every 5s over 10s. ``extra["analysis"]`` merges into the analysis, the rest of
    ``extra`` into the spec. ``candidate`` defaults to ``fraud-v2`` at modelVersion 2.0."""
    analysis: dict[str, Any] = {
        "interval": "5s",
        "window": "10s",
        "prometheus": {"address": prom, "timeout": "2s"},
        "guardrails": [guardrail()],
        **({"comparisons": [dict(COMPARISON)]} if compare else {}),
    }
    analysis.update(extra.pop("analysis", {}))
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ModelRollout",
        "metadata": {"name": name},
        "spec": {
            "stable": {"service": stable},
            "candidate": candidate or {"service": CANDIDATE, "modelVersion": "2.0"},
            "trafficRouting": {"gatewayAPI": {"httpRoute": route}},
            "steps": steps,
            "analysis": analysis,
            **extra,
        },
    }


def merge_sections(spec: dict[str, Any], sections: dict[str, Any]) -> None:
    """Each section that is a dict merges into the spec's section of that name; anything else replaces it."""
    for key, value in sections.items():
        spec[key] = {**spec[key], **value} if isinstance(value, dict) and key in spec else value


def experiment(
    name: str, prom: str, variants: list[dict[str, Any]], route: str, **sections: Any
) -> dict[str, Any]:
    """A ModelExperiment on positive feedback with the error-rate guardrail, analysed every 5s over 30s.

    ``sections`` go in by ``merge_sections``.
    """
    spec: dict[str, Any] = {
        "variants": variants,
        "trafficRouting": {"gatewayAPI": {"httpRoute": route}},
        "primaryMetric": {
            "name": "positive-feedback",
            "type": "proportion",
            "successes": POSITIVE,
            "trials": FEEDBACK,
        },
        "guardrails": [guardrail()],
        "successCriteria": {"minimumDetectableEffect": 0.1, "alpha": 0.05},
        "stoppingRules": {},
        "analysis": {"interval": "5s", "window": "30s", "prometheus": {"address": prom, "timeout": "2s"}},
    }
    merge_sections(spec, sections)
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ModelExperiment",
        "metadata": {"name": name},
        "spec": spec,
    }
