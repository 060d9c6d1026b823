"""Helpers for the tenancy tests: platform-owned providers and a local HTTP server that records requests."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def cluster_provider(
    name: str, address: str, token_secret: str | None = None, key: str = "token", **extra: Any
) -> dict[str, Any]:
    prom: dict[str, Any] = {"address": address, "timeout": "2s"}
    if token_secret:
        prom["bearerTokenSecret"] = {"name": token_secret, "key": key}
    return {
        "apiVersion": "mlrollouts.io/v1alpha1",
        "kind": "ClusterMetricProvider",
        "metadata": {"name": name},
        "spec": {"prometheus": prom, **extra},
    }


@dataclass
class Request:
    path: str
    headers: dict[str, str]


@dataclass
class RecordingServer:
    """Records every request. ``upstream`` set: forwards GETs there; else answers ``status`` with ``body``."""

    status: int = 403
    body: str = "<html>internal page</html>"
    upstream: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)

    def start(self) -> RecordingServer:
        rec = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                rec.requests.append(Request(self.path, {k: v for k, v in self.headers.items()}))
                status, ctype, data = rec.status, "text/html", rec.body.encode()
                if rec.upstream is not None:
                    try:
                        with urllib.request.urlopen(rec.upstream + self.path, timeout=5) as r:
                            status, ctype, data = r.status, r.headers.get("Content-Type", ""), r.read()
                    except urllib.error.HTTPError as e:
                        status, ctype, data = e.code, e.headers.get("Content-Type", ""), e.read()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                for k, v in rec.headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            do_POST = do_GET

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
