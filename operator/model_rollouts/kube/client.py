"""The operator's one Kubernetes API client (in-cluster config, else kubeconfig) and object reads."""

from __future__ import annotations

import contextlib
import datetime as dt
import threading
import time
from collections.abc import Callable
from typing import Any, cast

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from model_rollouts.api.common import GROUP, VERSION

#: Seconds any single Kubernetes API call may take.
REQUEST_TIMEOUT = 10
#: Pooled connections to the API server.
CONNECTIONS = 32
#: Default client-side limit on the operator's own requests (``--kube-api-qps`` / ``--kube-api-burst``).
QPS = 100.0
BURST = 200
_api: client.ApiClient | None = None
_unlimited: client.ApiClient | None = None
_lock = threading.Lock()


class RateLimit:
    """A token bucket: on average at most ``qps`` requests a second, up to ``burst`` at once.

    Applying a thousand rollouts at once makes the operator want about 7 requests per object within a
    minute (finalizer, route, two status writes, three Events); unlimited, that took the API server
    to 0.6 of a core on a 2-core machine. The limit spreads such a burst over a little more time; in
    a steady state (1,000 rollouts at a 30 s interval: about 45 requests a second) it never waits.
    ``qps`` 0 disables it.
    """

    def __init__(
        self,
        qps: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.qps, self.burst = float(qps), max(1, int(burst))
        self._clock, self._sleep = clock, sleep
        self._tokens = float(self.burst)
        self._at = clock()
        self._lock = threading.Lock()
        #: Seconds callers have waited for a token, in total (for the logs and benchmarks).
        self.waited = 0.0

    def acquire(self) -> None:
        if self.qps <= 0:
            return
        with self._lock:  # callers queue here: each takes the next token in turn
            now = self._clock()
            self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.qps)
            self._at = now
            self._tokens -= 1.0
            wait = -self._tokens / self.qps if self._tokens < 0 else 0.0
            self.waited += wait
        if wait > 0:
            self._sleep(wait)


LIMIT = RateLimit(QPS, BURST)


def configure_rate(qps: float, burst: int) -> None:
    """Set the limit of the operator's requests (``--kube-api-qps``, ``--kube-api-burst``)."""
    global LIMIT
    LIMIT = RateLimit(qps, burst)


class _LimitedApiClient(client.ApiClient):
    """The kubernetes client, each request taking a token of :data:`LIMIT` first."""

    def call_api(self, *args: Any, **kwargs: Any) -> Any:
        LIMIT.acquire()
        return super().call_api(*args, **kwargs)


def _client(limited: bool) -> client.ApiClient:
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    cfg = client.Configuration.get_default_copy()
    # As many pooled connections as threads that call the API server at once (the scheduler's
    # workers, the measurement pools, notifications): a smaller pool drops connections under
    # load and pays a TLS handshake for each new one, on both sides.
    cfg.connection_pool_maxsize = CONNECTIONS
    return _LimitedApiClient(cfg) if limited else client.ApiClient(cfg)


def api() -> client.ApiClient:
    """The client of every reconcile request: limited by :data:`LIMIT`."""
    global _api
    with _lock:
        if _api is None:
            _api = _client(limited=True)
        return _api


def api_unlimited() -> client.ApiClient:
    """A client outside the limit, for the leader Lease and the health probes: a burst of reconcile
    requests must never delay a renewal (a leader that cannot renew loses the Lease) or a probe."""
    global _unlimited
    with _lock:
        if _unlimited is None:
            _unlimited = _client(limited=False)
        return _unlimited


def sent(response: Any) -> None:
    """Read and release the answer of a write whose body the operator does not use (made with
    ``_preload_content=False``: the kubernetes client then skips building models from the body, a
    twentieth of the operator's CPU at a thousand objects). Errors were already raised as ApiException."""
    with contextlib.suppress(Exception):
        response.read()
        response.release_conn()


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def get_object(plural: str, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        obj = cast(
            dict[str, Any],
            client.CustomObjectsApi(api()).get_namespaced_custom_object(
                GROUP, VERSION, namespace, plural, name, _request_timeout=REQUEST_TIMEOUT
            ),
        )
        return obj
    except ApiException as e:
        if e.status == 404:
            return None
        raise
