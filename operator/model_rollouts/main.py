"""Entry point: ``model-rollouts [--namespace NS ...] [--metrics-port 8080]``."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import os
import re
from typing import Any, cast

import kopf
from prometheus_client import disable_created_metrics, start_http_server

from model_rollouts import __version__, health, kube, leader, policy, sharding
from model_rollouts.api.common import GROUP
from model_rollouts.metrics import prometheus
from model_rollouts.notify import sender as notify_sender
from model_rollouts.traffic import watched

#: Record attributes our decision log lines carry (``extra=``), copied into JSON lines.
_FIELDS = ("namespace", "object", "kind", "phase", "revision", "weight", "decision")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update({k: getattr(record, k) for k in _FIELDS if getattr(record, k, None) is not None})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


class NoDiffBaseStorage(kopf.DiffBaseStorage):
    """Kopf keeps no last-handled copy of our objects: nothing of ours needs one.

    Kopf stores the object's essence after each handled change so that on.create/on.update handlers
    get a diff. We register neither (the one scheduler reads every watch event, and the only Kopf
    handler on our kinds is the on.delete finalizer, which needs no diff), so the copy was pure cost:
    one status patch per created object (a tenth of the operator's requests while a thousand rollouts
    start) and a deep copy of the spec on every watch event. Without a stored essence Kopf sees each
    event as a creation with no handler to run, stores nothing, and sends nothing. A
    ``status.kopf.diffbase`` left by an older version is ignored.
    """

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return cast(kopf.BodyEssence, {})

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


#: Namespaces given with --namespace (empty: cluster-wide).
WATCHED_NAMESPACES: list[str] = []
#: The operator instance given with --instance ("" : the default instance, objects without the label).
INSTANCE: list[str] = [""]
#: The kinds a shard selects by label (every kind Kopf watches for us).
SHARDED_PLURALS = ("modelrollouts", "modelexperiments")


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Kopf's own bookkeeping goes to our status, never to the user's annotations.
    settings.persistence.progress_storage = kopf.StatusProgressStorage(field="status.kopf.progress")
    settings.persistence.diffbase_storage = NoDiffBaseStorage()
    settings.persistence.finalizer = "mlrollouts.io/finalizer"
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 60
    settings.networking.request_timeout = 30
    # Handlers run in this pool. A provider that stops answering holds at most one thread per address
    # (metrics/prometheus.py), so a few such providers cannot take every thread.
    settings.execution.max_workers = 32
    # A timer stopped because its object finished (its when= filter no longer matches) is usually still
    # in its last run. Kopf gives it a few zero-time loop cycles, then re-checks it 60 s later through
    # a dummy status patch of its own: a write without a change, once per finished object. Waiting up
    # to half a second (only this object's event processing waits) lets that last run end first.
    settings.background.instant_exit_timeout = 0.5
    # Routers read HTTPRoutes from the operator's watch (handlers/routes.py) instead of GETting them.
    watched.ROUTES.enabled = True
    # Watching only the given namespaces: do not try to list all namespaces (a 403 in that mode).
    settings.scanning.disabled = bool(WATCHED_NAMESPACES)
    # Sharding: the API server filters every list and watch by the instance label, so this replica
    # set never receives, caches or handles another instance's objects.
    selector = sharding.label_selector(INSTANCE[0])
    for plural in SHARDED_PLURALS:
        settings.watching.label_selectors[GROUP, plural] = selector
    logging.getLogger("model_rollouts").info(
        "instance %s: watching %s with the label selector %s",
        repr(INSTANCE[0]) if INSTANCE[0] else "(default)",
        ", ".join(WATCHED_NAMESPACES) or "all namespaces",
        selector,
    )


@kopf.on.startup()
async def remember_loop(**_: Any) -> None:
    """The liveness and readiness probes check that Kopf's event loop still answers."""
    health.PROBES.loop = asyncio.get_running_loop()


@kopf.on.cleanup()
def release_lease(**_: Any) -> None:
    health.PROBES.stopping.set()  # not ready from now on: the Lease goes back to a standby
    leader.ELECTOR.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="model-rollouts", description="The Model Rollouts operator.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=[],
        help="namespace to watch (repeatable); default: all namespaces",
    )
    parser.add_argument(
        "--instance",
        default="",
        metavar="NAME",
        help=f"act only on the ModelRollouts and ModelExperiments labelled {sharding.INSTANCE_LABEL}=NAME "
        "(selected by the API server), with its own Lease (the election id + '-NAME'); default: the "
        "default instance, which owns only the objects without that label",
    )
    parser.add_argument("--metrics-port", type=int, default=8080, help="port of /metrics; 0 disables")
    parser.add_argument("--metrics-address", default="0.0.0.0")
    parser.add_argument(
        "--liveness",
        default="http://0.0.0.0:8081/healthz",
        help="URL of the liveness probe; the readiness probe is served at /readyz on the same host and "
        "port (ready: the leader, or a standby that reaches the API server and can list what it "
        "watches); empty disables both",
    )
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="json: one JSON object per line; decisions carry namespace, name, revision, phase and weight",
    )
    parser.add_argument(
        "--leader-election",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="act only while holding a coordination.k8s.io Lease (one active replica); default on",
    )
    parser.add_argument(
        "--leader-election-namespace",
        default=os.environ.get("POD_NAMESPACE", "default"),
        help="namespace of the Lease (default: $POD_NAMESPACE, else default)",
    )
    parser.add_argument(
        "--leader-election-id",
        default="model-rollouts",
        help="name of the Lease (with --instance NAME: this name + '-NAME')",
    )
    parser.add_argument(
        "--leader-election-lease-duration",
        type=float,
        default=15.0,
        help="seconds a standby waits after the last renewal before taking over (default 15)",
    )
    parser.add_argument(
        "--leader-election-retry-period", type=float, default=2.0, help="seconds between renewals (default 2)"
    )
    parser.add_argument(
        "--allowed-provider-address",
        action="append",
        default=[],
        metavar="REGEX",
        help="a regular expression (matched against the whole address) for inline analysis.prometheus "
        "addresses that tenants may use, without credentials (repeatable); default: none, only the "
        "addresses of ClusterMetricProviders",
    )
    parser.add_argument(
        "--provider-secret-namespace",
        default=None,
        help="the only namespace ClusterMetricProvider Secrets are read from "
        "(default: $POD_NAMESPACE, else the leader-election namespace)",
    )
    parser.add_argument(
        "--allowed-notification-address",
        action="append",
        default=[],
        metavar="REGEX",
        help="a regular expression (matched against the whole URL) for inline ClusterNotificationProvider "
        "addresses (repeatable); default: none, only URLs kept in Secrets of the operator's namespace",
    )
    parser.add_argument(
        "--max-query-response-bytes",
        type=int,
        default=prometheus.MAX_RESPONSE_BYTES,
        metavar="BYTES",
        help="largest Prometheus query response read (decompressed; a longer one is refused while it "
        f"streams in, a failed measurement); default {prometheus.MAX_RESPONSE_BYTES}",
    )
    parser.add_argument(
        "--kube-api-qps",
        type=float,
        default=kube.client.QPS,
        help="average Kubernetes API requests per second the operator's reconciles may send (a token "
        f"bucket; leader election and probes are outside it; 0: no limit); default {kube.client.QPS:g}",
    )
    parser.add_argument(
        "--kube-api-burst",
        type=int,
        default=kube.client.BURST,
        help=f"requests the operator may send at once above --kube-api-qps; default {kube.client.BURST}",
    )
    args = parser.parse_args(argv)
    problem = sharding.validate_instance(args.instance)
    if problem:
        parser.error(f"--instance: {problem}")
    if args.kube_api_qps < 0:
        parser.error("--kube-api-qps: at least 0 (0: no limit)")
    if args.kube_api_burst < 1:
        parser.error("--kube-api-burst: at least 1")
    kube.configure_rate(args.kube_api_qps, args.kube_api_burst)
    if args.max_query_response_bytes < 1024:
        parser.error("--max-query-response-bytes: at least 1024")
    prometheus.MAX_RESPONSE_BYTES = args.max_query_response_bytes
    own = args.provider_secret_namespace or os.environ.get("POD_NAMESPACE") or args.leader_election_namespace
    try:
        policy.configure(args.allowed_provider_address, own)
    except re.error as e:
        parser.error(f"--allowed-provider-address: invalid regular expression ({e})")
    try:
        notify_sender.configure(args.allowed_notification_address)
    except re.error as e:
        parser.error(f"--allowed-notification-address: invalid regular expression ({e})")
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter()
        if args.log_format == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, handlers=[handler])
    # Kopf reports every timer run at INFO; our own decisions are logged under model_rollouts.
    logging.getLogger("kopf.objects").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    WATCHED_NAMESPACES[:] = args.namespace
    INSTANCE[0] = args.instance
    if args.metrics_port:
        # No `_created` sample beside every counter's `_total`: nothing reads them, and at a thousand
        # objects they were a sixth of what each scrape rendered.
        disable_created_metrics()
        start_http_server(args.metrics_port, addr=args.metrics_address)
    from model_rollouts.handlers import experiment, providers, rollout, routes, shards  # noqa: F401  (registers the handlers)

    providers.register(kube.api, list(args.namespace))  # the provider and template watches RBAC allows

    if args.leader_election:
        leader.ELECTOR = leader.Elector(
            kube.api_unlimited(),  # a burst of reconcile requests never delays a renewal
            args.leader_election_namespace,
            sharding.lease_name(args.leader_election_id, args.instance),
            lease_seconds=args.leader_election_lease_duration,
            retry_seconds=args.leader_election_retry_period,
        )
    leader.ELECTOR.start()
    if args.liveness:  # the probes; their list check runs only when someone can ask for it
        try:
            health.serve(args.liveness)
        except ValueError as e:
            parser.error(f"--liveness: {e}")
        health.PROBES.list_check = health.list_check(kube.api_unlimited(), list(args.namespace))
        health.PROBES.start_list_checks()

    kopf.run(
        standalone=True,
        namespaces=list(args.namespace),
        clusterwide=not args.namespace,
        ready_flag=health.PROBES.started,
    )


if __name__ == "__main__":
    main()
