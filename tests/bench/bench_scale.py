"""``make bench-scale N=1000``: what N rollouts cost the operator, the API server and Prometheus.

On the real stack (kube-apiserver + etcd, Prometheus, model servers, the operator as its own process
under its ServiceAccount), for N ModelRollouts, each with its own HTTPRoute, interval 30 s, one
guardrail and one comparison, held at a manual gate (``pause: {}``) after their first weight:

1. idle: the operator's CPU with no object (the figure "after delete" should come back to);
2. apply all N (8 clients in parallel, ``--apply-clients``), wait until all reach their first gate
   (phase Paused at the first weight: one analysis after their start);
3. active window: the operator's CPU-s/min (``/proc/PID/stat`` utime+stime) and RSS, the API
   requests/min of the operator's user by verb and resource (the API server's audit log), its
   writes/min, Prometheus queries/min (Prometheus's own ``prometheus_http_requests_total`` of
   ``/api/v1/query`` and ``query_range``), the API server's CPU, and the p95 of the gaps between an
   object's consecutive ``status.lastAnalysisTime`` values;
4. probe: one more rollout at a 5 s interval: apply -> its candidate's weight on the route, and
   breach -> route weight 0 (timed from the moment the guardrail query, polled every 0.2 s against
   the same Prometheus, shows the breach; the time from the ``/admin`` call is printed too);
5. abort all N (the ``mlrollouts.io/abort`` annotation), wait until all are Aborted, then a window;
6. delete them all, wait ``--settle`` seconds (60), then a window, and count the per-object series
   still on the operator's ``/metrics``.

Prometheus scrapes the operator's ``/metrics`` every 30 s, the chart's ServiceMonitor default
(``--operator-scrape-interval``; the test suite's 1 s would render every per-object series 30 times as
often). Human-readable lines go first; the last stdout line is the JSON of issue 18. Everything is bounded by
``--max-minutes``; a phase the budget cut short reports ``null``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

GROUP, VERSION, PLURAL = "mlrollouts.io", "v1alpha1", "modelrollouts"
GATEWAY = ("gateway.networking.k8s.io", "v1", "httproutes")
#: The operator's ServiceAccount (manifests/rbac.yaml): the user whose requests are counted.
OPERATOR_USER = "system:serviceaccount:model-rollouts:model-rollouts"
WRITE_VERBS = frozenset({"create", "update", "patch", "delete", "deletecollection"})
QUERY_HANDLERS = ("/api/v1/query", "/api/v1/query_range")
STABLE, CANDIDATE, PROBE = "scale-v1", "scale-v2", "probe-v2"
PROBE_ROUTE, PROBE_NAME = "probe", "probe"
FIRST_WEIGHT, PROBE_WEIGHT = 10, 20
ABORT_ANNOTATION = "mlrollouts.io/abort"
#: charts/model-rollouts/values.yaml leaderElection.leaseDuration and retryPeriod.
LEADER_ELECTION_DEFAULTS = ["--leader-election-lease-duration", "15", "--leader-election-retry-period", "2"]


# -- pure parts (tests/unit/test_bench_scale.py) ---------------------------------------------------
def proc_cpu_seconds(stat: str, clock_ticks: int) -> float:
    """utime + stime of a ``/proc/PID/stat`` line, in seconds (the name in parentheses may hold spaces)."""
    fields = stat[stat.rindex(")") + 2 :].split()
    # After the name: state is field 3 of the man page; utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / clock_ticks


def rss_mib(status: str) -> float:
    """VmRSS of a ``/proc/PID/status`` text, in MiB."""
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise ValueError("no VmRSS line")


def p95(values: Iterable[float]) -> float | None:
    """Nearest-rank 95th percentile; None for no values."""
    xs = sorted(values)
    if not xs:
        return None
    return xs[max(0, math.ceil(0.95 * len(xs)) - 1)]


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def analysis_gaps(times: Mapping[str, Iterable[datetime]]) -> list[float]:
    """Seconds between each object's consecutive distinct analysis times."""
    gaps: list[float] = []
    for seen in times.values():
        ordered = sorted(set(seen))
        gaps += [(b - a).total_seconds() for a, b in itertools.pairwise(ordered)]
    return gaps


@dataclass
class Requests:
    """API requests of one user in a time window, from audit events."""

    total: int = 0
    writes: int = 0
    by_verb: Counter[str] = field(default_factory=Counter)
    #: "verb resource[/subresource]" -> count
    by_call: Counter[str] = field(default_factory=Counter)
    #: HTTP code (not 2xx) -> count
    failed: Counter[int] = field(default_factory=Counter)


def count_requests(
    events: Iterable[Mapping[str, Any]], user: str, start: datetime, end: datetime
) -> Requests:
    """Count ``user``'s requests received in [start, end) by verb and call.

    A request is counted once: a watch at ``ResponseStarted`` (its ``ResponseComplete`` comes when it
    ends), anything else at ``ResponseComplete`` (or ``Panic``).
    """
    out = Requests()
    for ev in events:
        if (ev.get("user") or {}).get("username") != user:
            continue
        verb = str(ev.get("verb", ""))
        stage = ev.get("stage")
        if stage != ("ResponseStarted" if verb == "watch" else "ResponseComplete") and stage != "Panic":
            continue
        received = ev.get("requestReceivedTimestamp")
        if not received or not start <= parse_time(received) < end:
            continue
        ref = ev.get("objectRef") or {}
        resource = str(ref.get("resource") or ev.get("requestURI", "?"))
        if ref.get("subresource"):
            resource += "/" + str(ref["subresource"])
        out.total += 1
        out.writes += verb in WRITE_VERBS
        out.by_verb[verb] += 1
        out.by_call[f"{verb} {resource}"] += 1
        code = int((ev.get("responseStatus") or {}).get("code") or 0)
        if code and not 200 <= code < 300:
            out.failed[code] += 1
    return out


def audit_events(log: Path) -> Iterator[dict[str, Any]]:
    """Stream the events of an audit log and of its rotated files (``audit-<time>.log``), oldest first.

    Streaming: at N=1000 the log grows by tens of MB a minute and is rotated at 200 MB.
    """
    for path in sorted(log.parent.glob(f"{log.stem}*{log.suffix}")):
        with path.open(errors="replace") as f:
            for line in f:
                try:
                    yield json.loads(line)
                except ValueError:
                    continue  # a line being written


def prometheus_queries(metrics_text: str) -> float:
    """Queries Prometheus has answered (``/api/v1/query`` and ``query_range``), from its own /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(metrics_text):
        if family.name != "prometheus_http_requests":
            continue
        for s in family.samples:
            if s.name == "prometheus_http_requests_total" and s.labels.get("handler") in QUERY_HANDLERS:
                total += s.value
    return total


def series_left(metrics_text: str, namespace: str, names: Iterable[str]) -> int:
    """Series on the operator's /metrics that belong to one of the named objects (labels namespace, name)."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = set(names)
    return sum(
        1
        for family in text_string_to_metric_families(metrics_text)
        for s in family.samples
        if s.labels.get("namespace") == namespace and s.labels.get("name") in wanted
    )


def per_minute(count: float | None, seconds: float) -> float | None:
    return None if count is None or seconds <= 0 else round(count * 60 / seconds, 2)


def result(
    n: int,
    interval_s: int,
    active: Mapping[str, float | None],
    probe: Mapping[str, float | None],
    gap_p95_s: float | None,
    finished: Mapping[str, float | None],
    after_delete: Mapping[str, float | None],
    start: Mapping[str, float | None] | None = None,
) -> dict[str, Any]:
    """The JSON of issue 18, keys in its order; then ``start`` (applying all N until all are at their
    first gate: seconds, and the API server's and the operator's CPU in cores meanwhile)."""
    out = {
        "n": n,
        "interval_s": interval_s,
        "active": {
            k: active.get(k)
            for k in (
                "cpu_s_per_min",
                "rss_mib",
                "api_requests_per_min",
                "api_writes_per_min",
                "queries_per_min",
            )
        },
        "probe": {k: probe.get(k) for k in ("interval_s", "apply_to_first_weight_s", "breach_to_zero_s")},
        "analysis_gap_p95_s": gap_p95_s,
        "finished": {k: finished.get(k) for k in ("cpu_s_per_min", "api_requests_per_min")},
        "after_delete": {k: after_delete.get(k) for k in ("cpu_s_per_min", "series_left")},
    }
    if start is not None:
        keys = ("applied_s", "all_at_first_gate_s", "apiserver_cores", "operator_cores")
        out["start"] = {k: start.get(k) for k in keys}
    return out


# -- the real stack --------------------------------------------------------------------------------
def _read(path: str) -> str:
    return Path(path).read_text()


def cpu_of(pid: int) -> float:
    return proc_cpu_seconds(_read(f"/proc/{pid}/stat"), os.sysconf("SC_CLK_TCK"))


def _http(url: str, timeout: float = 5) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return str(r.read().decode())


def now_utc() -> datetime:
    return datetime.now(UTC)


class Budget:
    """The --max-minutes budget: every wait is cut to what is left."""

    def __init__(self, minutes: float) -> None:
        self.end = time.monotonic() + minutes * 60

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def sleep(self, seconds: float) -> bool:
        """Sleep ``seconds`` if the budget allows (False: it does not, nothing slept)."""
        if seconds > self.left():
            return False
        time.sleep(seconds)
        return True

    def wait(self, check: Callable[[], bool], timeout: float, poll: float = 0.5) -> bool:
        deadline = time.monotonic() + min(timeout, self.left())
        while not check():
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll)
        return True


class Watcher:
    """Every ModelRollout's phase, weight and analysis times, from a watch (admin user, not counted)."""

    def __init__(self, api: Any, namespace: str) -> None:
        self.api, self.namespace = api, namespace
        self.lock = threading.Lock()
        self.objects: dict[str, dict[str, Any]] = {}
        self.analysis_times: dict[str, list[tuple[float, datetime]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Watcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _record(self, kind: str, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        st = obj.get("status") or {}
        with self.lock:
            if kind == "DELETED":
                self.objects.pop(name, None)
                return
            self.objects[name] = {"phase": st.get("phase"), "weight": st.get("weight")}
            t = st.get("lastAnalysisTime")
            if t:
                seen = self.analysis_times.setdefault(name, [])
                at = parse_time(t)
                if not seen or seen[-1][1] != at:
                    seen.append((time.time(), at))

    def _run(self) -> None:
        from kubernetes import client, watch

        co = client.CustomObjectsApi(self.api)
        while not self._stop.is_set():
            try:
                listed: Any = co.list_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL)
                with self.lock:
                    self.objects.clear()
                for obj in listed["items"]:
                    self._record("ADDED", obj)
                rv = listed["metadata"]["resourceVersion"]
                w = watch.Watch()
                for ev in w.stream(
                    co.list_namespaced_custom_object,
                    GROUP,
                    VERSION,
                    self.namespace,
                    PLURAL,
                    resource_version=rv,
                    timeout_seconds=60,
                ):
                    if self._stop.is_set():
                        w.stop()
                        break
                    if ev["type"] in ("ADDED", "MODIFIED", "DELETED"):
                        self._record(ev["type"], ev["object"])
            except Exception:
                time.sleep(1)

    def count(self, pred: Callable[[dict[str, Any]], bool], names: Iterable[str]) -> int:
        with self.lock:
            return sum(1 for n in names if n in self.objects and pred(self.objects[n]))

    def times_between(self, names: Iterable[str], start: float, end: float) -> dict[str, list[datetime]]:
        """Each object's analysis times first seen in [start, end] (wall clock), after the last one
        seen before ``start`` (so the first gap in the window counts too)."""
        with self.lock:
            out = {}
            for n in names:
                seen = self.analysis_times.get(n, [])
                before = [at for seen_at, at in seen if seen_at < start][-1:]
                out[n] = before + [at for seen_at, at in seen if start <= seen_at <= end]
            return out


def scale_objects(i: int, namespace: str, prom: str, interval: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Object ``i``: its HTTPRoute and its ModelRollout (guardrail + comparison, manual gate after 10%)."""
    from tests.harness.objects import COMPARISON, guardrail, rollout
    from tests.harness.stack import httproute

    name = f"scale-{i}"
    route = httproute(name, namespace, {STABLE: 100, CANDIDATE: 0})
    doc = rollout(
        name,
        prom,
        [{"setWeight": FIRST_WEIGHT}, {"pause": {}}],
        stable=STABLE,
        candidate={"service": CANDIDATE, "modelVersion": "2.0"},
        route=name,
        analysis={
            "interval": f"{interval}s",
            "window": "1m",
            "guardrails": [guardrail(failure_limit=2)],
            "comparisons": [dict(COMPARISON)],
        },
    )
    doc["metadata"]["namespace"] = namespace
    return route, doc


@dataclass
class Window:
    """CPU of the operator and the API server, audit requests and Prometheus queries over a window."""

    seconds: float
    operator_cpu_s_per_min: float
    apiserver_cpu_s_per_min: float
    requests: Requests
    queries: float | None

    def line(self, label: str) -> str:
        m = self.seconds / 60
        top = ", ".join(f"{c} {v / m:.1f}" for c, v in self.requests.by_call.most_common(12))
        failed = dict(self.requests.failed)
        return (
            f"{label}: {self.seconds:.0f}s window; operator {self.operator_cpu_s_per_min:.2f} CPU-s/min, "
            f"API server {self.apiserver_cpu_s_per_min:.2f} CPU-s/min; operator API requests "
            f"{self.requests.total / m:.1f}/min (writes {self.requests.writes / m:.1f}/min"
            + (f", failed {failed}" if failed else "")
            + f"); by verb/min { ({k: round(v / m, 1) for k, v in self.requests.by_verb.most_common()}) }; "
            f"top calls/min: {top}; Prometheus queries "
            + (f"{self.queries * 60 / self.seconds:.1f}/min" if self.queries is not None else "n/a")
        )


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.budget = Budget(args.max_minutes)
        self.names = [f"scale-{i}" for i in range(args.n)]
        self.start: dict[str, float | None] | None = None

    def measure(self, seconds: float) -> Window | None:
        """A window of ``seconds`` (None if the budget does not allow it)."""
        s = self.stack
        op, apiserver = s.operator.pid, s.cluster.pids["kube-apiserver"]
        if seconds > self.budget.left():
            return None
        q0 = self._queries()
        c0, a0, t0, w0 = cpu_of(op), cpu_of(apiserver), time.monotonic(), now_utc()
        time.sleep(seconds)
        c1, a1, t1, w1 = cpu_of(op), cpu_of(apiserver), time.monotonic(), now_utc()
        q1 = self._queries()
        time.sleep(1.5)  # the audit backend writes an event after the response
        assert s.cluster.audit_log is not None
        reqs = count_requests(audit_events(s.cluster.audit_log), OPERATOR_USER, w0, w1)
        dt = t1 - t0
        return Window(
            seconds=dt,
            operator_cpu_s_per_min=(c1 - c0) * 60 / dt,
            apiserver_cpu_s_per_min=(a1 - a0) * 60 / dt,
            requests=reqs,
            queries=(q1 - q0) if q0 is not None and q1 is not None else None,
        )

    def _queries(self) -> float | None:
        try:
            return prometheus_queries(_http(self.stack.prom.url + "/metrics"))
        except Exception:
            return None

    def operator_metrics(self) -> str:
        return _http(f"http://127.0.0.1:{self.stack.operator_metrics_port}/metrics")

    def run(self) -> dict[str, Any]:
        from kubernetes import client

        from tests.harness.cluster import ControlPlane
        from tests.harness.loadgen import LoadGenerator
        from tests.harness.stack import Stack

        a = self.args
        cluster = ControlPlane(
            audit=True, audit_rules=[{"level": "Metadata", "users": [OPERATOR_USER]}, {"level": "None"}]
        )
        with Stack(
            variants={
                STABLE: {"error_rate": 0.0},
                CANDIDATE: {"error_rate": 0.0},
                PROBE: {"error_rate": 0.0},
            },
            route=PROBE_ROUTE,
            initial_weights={STABLE: 100, PROBE: 0},
            rps=a.rps,
            max_seconds=a.max_minutes * 60 + 60,
            cluster=cluster,
            operator_scrape_interval=a.operator_scrape_interval,
        ) as s:
            self.stack = s
            assert s.prom is not None
            # Traffic for the N objects' candidate too: a second "gateway" on scale-0's route.
            route0, _ = scale_objects(0, s.namespace, s.prom.url, a.interval)
            co = client.CustomObjectsApi(s.api)
            co.create_namespaced_custom_object(*GATEWAY[:2], s.namespace, GATEWAY[2], route0)
            lg = LoadGenerator(
                api=s.api,
                namespace=s.namespace,
                httproute="scale-0",
                backends={STABLE: s.servers[STABLE].url, CANDIDATE: s.servers[CANDIDATE].url},
                rps=a.rps,
                max_seconds=a.max_minutes * 60 + 60,
                max_requests=int(a.rps * (a.max_minutes * 60 + 60)) + 1,
            ).start()
            # Leader election as the chart's defaults (the harness's 1 s renewals would add 120 requests/min).
            s.start_operator(LEADER_ELECTION_DEFAULTS)
            watcher = Watcher(s.api, s.namespace).start()
            try:
                return self._phases(co, watcher)
            finally:
                watcher.stop()
                lg.stop()

    def _phases(self, co: Any, watcher: Watcher) -> dict[str, Any]:
        a, s = self.args, self.stack
        assert s.prom is not None and s.operator is not None
        ns = s.namespace
        time.sleep(5)  # the operator takes the Lease and starts its watches
        idle = self.measure(a.idle_window)
        if idle:
            print(idle.line("idle (0 objects)"), flush=True)

        # Apply all N "at once": --apply-clients clients in parallel, as `kubectl apply` of many
        # files or an Argo CD sync would (each object's route first, then the object).
        prom_url = s.prom.url

        def apply_one(i: int) -> None:
            route, doc = scale_objects(i, ns, prom_url, a.interval)
            if i > 0:
                co.create_namespaced_custom_object(*GATEWAY[:2], ns, GATEWAY[2], route)
            co.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, doc)

        op_pid, api_pid = s.operator.pid, s.cluster.pids["kube-apiserver"]
        cpu0 = (cpu_of(op_pid), cpu_of(api_pid))
        t0 = time.monotonic()
        with ThreadPoolExecutor(max_workers=a.apply_clients) as pool:
            list(pool.map(apply_one, range(a.n)))
        applied = time.monotonic() - t0

        def at_gate(o: dict[str, Any]) -> bool:
            return o["phase"] == "Paused" and o["weight"] == FIRST_WEIGHT

        all_gated = self.budget.wait(lambda: watcher.count(at_gate, self.names) == a.n, a.gate_timeout, 1)
        gated = watcher.count(at_gate, self.names)
        took = time.monotonic() - t0
        api_cores = (cpu_of(api_pid) - cpu0[1]) / took
        op_cores = (cpu_of(op_pid) - cpu0[0]) / took
        self.start = {
            "applied_s": round(applied, 1),
            "all_at_first_gate_s": round(took, 1) if all_gated else None,
            "apiserver_cores": round(api_cores, 2),
            "operator_cores": round(op_cores, 2),
        }
        print(
            f"applied {a.n} rollouts + routes in {applied:.1f}s; {gated}/{a.n} at their first gate "
            f"{took:.1f}s after the first apply"
            + ("" if all_gated else f" (stopped waiting after {a.gate_timeout:.0f}s or the budget)")
            + f"; meanwhile the API server used {api_cores:.2f} cores, the operator {op_cores:.2f}",
            flush=True,
        )

        # Active.
        wall0 = time.time()
        active_w = self.measure(a.window)
        wall1 = time.time()
        active: dict[str, float | None] = {}
        gap = None
        if active_w:
            print(active_w.line(f"active ({a.n} at a manual gate, interval {a.interval}s)"), flush=True)
            gaps = analysis_gaps(watcher.times_between(self.names, wall0, wall1))
            gap = p95(gaps)
            rss = rss_mib(_read(f"/proc/{s.operator.pid}/status"))
            m = active_w.seconds / 60
            active = {
                "cpu_s_per_min": round(active_w.operator_cpu_s_per_min, 2),
                "rss_mib": round(rss, 1),
                "api_requests_per_min": round(active_w.requests.total / m, 1),
                "api_writes_per_min": round(active_w.requests.writes / m, 1),
                "queries_per_min": per_minute(active_w.queries, active_w.seconds),
            }
            print(
                f"active: RSS {rss:.0f} MiB; {len(gaps)} analysis gaps, p95 {gap}s, max {max(gaps)}s"
                if gaps
                else f"active: RSS {rss:.0f} MiB; no analysis gap in the window",
                f"; {series_left(self.operator_metrics(), s.namespace, self.names)} per-object series "
                "on the operator's /metrics",
                sep="",
                flush=True,
            )

        probe = self.probe(co)

        # Abort all N: finished objects.
        t0 = time.monotonic()

        def abort_one(n: str) -> None:
            patch = {"metadata": {"annotations": {ABORT_ANNOTATION: "bench-scale"}}}
            co.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, n, patch)

        with ThreadPoolExecutor(max_workers=a.apply_clients) as pool:
            list(pool.map(abort_one, self.names))
        sent_s = time.monotonic() - t0
        aborted = self.budget.wait(
            lambda: watcher.count(lambda o: o["phase"] == "Aborted", self.names) == a.n, a.gate_timeout, 1
        )
        print(
            f"aborted {watcher.count(lambda o: o['phase'] == 'Aborted', self.names)}/{a.n} in "
            f"{time.monotonic() - t0:.1f}s (the annotations sent in {sent_s:.1f}s)"
            + ("" if aborted else " (stopped waiting)"),
            flush=True,
        )
        finished: dict[str, float | None] = {}
        if self.budget.sleep(a.settle_finished):
            fin = self.measure(a.window)
            if fin:
                print(fin.line(f"finished ({a.n} aborted)"), flush=True)
                finished = {
                    "cpu_s_per_min": round(fin.operator_cpu_s_per_min, 2),
                    "api_requests_per_min": round(fin.requests.total * 60 / fin.seconds, 1),
                }

        # Delete all.
        t0 = time.monotonic()
        gone_names = [*self.names, PROBE_NAME]
        with ThreadPoolExecutor(max_workers=a.apply_clients) as pool:
            list(
                pool.map(
                    lambda n: co.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, n), gone_names
                )
            )
        self.budget.wait(lambda: watcher.count(lambda o: True, gone_names) == 0, a.gate_timeout, 1)
        print(f"deleted {len(gone_names)} rollouts in {time.monotonic() - t0:.1f}s", flush=True)
        after: dict[str, float | None] = {}
        if self.budget.sleep(a.settle):
            gone = self.measure(a.window)
            if gone:
                print(gone.line(f"after delete (+{a.settle:.0f}s)"), flush=True)
                left = series_left(self.operator_metrics(), ns, gone_names)
                after = {"cpu_s_per_min": round(gone.operator_cpu_s_per_min, 2), "series_left": left}
                print(f"after delete: {left} per-object series left on the operator's /metrics", flush=True)
        return result(a.n, a.interval, active, probe, gap, finished, after, self.start)

    def probe(self, co: Any) -> dict[str, float | None]:
        """One more rollout at a 5 s interval: apply -> first weight, visible breach -> weight 0."""
        from model_rollouts.metrics.provider import render
        from tests.harness.objects import guardrail, rollout
        from tests.harness.queries import ERROR_RATE

        a, s = self.args, self.stack
        assert s.prom is not None
        out: dict[str, float | None] = {"interval_s": a.probe_interval}
        if self.budget.left() < 90:
            return out
        doc = rollout(
            PROBE_NAME,
            s.prom.url,
            [{"setWeight": PROBE_WEIGHT}, {"pause": {}}],
            stable=STABLE,
            candidate={"service": PROBE, "modelVersion": "2.0"},
            route=PROBE_ROUTE,
            compare=False,
            analysis={"interval": f"{a.probe_interval}s", "window": "10s", "guardrails": [guardrail(1)]},
        )
        doc["metadata"]["namespace"] = s.namespace
        t0 = time.monotonic()
        co.create_namespaced_custom_object(GROUP, VERSION, s.namespace, PLURAL, doc)
        if not self.budget.wait(lambda: s.route_weights().get(PROBE, 0) > 0, 120, 0.1):
            print("probe: no first weight within 120s", flush=True)
            return out
        out["apply_to_first_weight_s"] = round(time.monotonic() - t0, 2)
        # One passing analysis at that weight, then the breach.
        passed = self.budget.wait(
            lambda: any(
                m.get("verdict") == "pass"
                for m in (s.get(PLURAL, PROBE_NAME).get("status") or {}).get("lastAnalysis", [])
            ),
            90,
            0.2,
        )
        if not passed:
            print("probe: no passing analysis within 90s", flush=True)
            return out
        s.servers[PROBE].set(error_rate=0.5)
        t_admin = time.monotonic()
        q = render(ERROR_RATE, {"service": PROBE, "window": "10s"})
        visible = zero = None
        deadline = time.monotonic() + min(120, self.budget.left())
        while zero is None and time.monotonic() < deadline:
            if visible is None:
                res = s.prom.query(q)
                if res and float(res[0]["value"][1]) > 0.05:
                    visible = time.monotonic()
            if s.route_weights().get(PROBE) == 0:
                zero = time.monotonic()
            time.sleep(0.1)
        s.servers[PROBE].set(error_rate=0.0)
        if zero is None or visible is None:
            print(f"probe: breach visible={visible is not None}, weight 0={zero is not None} within 120s")
            return out
        out["breach_to_zero_s"] = round(max(0.0, zero - visible), 2)
        print(
            f"probe (interval {a.probe_interval}s): apply -> first weight {out['apply_to_first_weight_s']}s; "
            f"breach visible in Prometheus -> route weight 0 {out['breach_to_zero_s']}s "
            f"(from the /admin call {zero - t_admin:.2f}s)",
            flush=True,
        )
        return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.bench_scale",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--n", type=int, default=1000, help="rollouts (default 1000)")
    parser.add_argument("--interval", type=int, default=30, help="their analysis interval, s (30)")
    parser.add_argument("--probe-interval", type=int, default=5, help="the probe's interval, s (5)")
    parser.add_argument("--window", type=float, default=180, help="each measurement window, s (180)")
    parser.add_argument(
        "--idle-window", type=float, default=30, help="the idle window before applying, s (30)"
    )
    parser.add_argument(
        "--settle", type=float, default=60, help="wait after deleting before measuring, s (60)"
    )
    parser.add_argument(
        "--settle-finished",
        type=float,
        default=10,
        help="wait after all are aborted before measuring, s (10)",
    )
    parser.add_argument(
        "--gate-timeout", type=float, default=600, help="longest wait for all to gate/abort/go, s (600)"
    )
    parser.add_argument("--rps", type=float, default=40, help="traffic per route generator (40)")
    parser.add_argument(
        "--apply-clients", type=int, default=8, help="clients applying the N objects in parallel (8)"
    )
    parser.add_argument(
        "--operator-scrape-interval",
        default="30s",
        help="how often Prometheus scrapes the operator's /metrics (30s: the chart's ServiceMonitor default)",
    )
    parser.add_argument("--max-minutes", type=float, default=45, help="overall time budget (45)")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error("--n must be at least 1")
    out = Bench(args).run()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
