"""The whole local stack in one object: control plane, CRDs, model servers, Prometheus, traffic, operator.

Used by the integration tests and by ``make demo``. Everything listens on 127.0.0.1 and is
stopped by :meth:`Stack.close`, also when a test fails.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.harness.cluster import (
    ControlPlane,
    gateway_api_crds,
    install_crds,
    istio_crds,
    kubectl_apply,
    project_crds,
)
from tests.harness.loadgen import LoadGenerator
from tests.harness.modelserver import ModelServerProcess
from tests.harness.procs import REPO, free_port, spawn, stop_proc
from tests.harness.prom import Prometheus, Target

GROUP, VERSION = "mlrollouts.io", "v1alpha1"


#: The annotation by which an HTTPRoute lets named rollouts/experiments set its weights.
MANAGED_BY = "mlrollouts.io/managed-by"


def httproute(
    name: str, namespace: str, weights: dict[str, int], managed_by: str | None = "*"
) -> dict[str, Any]:
    """An HTTPRoute; ``managed_by`` is its opt-in (``*``: any rollout/experiment here; None: none)."""
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if managed_by is not None:
        meta["annotations"] = {MANAGED_BY: managed_by}
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": meta,
        "spec": {
            "parentRefs": [{"name": "gateway"}],
            "rules": [
                {"backendRefs": [{"name": svc, "port": 80, "weight": w} for svc, w in weights.items()]}
            ],
        },
    }


@dataclass
class Stack:
    """``variants`` maps a Service name to its model server's settings (error_rate, positive_rate, ...)."""

    variants: dict[str, dict[str, float]]
    namespace: str = "ml"
    route: str = "model"
    #: The stack route's opt-in annotation (who may set its weights).
    route_managed_by: str | None = "*"
    initial_weights: dict[str, int] | None = None
    rps: float = 40.0
    max_seconds: float = 900.0
    #: Prometheus rules files (e.g. dashboards/alerts.rules.yaml) the stack's Prometheus evaluates.
    prometheus_rules: list[Path] = field(default_factory=list)
    controller_manager: bool = False
    #: How often Prometheus scrapes the operator's /metrics (the chart's ServiceMonitor default is
    #: 30s; tests read the operator's series within seconds, so 1s unless a benchmark says otherwise).
    operator_scrape_interval: str = "1s"
    #: Also install Istio's CRDs (VirtualService, DestinationRule, ...): about 5 s more at start.
    istio: bool = False
    cluster: ControlPlane = field(default_factory=ControlPlane)
    servers: dict[str, ModelServerProcess] = field(default_factory=dict)
    prom: Prometheus | None = None
    loadgen: LoadGenerator | None = None
    operator: subprocess.Popen[bytes] | None = None
    operator_metrics_port: int = 0
    operator_kubeconfig: Path = Path()
    workdir: Path | None = None
    api: Any = None

    def start(self) -> Stack:
        try:
            self.cluster.controller_manager = self.controller_manager
            self.cluster.start()
            self.workdir = self.cluster.workdir
            self.api = self.cluster.api_client()
            tenancy_crds = sorted((REPO / "crds" / "tenancy").glob("*.yaml"))
            extra = istio_crds() if self.istio else []
            install_crds(self.api, gateway_api_crds() + extra + project_crds() + tenancy_crds)
            from kubernetes import client

            client.CoreV1Api(self.api).create_namespace(client.V1Namespace(metadata={"name": self.namespace}))
            self.operator_kubeconfig = self._service_account_kubeconfig()
            for svc, params in self.variants.items():
                self.servers[svc] = ModelServerProcess(variant=svc, **params).start()  # type: ignore[arg-type]
            self.operator_metrics_port = free_port()
            targets = [
                Target("model", f"127.0.0.1:{s.port}", {"service": svc, "namespace": self.namespace})
                for svc, s in self.servers.items()
            ]
            targets.append(
                Target(
                    "model-rollouts",
                    f"127.0.0.1:{self.operator_metrics_port}",
                    scrape_interval=self.operator_scrape_interval,
                )
            )
            assert self.workdir is not None
            self.prom = Prometheus(
                targets, workdir=self.workdir / "prometheus", rule_files=self.prometheus_rules
            ).start()
            weights = self.initial_weights or {
                svc: (100 if i == 0 else 0) for i, svc in enumerate(self.variants)
            }
            kubectl_apply(self.api, [httproute(self.route, self.namespace, weights, self.route_managed_by)])
            self.loadgen = LoadGenerator(
                api=self.api,
                namespace=self.namespace,
                httproute=self.route,
                backends={svc: s.url for svc, s in self.servers.items()},
                rps=self.rps,
                max_seconds=self.max_seconds,
                max_requests=int(self.rps * self.max_seconds) + 1,
            )
            self.loadgen.start()
        except BaseException:
            self.close()
            raise
        return self

    def _service_account_kubeconfig(self) -> Path:
        """Apply manifests/rbac.yaml (from the chart) and run the operator with its ServiceAccount token."""
        import yaml
        from kubernetes import client

        from tests.harness.cluster import write_kubeconfig

        docs = [d for d in yaml.safe_load_all((REPO / "manifests" / "rbac.yaml").read_text()) if d]
        kubectl_apply(self.api, docs)
        sa = next(d for d in docs if d["kind"] == "ServiceAccount")["metadata"]
        token = (
            client.CoreV1Api(self.api)
            .create_namespaced_service_account_token(
                sa["name"],
                sa["namespace"],
                client.AuthenticationV1TokenRequest(
                    spec=client.V1TokenRequestSpec(
                        audiences=[self.cluster.server], expiration_seconds=4 * 3600
                    )
                ),
            )
            .status.token
        )
        assert self.workdir is not None
        path = self.workdir / "operator.kubeconfig"
        write_kubeconfig(path, self.cluster.server, self.workdir / "pki" / "ca.crt", token)
        return path

    # -- operator process -------------------------------------------------------------------------
    def start_operator(
        self, extra_args: list[str] | None = None, log_name: str = "operator.log", allow_inline: bool = True
    ) -> subprocess.Popen[bytes]:
        """Start the operator as its ServiceAccount; the first one started is ``self.operator``.

        Leader election runs as in production (a Lease in the operator's namespace), with a short
        lease so takeover tests stay quick. ``allow_inline=False`` leaves out the harness's
        ``--allowed-provider-address`` for its Prometheus: the empty allowlist of a default install.
        """
        assert self.workdir is not None
        env = {**os.environ, "KUBECONFIG": str(self.operator_kubeconfig), "PYTHONUNBUFFERED": "1"}
        proc = spawn(
            [
                sys.executable,
                "-m",
                "model_rollouts.main",
                "--namespace",
                self.namespace,
                "--metrics-port",
                str(self.operator_metrics_port if self.operator is None else 0),
                "--metrics-address",
                "127.0.0.1",
                "--liveness",
                "",
                "--leader-election-namespace",
                "model-rollouts",
                "--leader-election-lease-duration",
                "6",
                "--leader-election-retry-period",
                "1",
                # Tenants' inline analysis.prometheus may name the stack's Prometheus (and only it).
                *(
                    ["--allowed-provider-address", re.escape(self.prom.url)]
                    if self.prom is not None and allow_inline
                    else []
                ),
                *(extra_args or []),
            ],
            self.workdir / log_name,
            env=env,
            cwd=REPO,
        )
        if self.operator is None:
            self.operator = proc
        return proc

    def stop_operator(self, kill: bool = False) -> None:
        if self.operator is None:
            return
        if kill:
            self.operator.kill()
            self.operator.wait(timeout=10)
        else:
            stop_proc(self.operator, grace=10)
        self.operator = None

    def operator_log(self) -> str:
        log = (self.workdir or Path("/nonexistent")) / "operator.log"
        return log.read_text(errors="replace") if log.exists() else ""

    # -- objects ----------------------------------------------------------------------------------
    def apply(self, doc: dict[str, Any]) -> None:
        doc.setdefault("metadata", {}).setdefault("namespace", self.namespace)
        kubectl_apply(self.api, [doc])

    def get(self, plural: str, name: str) -> dict[str, Any]:
        from kubernetes import client

        obj: dict[str, Any] = client.CustomObjectsApi(self.api).get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, plural, name
        )
        return obj

    def annotate(self, plural: str, name: str, annotations: dict[str, str]) -> None:
        from kubernetes import client

        client.CustomObjectsApi(self.api).patch_namespaced_custom_object(
            GROUP, VERSION, self.namespace, plural, name, {"metadata": {"annotations": annotations}}
        )

    def route_weights(self) -> dict[str, int]:
        from kubernetes import client

        route = client.CustomObjectsApi(self.api).get_namespaced_custom_object(
            "gateway.networking.k8s.io", "v1", self.namespace, "httproutes", self.route
        )
        return {r["name"]: int(r.get("weight", 1)) for r in route["spec"]["rules"][0]["backendRefs"]}

    def wait_route(self, expected: dict[str, int], timeout: float = 10.0) -> dict[str, int]:
        """Wait until the HTTPRoute shows ``expected`` weights (the operator writes status, then weights)."""
        deadline = time.monotonic() + timeout
        weights = self.route_weights()
        while any(weights.get(k) != v for k, v in expected.items()):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"HTTPRoute weights {weights}, expected {expected} within {timeout:.0f}s"
                )
            time.sleep(0.1)
            weights = self.route_weights()
        return weights

    def wait_for(
        self,
        plural: str,
        name: str,
        predicate: Callable[[dict[str, Any]], bool],
        timeout: float,
        on_poll: Callable[[dict[str, Any]], None] | None = None,
        poll: float = 0.5,
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        obj: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                obj = self.get(plural, name)
            except Exception:
                obj = {}
            if on_poll and obj:
                on_poll(obj)
            if obj and predicate(obj):
                return obj
            time.sleep(poll)
        raise TimeoutError(
            f"{plural}/{name} did not reach the expected state in {timeout:.0f}s; "
            f"status={obj.get('status')}\n--- operator log tail ---\n"
            + "\n".join(self.operator_log().splitlines()[-40:])
        )

    def close(self) -> None:
        """Stop the operator, the traffic, the model servers and Prometheus at once (each waits for its
        own process), then the control plane; the first error, if any, after everything stopped."""
        from concurrent.futures import ThreadPoolExecutor

        stops: list[Callable[[], object]] = [self.stop_operator]
        if self.loadgen is not None:
            stops.append(self.loadgen.stop)
        stops += [s.stop for s in self.servers.values()]
        if self.prom is not None:
            stops.append(self.prom.close)
        with ThreadPoolExecutor(max_workers=len(stops)) as pool:
            futures = [pool.submit(stop) for stop in stops]
        self.cluster.stop()
        errors = [e for f in futures if (e := f.exception()) is not None]
        if errors:
            raise errors[0]

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class WeightRecorder:
    """Records every distinct candidate weight the API server shows, in order."""

    def __init__(self, stack: Stack, service: str) -> None:
        self.stack, self.service, self.seen = stack, service, []  # type: ignore[var-annotated]

    def poll(self, _obj: dict[str, Any] | None = None) -> None:
        w = self.stack.route_weights().get(self.service)
        if w is not None and (not self.seen or self.seen[-1] != w):
            self.seen.append(w)
