"""A loopback HTTP proxy in front of the real Prometheus that makes chosen queries really slow.

A query whose text contains one of ``delays``' markers is held that many seconds before it is
forwarded (a real slow query, as a tenant's expensive PromQL would be); everything else is forwarded
at once. Counts what it delayed and what it forwarded, and how many requests were in flight at most.
"""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class DelayProxy:
    upstream: str
    delays: dict[str, float] = field(default_factory=dict)
    delayed: int = 0
    forwarded: int = 0
    inflight: int = 0
    max_inflight: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> DelayProxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                query = urllib.parse.unquote_plus(self.path)
                delay = max((d for m, d in proxy.delays.items() if m in query), default=0.0)
                with proxy._lock:
                    proxy.inflight += 1
                    proxy.max_inflight = max(proxy.max_inflight, proxy.inflight)
                    if delay:
                        proxy.delayed += 1
                    else:
                        proxy.forwarded += 1
                try:
                    time.sleep(delay)
                    try:
                        with urllib.request.urlopen(proxy.upstream + self.path, timeout=10) as r:
                            status, ctype, data = r.status, r.headers.get("Content-Type", ""), r.read()
                    except urllib.error.HTTPError as e:
                        status, ctype, data = e.code, e.headers.get("Content-Type", ""), e.read()
                    self.send_response(status)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the client gave up (its timeout): nothing to answer
                finally:
                    with proxy._lock:
                        proxy.inflight -= 1

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
