"""I/O shared by the handlers: API clients, status writes, Events, providers and routers from a spec."""

from __future__ import annotations

import base64
import datetime as dt
import threading
import uuid
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from model_rollouts.api.common import GROUP, VERSION, PrometheusConfig, TrafficRouting, parse_duration
from model_rollouts.metrics.prometheus import PrometheusProvider
from model_rollouts.traffic.gateway_api import GatewayAPIRouter
from model_rollouts.traffic.router import RouterError, TrafficRouter

_api: client.ApiClient | None = None
_lock = threading.Lock()


def api() -> client.ApiClient:
    global _api
    with _lock:
        if _api is None:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            _api = client.ApiClient()
        return _api


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def get_object(plural: str, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        obj: dict[str, Any] = client.CustomObjectsApi(api()).get_namespaced_custom_object(
            GROUP, VERSION, namespace, plural, name)
        return obj
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def write_status(plural: str, obj: dict[str, Any], status: dict[str, Any]) -> bool:
    """Replace status via the status subresource, guarded by resourceVersion. False on a 409 conflict."""
    kopf_state = (obj.get("status") or {}).get("kopf")
    if kopf_state is not None:
        status = {**status, "kopf": kopf_state}
    body = {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "metadata": {
        "name": obj["metadata"]["name"], "namespace": obj["metadata"]["namespace"],
        "resourceVersion": obj["metadata"]["resourceVersion"]}, "status": status}
    try:
        client.CustomObjectsApi(api()).replace_namespaced_custom_object_status(
            GROUP, VERSION, obj["metadata"]["namespace"], plural, obj["metadata"]["name"], body)
    except ApiException as e:
        if e.status in (404, 409):
            return False
        raise
    return True


def post_event(obj: dict[str, Any], event_type: str, reason: str, message: str) -> None:
    meta = obj["metadata"]
    ts = dt.datetime.now(dt.UTC)
    ev = client.CoreV1Event(
        metadata=client.V1ObjectMeta(name=f"{meta['name']}.{uuid.uuid4().hex[:12]}", namespace=meta["namespace"]),
        involved_object=client.V1ObjectReference(api_version=obj["apiVersion"], kind=obj["kind"],
                                                 name=meta["name"], namespace=meta["namespace"], uid=meta.get("uid"),
                                                 resource_version=meta.get("resourceVersion")),
        reason=reason, message=message[:1024], type=event_type, first_timestamp=ts, last_timestamp=ts, count=1,
        source=client.V1EventSource(component="model-rollouts"), reporting_component="model-rollouts",
        reporting_instance="model-rollouts")
    try:
        client.CoreV1Api(api()).create_namespaced_event(meta["namespace"], ev)
    except ApiException:
        pass  # Events are best effort; status holds the record.


def make_router(routing: TrafficRouting, namespace: str) -> TrafficRouter:
    if routing.gatewayAPI is not None:
        return GatewayAPIRouter(api(), namespace, routing.gatewayAPI.httpRoute, routing.gatewayAPI.ruleIndex)
    for field in ("istio", "replicas", "kserve"):
        if getattr(routing, field) is not None:
            raise RouterError(f"spec.trafficRouting.{field}",
                              "this router is not implemented in this version; use gatewayAPI")
    raise RouterError("spec.trafficRouting", "set exactly one router")


def make_provider(cfg: PrometheusConfig, namespace: str) -> PrometheusProvider:
    token = None
    if cfg.bearerTokenSecret is not None:
        ref = cfg.bearerTokenSecret
        try:
            secret = client.CoreV1Api(api()).read_namespaced_secret(ref.name, namespace)
        except ApiException as e:
            raise RouterError("spec.analysis.prometheus.bearerTokenSecret",
                              f"Secret {namespace}/{ref.name} cannot be read ({e.status})") from e
        data = (secret.data or {}).get(ref.key)
        if data is None:
            raise RouterError("spec.analysis.prometheus.bearerTokenSecret.key",
                              f"Secret {ref.name} has no key {ref.key!r}")
        token = base64.b64decode(data).decode().strip()
    return PrometheusProvider(cfg.address, timeout_s=max(1, int(parse_duration(cfg.timeout))), token=token,
                              verify_tls=not cfg.insecureSkipVerify)


def validation_message(err: ValidationError) -> str:
    """The first pydantic error as 'spec.a.b: message'."""
    parts = []
    for e in err.errors()[:3]:
        loc = ".".join(str(p) for p in e["loc"])
        parts.append(f"spec.{loc}: {e['msg']}")
    return "; ".join(parts)
