"""The operator's probes: ``/healthz`` (liveness) and ``/readyz`` (readiness), on one small HTTP server.

Liveness answers "should the kubelet restart this process?": 200 unless Kopf's event loop, once
started, does not run a no-op within ``LOOP_TIMEOUT`` seconds, or the leader-election thread has
died. A replica that merely cannot reach the API server is alive (a restart would not help it).

Readiness answers "does this replica serve its purpose?": the leader acts, a standby is ready to
take over. 200 only when all hold:

- Kopf has started (its startup handlers ran; its watches are being served) and is not stopping;
- its event loop answers;
- with leader election, the last round trip to the Lease succeeded less than a lease duration ago
  (the leader renewed it, or a standby read it): a replica that lost the API server is not ready;
- the API server lets it list what it watches (ModelRollouts and ModelExperiments in the watched
  namespaces, or cluster-wide): the connection, credentials, RBAC and CRDs its watches need. This
  check runs every ``LIST_CACHE_SECONDS`` in its own thread; a probe reads its last result.

Both answer JSON: ``{"ready"|"alive": bool, "role": "leader"|"standby", "problems": [...]}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from model_rollouts import leader

logger = logging.getLogger("model_rollouts.health")

LOOP_TIMEOUT = 3.0
LIST_TIMEOUT = 3
LIST_CACHE_SECONDS = 5.0
READINESS_PATH = "/readyz"


class Probes:
    """What the two endpoints report; the state is set by main() and Kopf's startup/cleanup."""

    def __init__(self, list_check: Callable[[], str | None] | None = None) -> None:
        self.started = threading.Event()  # Kopf's ready flag: raised once its startup handlers ran
        self.stopping = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.list_check = list_check
        self._list_result: tuple[float, str | None] | None = None
        self._list_lock = threading.Lock()

    def _loop_problem(self) -> str | None:
        loop = self.loop
        if loop is None or loop.is_closed():
            return None if loop is None else "the operator's event loop is closed"
        try:
            asyncio.run_coroutine_threadsafe(asyncio.sleep(0), loop).result(timeout=LOOP_TIMEOUT)
        except Exception as e:
            return f"the operator's event loop did not answer within {LOOP_TIMEOUT:.0f}s ({type(e).__name__})"
        return None

    def start_list_checks(self) -> None:
        """Run the list check every LIST_CACHE_SECONDS in a daemon thread (a probe never waits on it)."""

        def run() -> None:
            while not self.stopping.is_set():
                self._check_list_once()
                self.stopping.wait(LIST_CACHE_SECONDS)

        threading.Thread(target=run, name="readiness-list-check", daemon=True).start()

    def _check_list_once(self) -> None:
        if self.list_check is None:
            return
        try:
            problem = self.list_check()
        except Exception as e:  # never a response body: only the exception's type and status
            status = getattr(e, "status", None)
            why = f"the API server answered {status}" if status else "no answer from the API server"
            problem = f"cannot list the watched objects: {why} ({type(e).__name__})"
        with self._list_lock:
            self._list_result = (time.monotonic(), problem)

    def _list_problem(self) -> str | None:
        if self.list_check is None:
            return None
        with self._list_lock:
            result = self._list_result
        if result is None:
            return "the watched objects have not been listed yet"
        age = time.monotonic() - result[0]
        if age > 4 * LIST_CACHE_SECONDS + LIST_TIMEOUT * 2:
            return f"the watched objects were last listed {age:.0f}s ago"
        return result[1]

    def liveness(self) -> tuple[bool, dict[str, Any]]:
        problems = [p for p in (self._loop_problem(),) if p]
        if not leader.ELECTOR.alive():
            problems.append("the leader-election thread has stopped")
        return not problems, {"alive": not problems, "problems": problems}

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        problems: list[str] = []
        if self.stopping.is_set():
            problems.append("stopping")
        elif not self.started.is_set():
            problems.append("starting: Kopf's startup handlers have not finished")
        else:
            problems += [p for p in (self._loop_problem(),) if p]
        problems += [p for p in (leader.ELECTOR.contact_problem(),) if p]
        if not problems:
            problems += [p for p in (self._list_problem(),) if p]
        role = "leader" if leader.ELECTOR.is_leader() else "standby"
        return not problems, {"ready": not problems, "role": role, "problems": problems}


def list_check(api: Any, namespaces: list[str]) -> Callable[[], str | None]:
    """A check that the API server lets this replica list each kind it watches, where it watches."""
    from kubernetes import client

    from model_rollouts.api.common import GROUP, VERSION

    def check() -> str | None:
        co = client.CustomObjectsApi(api)
        for plural in ("modelrollouts", "modelexperiments"):
            scopes: list[str | None] = list(namespaces) or [None]
            for ns in scopes:
                if ns is None:
                    co.list_cluster_custom_object(
                        GROUP, VERSION, plural, limit=1, _request_timeout=LIST_TIMEOUT
                    )
                else:
                    co.list_namespaced_custom_object(
                        GROUP, VERSION, ns, plural, limit=1, _request_timeout=LIST_TIMEOUT
                    )
        return None

    return check


#: The process-wide probes; main() fills them in.
PROBES = Probes()


class _Handler(BaseHTTPRequestHandler):
    liveness_path = "/healthz"

    def do_GET(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        if path == self.liveness_path:
            ok, body = PROBES.liveness()
        elif path == READINESS_PATH:
            ok, body = PROBES.readiness()
        else:
            self.send_error(404)
            return
        data = json.dumps(body).encode()
        self.send_response(200 if ok else 503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("probe: " + format, *args)


def serve(url: str) -> ThreadingHTTPServer:
    """Serve liveness at ``url`` (e.g. http://0.0.0.0:8081/healthz) and readiness at /readyz on the
    same host and port, in a daemon thread. Port 0 picks a free port (``server.server_port``)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or parts.port is None:
        raise ValueError(f"expected http://HOST:PORT/PATH, got {url!r}")
    handler = type("Handler", (_Handler,), {"liveness_path": parts.path or "/healthz"})
    server = ThreadingHTTPServer((parts.hostname or "0.0.0.0", parts.port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="probes", daemon=True).start()
    return server
