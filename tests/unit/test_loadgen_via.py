"""loadgen's ``via`` mode: every request through one proxy, counted by the backend it names."""

from __future__ import annotations

import http.client
import itertools
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.harness.loadgen import VIA_BACKEND_HEADER, VIA_UNATTRIBUTED, LoadGenerator, build_arg_parser
from tests.harness.modelserver import ModelServerProcess


class Proxy(ThreadingHTTPServer):
    """A tiny stand-in proxy: forwards /predict to a, b, a, b ... and answers 503 itself every 5th."""

    daemon_threads = True

    def __init__(self, upstreams: dict[str, str]) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.upstreams = upstreams
        self.turn = itertools.count()
        self.lock = threading.Lock()
        self.forwarded: dict[str, int] = dict.fromkeys(upstreams, 0)
        self.feedback_seen = 0


class _ProxyHandler(BaseHTTPRequestHandler):
    server: Proxy
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with self.server.lock:
            n = next(self.server.turn)
            if self.path != "/predict":
                self.server.feedback_seen += 1
        if self.path != "/predict" or n % 5 == 4:
            self._reply(503, b"no\n", {})
            return
        name = sorted(self.server.upstreams)[n % 2]
        url = urlsplit(self.server.upstreams[name])
        conn = http.client.HTTPConnection(url.hostname or "", url.port or 80, timeout=5)
        try:
            conn.request("POST", "/predict", body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            payload = resp.read()
        finally:
            conn.close()
        with self.server.lock:
            self.server.forwarded[name] += 1
        self._reply(resp.status, payload, {VIA_BACKEND_HEADER: name})

    def _reply(self, status: int, payload: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for k, v in {
            "Content-Type": "application/json",
            "Content-Length": str(len(payload)),
            **headers,
        }.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture
def servers() -> Iterator[dict[str, ModelServerProcess]]:
    with (
        ModelServerProcess("a", seed=1, latency_ms=1.0, max_seconds=60) as a,
        ModelServerProcess("b", seed=2, latency_ms=1.0, max_seconds=60) as b,
    ):
        yield {"svc-a": a, "svc-b": b}


def feedback_count(srv: ModelServerProcess) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in srv.metrics_text().splitlines()
        if line.startswith("model_feedback_total{")
    )


def test_via_counts_by_the_proxys_header_and_sends_feedback_straight_to_that_backend(
    servers: dict[str, ModelServerProcess],
) -> None:
    urls = {name: s.url for name, s in servers.items()}
    proxy = Proxy(urls)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        gen = LoadGenerator(
            None,
            "ml",
            "model",
            urls,
            rps=100,
            max_seconds=10,
            max_requests=150,
            workers=8,
            via=f"http://127.0.0.1:{proxy.server_address[1]}",
        )
        with gen:
            assert gen.wait(timeout=15), gen.stats()
        stats = gen.stats()
    finally:
        proxy.shutdown()
        proxy.server_close()
    sent = stats["total_sent"]
    assert sent + stats["dropped"] == 150 and sent >= 50
    # Counted by the backend the proxy named; the proxy's own 503s by VIA_UNATTRIBUTED.
    assert stats["ok"] == {"svc-a": proxy.forwarded["svc-a"], "svc-b": proxy.forwarded["svc-b"]}
    assert stats["errors"].get(VIA_UNATTRIBUTED, 0) == sent - sum(proxy.forwarded.values()) > 0
    assert stats["weight_reads"] >= 1 and stats["weight_errors"] == 0  # no API server needed
    # Feedback went to the model server that answered, not through the proxy.
    assert proxy.feedback_seen == 0
    assert stats["feedback_sent"] == stats["ok"]
    for name, srv in servers.items():
        assert feedback_count(srv) == stats["ok"][name]


def test_via_flag_is_optional_and_parsed() -> None:
    base = ["--kubeconfig", "k", "--namespace", "ml", "--httproute", "r", "--backend", "a=http://127.0.0.1:1"]
    assert build_arg_parser().parse_args(base).via is None
    assert build_arg_parser().parse_args([*base, "--via", "http://127.0.0.1:2"]).via == "http://127.0.0.1:2"
