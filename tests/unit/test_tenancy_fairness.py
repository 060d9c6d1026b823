"""One tenant cannot hurt another (no cluster): budgets per tenant, the template gate on every path,
namespace-bound platform templates, args placed safely, bounded responses and a bounded template cache."""

from __future__ import annotations

import contextlib
import gc
import socket
import threading
import time
import tracemalloc
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from model_rollouts.api.common import AnalysisBase, TemplateRef
from model_rollouts.api.provider import ClusterMetricProviderSpec, namespaced_template_fields
from model_rollouts.api.rollout import ModelRolloutSpec
from model_rollouts.api.template import MetricTemplateSpec
from model_rollouts.metrics import pools, prometheus, resolve
from model_rollouts.metrics.errors import ProviderError
from model_rollouts.metrics.prometheus import PrometheusProvider
from model_rollouts.metrics.provider import TemplateError, render
from model_rollouts.metrics.templates import check_platform_template, fill
from tests.harness.tenancy import RecordingServer

ONE = '{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1,"2"]}]}}'
VALUES = {
    "variant": "candidate",
    "service": "fraud-v2",
    "namespace": "team-a",
    "deployment": "d",
    "window": "1m",
}


# -- budgets per tenant -----------------------------------------------------------------------------
class _Slow(BaseHTTPRequestHandler):
    """Answers one series; a query holding ``slow`` only after 1 s."""

    def do_GET(self) -> None:
        if "slow" in self.path:
            time.sleep(1.0)
        body = ONE.encode()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def slow_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_tenants_short_timeout_never_marks_the_shared_provider_down_for_another(slow_server: str) -> None:
    hasty = PrometheusProvider(slow_server, timeout_s=0.1)  # a tenant's inline 100ms on the shared server
    platform = PrometheusProvider(slow_server, timeout_s=5)  # another team's ClusterMetricProvider
    for _ in range(3):
        r = hasty.query("slow_query", budget="provider/prometheus@tenant-a")
        assert r.outcome == "error" and (
            "Error" in r.message or "Timeout" in r.message or "unavailable" in r.message
        ), r
    assert "provider unavailable" in hasty.query("up", budget="provider/prometheus@tenant-a").message
    # The same server, another namespace's budget: asked at once, answered.
    results = [platform.query("up", budget="provider/prometheus@team-d") for _ in range(10)]
    assert [r.outcome for r in results] == ["value"] * 10, results


def test_one_tenants_queued_measurements_never_delay_anothers() -> None:
    release = threading.Event()
    busy = [pools.submit("provider/p@noisy", release.wait) for _ in range(40)]
    try:
        t0 = time.monotonic()
        assert pools.submit("provider/p@quiet", lambda: 42).result(timeout=2) == 42
        assert time.monotonic() - t0 < 0.5
        assert pools.pending("provider/p@noisy") == 40  # 4 running, 36 queued: only its own threads
    finally:
        release.set()
    for f in busy:
        f.result(timeout=5)


# -- the template gate on every path ----------------------------------------------------------------
def _rollout(analysis: dict[str, Any], guardrail: dict[str, Any]) -> ModelRolloutSpec:
    return ModelRolloutSpec.model_validate(
        {
            "stable": {"service": "a"},
            "candidate": {"service": "b"},
            "trafficRouting": {"gatewayAPI": {"httpRoute": "r"}},
            "steps": [{"setWeight": 50}],
            "analysis": {**analysis, "guardrails": [{"name": "g", "max": 1, **guardrail}]},
        }
    )


@pytest.fixture()
def strict(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A ClusterMetricProvider ``strict`` (allowInlineQueries false) on http://prom.monitoring:9090."""
    address = "http://prom.monitoring:9090"
    spec = ClusterMetricProviderSpec.model_validate(
        {"prometheus": {"address": address}, "allowInlineQueries": False}
    )
    monkeypatch.setattr(resolve, "_cluster_providers", lambda: [("strict", spec)])

    class Api:
        def __init__(self, *_: object) -> None:
            pass

        def get_cluster_custom_object(self, *args: object, **_: object) -> dict[str, Any]:
            return {"spec": spec.model_dump(mode="json")}

    monkeypatch.setattr(resolve.client, "CustomObjectsApi", Api)
    monkeypatch.setattr(resolve, "api", lambda: None)
    yield address


@pytest.mark.parametrize("address", ["http://prom.monitoring:9090", "http://prom.monitoring:9090/"])
def test_an_inline_address_on_a_templates_only_providers_server_is_that_provider(
    strict: str, address: str
) -> None:
    spec = _rollout({"prometheus": {"address": address, "timeout": "100ms"}}, {"query": "up"})
    with pytest.raises(ProviderError) as e:
        resolve.make_provider(spec.analysis, "team-a", ["spec.analysis.guardrails[0].query"])
    assert e.value.field == "spec.analysis.prometheus.address"
    assert "strict" in str(e.value) and "spec.analysis.guardrails[0].query" in str(e.value)
    # With a platform template only, the address is that provider: its budget, not the address's.
    p = resolve.make_provider(spec.analysis, "team-a")
    assert p.key == "provider/strict@team-a"


def test_a_templates_only_provider_refuses_a_tenants_metric_template(strict: str) -> None:
    ref = {"templateRef": {"kind": "MetricTemplate", "name": "mine"}}
    spec = _rollout({"provider": "strict"}, ref)
    fields = namespaced_template_fields(spec, "spec")
    assert fields == ["spec.analysis.guardrails[0].templateRef.kind"]
    with pytest.raises(ProviderError) as e:
        resolve.make_provider(spec.analysis, "team-a", [], fields)
    assert e.value.field == "spec.analysis.guardrails[0].templateRef.kind"
    assert "ClusterMetricTemplate" in str(e.value)
    cluster = _rollout({"provider": "strict"}, {"templateRef": {"name": "platform"}})
    assert namespaced_template_fields(cluster, "spec") == []
    assert resolve.make_provider(cluster.analysis, "team-a").key == "provider/strict@team-a"


def test_the_budget_is_per_provider_and_namespace(strict: str) -> None:
    a = AnalysisBase.model_validate({"provider": "strict"})
    assert resolve.make_provider(a, "team-a").key != resolve.make_provider(a, "team-b").key


# -- platform templates bind the namespace; args are placed safely ----------------------------------
def _template(query: str, args: list[dict[str, Any]] | None = None) -> MetricTemplateSpec:
    return MetricTemplateSpec.model_validate({"args": args or [], "query": query})


@pytest.mark.parametrize(
    "query",
    [
        'sum(rate(model_requests_total{service="{{ service }}"}[1m]))',
        'sum(x{deployment=~"{{ deployment }}"}) / sum(x{namespace="{{ namespace }}",service="{{ service }}"})'
        "",
        'sum(x{app="{{ args.app }}"})',
        'sum(x{namespace=~"{{ namespace }}",service="{{ service }}"})',  # a regex is not an exact match
    ],
)
def test_a_platform_template_selecting_a_workload_must_bind_the_namespace(query: str) -> None:
    t = _template(query, [{"name": "app", "type": "string"}])
    with pytest.raises(ProviderError, match="namespace"):
        check_platform_template(t, "spec.analysis.guardrails[0].templateRef")


def test_a_namespace_bound_platform_template_reads_only_the_objects_namespace() -> None:
    t = _template(
        'sum(rate(x{namespace="{{ namespace }}",service="{{ service }}",code="{{ args.code }}"}[1m]))'
        ' / sum(rate(x{kubernetes_namespace="{{ namespace }}", service="{{ service }}"}[1m]))',
        [{"name": "code", "type": "number"}],
    )
    check_platform_template(t, "f")
    q = render(fill(t, TemplateRef(name="t", args={"code": "500"}), ("query",))["query"], VALUES)
    assert q.count('"team-a"') == 2 and 'code="500"' in q


def _one(query: str, type_: str, value: str) -> str:
    t = _template(query, [{"name": "a", "type": type_}])
    return fill(t, TemplateRef(name="t", args={"a": value}), ("query",))["query"]


def test_a_string_arg_in_a_regex_matcher_matches_only_itself() -> None:
    assert (
        _one('sum(x{service=~"{{ args.a }}"})', "string", "........")
        == r'sum(x{service=~"\\.\\.\\.\\.\\.\\.\\.\\."})'
    )
    assert _one("sum(x{service=~`{{ args.a }}`})", "string", "a.b") == r"sum(x{service=~`a\.b`})"
    assert _one('sum(x{service="{{ args.a }}"})', "string", "a.b") == 'sum(x{service="a.b"})'
    assert (
        render('sum(x{service=~"{{ service }}"})', {**VALUES, "service": "a.b"})
        == r'sum(x{service=~"a\\.b"})'
    )


@pytest.mark.parametrize(
    ("query", "type_", "value", "text"),
    [
        ("sum(rate(x[{{ args.a }}]))", "string", "9999h:1s", "inside [...]"),
        ("sum(rate(x[{{ args.a }}]))", "number", "5", "inside [...]"),
        ("sum(x) / {{ args.a }}", "string", "a/b", "outside quotes"),
        ("sum({{ args.a }})", "string", "x-y", "outside quotes"),
    ],
)
def test_a_string_arg_where_it_would_be_an_operator_or_a_range_is_refused(
    query: str, type_: str, value: str, text: str
) -> None:
    with pytest.raises(TemplateError, match=text.replace("[", r"\[").replace(".", r"\.")):
        _one(query, type_, value)


def test_a_string_arg_outside_quotes_may_still_be_a_name() -> None:
    assert _one("sum({{ args.a }}_total)", "string", "model_requests") == "sum(model_requests_total)"


# -- bounded responses ------------------------------------------------------------------------------
class _Big(BaseHTTPRequestHandler):
    """A valid Prometheus answer of ``size`` bytes with many series, streamed without Content-Length."""

    size = 8 << 20
    sent: list[int] = []

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        chunk = b'{"metric":{"__name__":"' + b"x" * 200 + b'"},"value":[1,"1"]},'
        total = 0
        try:
            self.wfile.write(b'{"status":"success","data":{"resultType":"vector","result":[')
            while total < self.size:
                self.wfile.write(chunk)
                total += len(chunk)
            self.wfile.write(b'{"metric":{},"value":[1,"1"]}]}}')
        except OSError:
            pass
        _Big.sent.append(total)

    def log_message(self, *args: object) -> None:
        pass


def test_an_oversized_result_is_refused_while_it_streams_in() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Big)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        tracemalloc.start()
        r = PrometheusProvider(f"http://127.0.0.1:{server.server_address[1]}", timeout_s=5).query("up")
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    finally:
        server.shutdown()
        server.server_close()
    assert r.outcome == "error" and f"larger than {prometheus.MAX_RESPONSE_BYTES} bytes" in r.message, r
    # Never the 8 MB held or parsed: at most the limit plus a chunk, and a little bookkeeping.
    assert peak < 4 * prometheus.MAX_RESPONSE_BYTES, peak


def test_an_error_page_is_read_only_as_far_as_its_status() -> None:
    server = RecordingServer(status=500, body="e" * (4 << 20)).start()
    try:
        r = PrometheusProvider(server.url, timeout_s=5).query("up")
    finally:
        server.close()
    assert r.outcome == "error" and "HTTP 500" in r.message


def test_a_response_dripping_slower_than_the_timeout_is_cut_off() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def drip() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n")
        with contextlib.suppress(OSError):
            for _ in range(100):
                conn.sendall(b" " * 10)
                time.sleep(0.2)  # each read well within the 1 s timeout; the whole far beyond it
        conn.close()

    threading.Thread(target=drip, daemon=True).start()
    t0 = time.monotonic()
    r = PrometheusProvider(f"http://127.0.0.1:{listener.getsockname()[1]}", timeout_s=1).query("up")
    took = time.monotonic() - t0
    listener.close()
    assert r.outcome == "error" and "Timeout" in r.message, r
    assert took < 2.5, took


# -- the template cache stays bounded ---------------------------------------------------------------
def test_ten_thousand_template_generations_leave_memory_flat(monkeypatch: pytest.MonkeyPatch) -> None:
    query = 'sum(rate(x{namespace="{{ namespace }}",service="{{ service }}",code="{{ args.c }}"}[1m]))'
    pad = "# " + "p" * 3000 + "\n"
    generation = [0]
    gone: set[str] = set()

    class Api:
        def __init__(self, *_: object) -> None:
            pass

        def get_namespaced_custom_object(
            self, group: str, version: str, ns: str, plural: str, name: str, **_: Any
        ) -> Any:
            if name in gone:
                raise ApiException(status=404)
            generation[0] += 1
            return {
                "metadata": {"name": name, "namespace": ns, "resourceVersion": str(generation[0])},
                "spec": {"args": [{"name": "c", "type": "number"}], "query": pad + query},
            }

    monkeypatch.setattr(resolve.client, "CustomObjectsApi", Api)
    monkeypatch.setattr(resolve, "api", lambda: None)
    resolve._templates.clear()

    def generations(start: int, stop: int) -> None:
        for i in range(start, stop):
            ref = TemplateRef(kind="MetricTemplate", name=f"t-{i}")
            resolve._template(ref, f"ns-{i % 50}", "spec.analysis.guardrails[0].templateRef")

    tracemalloc.start()
    generations(0, 1000)
    gc.collect()
    after_1k = tracemalloc.get_traced_memory()[0]
    generations(1000, 10_000)
    gc.collect()
    after_10k = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    print(
        f"\ntemplate cache: {len(resolve._templates)} entries; {after_1k / 1e6:.2f} MB traced after 1,000 "
        f"generations, {after_10k / 1e6:.2f} MB after 10,000"
    )
    assert len(resolve._templates) <= resolve.TEMPLATE_CACHE_MAX
    assert after_10k - after_1k < 1_000_000, (after_1k, after_10k)
    # A deleted template leaves: the next look-up after its entry expires is a 404, not a stale spec.
    gone.add("t-9999")
    monkeypatch.setattr(resolve, "TEMPLATE_CACHE_SECONDS", 0.0)
    with pytest.raises(ProviderError, match="not found"):
        resolve._template(TemplateRef(kind="MetricTemplate", name="t-9999"), "ns-49", "f")
    assert not any(k[2] == "t-9999" for k in resolve._templates)
    resolve._templates.clear()


def test_a_compressed_answer_is_limited_by_its_decompressed_size() -> None:
    import gzip

    body = gzip.compress(b"[" + b" " * 30_000_000 + b"]", 9)  # 30 MB in about 30 kB

    class Bomb(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            with contextlib.suppress(OSError):
                self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Bomb)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        tracemalloc.start()
        r = PrometheusProvider(f"http://127.0.0.1:{server.server_address[1]}", timeout_s=5).query("up")
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    finally:
        server.shutdown()
        server.server_close()
    assert r.outcome == "error" and "larger than" in r.message, r
    assert peak < 4 * prometheus.MAX_RESPONSE_BYTES, peak
