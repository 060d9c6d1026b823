"""I/O shared by the handlers: API clients, status writes, Events, providers and routers from a spec."""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import logging
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any, Generic, TypeVar, cast

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from model_rollouts import telemetry
from model_rollouts.api.common import (
    GROUP,
    VERSION,
    PrometheusConfig,
    ResourceSpec,
    ResourceStatus,
    TrafficRouting,
    dump,
    parse_duration,
)
from model_rollouts.engine import stats
from model_rollouts.engine.actions import Event
from model_rollouts.engine.status import invalid as invalid_status
from model_rollouts.metrics.prometheus import PrometheusProvider
from model_rollouts.metrics.provider import MetricProvider, Result, TemplateError, check_template, render
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
        obj = cast(
            dict[str, Any],
            client.CustomObjectsApi(api()).get_namespaced_custom_object(
                GROUP, VERSION, namespace, plural, name
            ),
        )
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
    body = {
        "apiVersion": obj["apiVersion"],
        "kind": obj["kind"],
        "metadata": {
            "name": obj["metadata"]["name"],
            "namespace": obj["metadata"]["namespace"],
            "resourceVersion": obj["metadata"]["resourceVersion"],
        },
        "status": status,
    }
    try:
        client.CustomObjectsApi(api()).replace_namespaced_custom_object_status(
            GROUP, VERSION, obj["metadata"]["namespace"], plural, obj["metadata"]["name"], body
        )
    except ApiException as e:
        if e.status in (404, 409):
            return False
        raise
    return True


def post_event(obj: dict[str, Any], event_type: str, reason: str, message: str) -> None:
    meta = obj["metadata"]
    ts = dt.datetime.now(dt.UTC)
    ev = client.CoreV1Event(
        metadata=client.V1ObjectMeta(
            name=f"{meta['name']}.{uuid.uuid4().hex[:12]}", namespace=meta["namespace"]
        ),
        involved_object=client.V1ObjectReference(
            api_version=obj["apiVersion"],
            kind=obj["kind"],
            name=meta["name"],
            namespace=meta["namespace"],
            uid=meta.get("uid"),
            resource_version=meta.get("resourceVersion"),
        ),
        reason=reason,
        message=message[:1024],
        type=event_type,
        first_timestamp=ts,
        last_timestamp=ts,
        count=1,
        source=client.V1EventSource(component="model-rollouts"),
        reporting_component="model-rollouts",
        reporting_instance="model-rollouts",
    )
    with contextlib.suppress(ApiException):  # Events are best effort; status holds the record.
        client.CoreV1Api(api()).create_namespaced_event(meta["namespace"], ev)


def make_router(routing: TrafficRouting, namespace: str) -> TrafficRouter:
    if routing.gatewayAPI is not None:
        return GatewayAPIRouter(api(), namespace, routing.gatewayAPI.httpRoute, routing.gatewayAPI.ruleIndex)
    for field in ("istio", "replicas", "kserve"):
        if getattr(routing, field) is not None:
            raise RouterError(
                f"spec.trafficRouting.{field}",
                "this router is not implemented in this version; use gatewayAPI",
            )
    raise RouterError("spec.trafficRouting", "set exactly one router")


def make_provider(cfg: PrometheusConfig, namespace: str) -> PrometheusProvider:
    token = None
    if cfg.bearerTokenSecret is not None:
        ref = cfg.bearerTokenSecret
        try:
            secret = client.CoreV1Api(api()).read_namespaced_secret(ref.name, namespace)
        except ApiException as e:
            raise RouterError(
                "spec.analysis.prometheus.bearerTokenSecret",
                f"Secret {namespace}/{ref.name} cannot be read ({e.status})",
            ) from e
        data = (secret.data or {}).get(ref.key)
        if data is None:
            raise RouterError(
                "spec.analysis.prometheus.bearerTokenSecret.key", f"Secret {ref.name} has no key {ref.key!r}"
            )
        token = base64.b64decode(data).decode().strip()
    return PrometheusProvider(
        cfg.address,
        timeout_s=max(1, int(parse_duration(cfg.timeout))),
        token=token,
        verify_tls=not cfg.insecureSkipVerify,
    )


def check_queries(queries: list[tuple[str, str | None]]) -> None:
    """RouterError naming the field of the first query template with a placeholder outside the fixed set."""
    for field, query in queries:
        if query:
            try:
                check_template(query)
            except TemplateError as e:
                raise RouterError(field, str(e)) from e


METRIC_FIELDS = {"proportion": ("successes", "trials"), "mean": ("count", "sum", "sumSquares")}


def read_counts(
    metric: Any, provider: MetricProvider, values: dict[str, str]
) -> tuple[stats.ProportionData | stats.MeanData | None, Result | None]:
    """Cumulative counts of a proportion (successes, trials) or mean (count, sum, sumSquares) metric.

    ``metric`` is a rollout comparison or an experiment's primary metric (same query fields).
    Returns the data, or the measurement problem (error or NaN) that prevented reading it.
    """
    nums: list[float] = []
    for f in METRIC_FIELDS[metric.type]:
        r = provider.query(render(getattr(metric, f), values))
        if r.outcome == "noData":  # a counter that never moved reads as zero events
            r = Result("value", 0.0)
        if not r.ok or r.value is None:
            return None, Result(r.outcome, message=f"{f}: {r.message or r.outcome}")
        nums.append(max(0.0, r.value))
    if metric.type == "proportion":
        successes, trials = nums
        return stats.ProportionData(min(successes, trials), trials), None
    count, total, squares = nums
    if count <= 0:
        return stats.MeanData(0.0, 0.0, 0.0), None
    # increase() extrapolates each counter on its own: keep the sums consistent with one sample.
    return stats.MeanData(count, total, max(squares, total * total / count)), None


def validation_message(err: ValidationError) -> str:
    """The first pydantic error as 'spec.a.b: message'."""
    parts = []
    for e in err.errors()[:3]:
        loc = ".".join(str(p) for p in e["loc"])
        parts.append(f"spec.{loc}: {e['msg']}")
    return "; ".join(parts)


SpecT = TypeVar("SpecT", bound=ResourceSpec)
StatusT = TypeVar("StatusT", bound=ResourceStatus)


class Controller(Generic[SpecT, StatusT]):
    """Per-object loop shared by the resource handlers; subclasses supply the kind-specific hooks.

    Kopf calls :func:`wake` every half second with the object as its watch last saw it; only when
    a tick is due (the analysis interval passed, or the generation or an action annotation changed)
    is the object read fresh and a tick (measure, decide, apply) run. All decision state lives in
    the object's status, so this holds only timing.
    """

    kind = ""
    plural = ""
    phases: tuple[str, ...] = ()
    terminal: tuple[str, ...] = ()
    annotations: tuple[str, ...] = ()

    def __init__(self, namespace: str, name: str) -> None:
        self.namespace, self.name = namespace, name
        self.logger = logging.getLogger(f"model_rollouts.{self.kind.lower()}")
        self._last_key: tuple[Any, ...] | None = None
        self._last_tick = 0.0

    def due(self, obj: Mapping[str, Any]) -> bool:
        meta = obj["metadata"]
        key = (
            meta.get("generation"),
            tuple((meta.get("annotations") or {}).get(a) for a in self.annotations),
        )
        if key != self._last_key:
            self._last_key = key
            return True
        try:
            interval = parse_duration(obj["spec"]["analysis"]["interval"])
        except (KeyError, TypeError, ValueError):
            interval = 30.0
        if (obj.get("status") or {}).get("phase") in self.terminal:
            interval = max(interval, 60.0)  # only re-assert weights
        return time.monotonic() - self._last_tick >= interval

    spec_model: type[SpecT]
    status_model: type[StatusT]

    # -- hooks --------------------------------------------------------------------------------------
    def problem(self, spec: SpecT) -> str | None:
        """A semantic problem the schema cannot express, naming the field; None if there is none."""
        return None

    def queries(self, spec: SpecT) -> list[tuple[str, str | None]]:
        """(field, PromQL template) pairs to check for unknown placeholders."""
        raise NotImplementedError

    def services(self, spec: SpecT) -> list[str]:
        """The Services the router must be able to weight."""
        raise NotImplementedError

    def decide(
        self,
        spec: SpecT,
        status: StatusT,
        provider: MetricProvider,
        now: dt.datetime,
        generation: int,
        annotations: dict[str, str],
    ) -> tuple[StatusT, list[object]]:
        """Measure if the engine needs it, then ask the engine: the new status and its actions."""
        raise NotImplementedError

    def weights(self, spec: SpecT, status: StatusT) -> tuple[dict[str, int], dict[str, int]] | None:
        """(weights per Service, the same per variant label) that the route must show, or None."""
        raise NotImplementedError

    # -- the tick -----------------------------------------------------------------------------------
    def tick(self, obj: dict[str, Any]) -> None:
        """Validate, measure, decide, apply. An unusable spec gives Valid=False and no traffic change."""
        t0 = time.monotonic()
        meta = obj["metadata"]
        generation = int(meta.get("generation") or 0)
        status = self.status_model.model_validate(
            {k: v for k, v in (obj.get("status") or {}).items() if k != "kopf"}
        )
        now_ = now()
        try:
            spec = self.spec_model.model_validate(obj["spec"])
        except ValidationError as e:
            return self.apply(obj, *invalid_status(status, validation_message(e), now_, generation))
        problem = self.problem(spec)
        if problem:
            return self.apply(obj, *invalid_status(status, problem, now_, generation))
        try:
            check_queries(self.queries(spec))
            router = make_router(spec.trafficRouting, self.namespace)
            router.check(self.services(spec))
            provider = make_provider(spec.analysis.prometheus, self.namespace)
        except RouterError as e:
            return self.apply(obj, *invalid_status(status, str(e), now_, generation))
        new, actions = self.decide(spec, status, provider, now_, generation, meta.get("annotations") or {})
        route = self.weights(spec, new)
        self.apply(obj, new, actions, router, *(route or (None, None)))
        telemetry.ANALYSIS_SECONDS.labels(self.kind).observe(time.monotonic() - t0)

    def count_errors(self, results: Iterable[Result]) -> None:
        errors = sum(1 for r in results if r.outcome == "error")
        if errors:
            telemetry.MEASUREMENT_ERRORS.labels(self.kind, self.namespace, self.name).inc(errors)

    def wake(self, seen: Mapping[str, Any]) -> None:
        try:
            if seen["metadata"].get("deletionTimestamp") or not self.due(seen):
                return
            obj = get_object(self.plural, self.namespace, self.name)
            if obj is None or obj["metadata"].get("deletionTimestamp"):
                return
            self._last_tick = time.monotonic()
            self.tick(obj)
        except Exception:
            self.logger.exception("%s/%s: tick failed; retrying", self.namespace, self.name)
            self._last_key = None

    def apply(
        self,
        obj: dict[str, Any],
        status: ResourceStatus,
        actions: Iterable[object],
        router: TrafficRouter | None = None,
        weights: dict[str, int] | None = None,
        labels: dict[str, int] | None = None,
    ) -> None:
        """Status first (the record), then make the route match it, then Events.

        ``weights`` are per Service for the router; ``labels`` the same weights per variant label for
        the operator's own metrics. A conflict on the status write skips the rest: the next wake-up
        reads the object again and decides afresh.
        """
        if not write_status(self.plural, obj, dump(status)):
            self._last_key = None
            return
        if router is not None and weights is not None:
            router.set_weights(weights)  # patches only weights that differ
            for label, w in (labels or {}).items():
                telemetry.WEIGHT.labels(self.kind, self.namespace, self.name, label).set(w)
        for e in actions:
            if not isinstance(e, Event):
                continue
            post_event(obj, e.type, e.reason, e.message)
            telemetry.DECISIONS.labels(self.kind, self.namespace, self.name, e.reason).inc()
            log = self.logger.warning if e.type == "Warning" else self.logger.info
            log("%s/%s %s: %s", self.namespace, self.name, e.reason, e.message)
        telemetry.set_phase(self.kind, self.namespace, self.name, status.phase, self.phases)
