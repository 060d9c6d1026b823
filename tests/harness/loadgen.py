"""A traffic generator that splits requests by the weights of a Gateway API HTTPRoute.

On a real cluster the gateway splits traffic by the weights the operator writes. In the
tests this generator plays the gateway and the users: it re-reads the HTTPRoute from the
API server every second, sends ``/predict`` requests at a fixed rate to the model servers
in proportion to the backendRef weights, and simulates each user's feedback and reward.
That closes the loop operator -> weights -> traffic -> metrics -> Prometheus -> operator.

Command line::

    python -m tests.harness.loadgen --kubeconfig KUBECONFIG --namespace ml --httproute recsys \\
        --backend recsys-v1=http://127.0.0.1:8001 --backend recsys-v2=http://127.0.0.1:8002 \\
        --rps 20 --max-seconds 60

Pure helpers :func:`parse_weights` and :func:`choose` hold the routing logic.

With ``--via URL`` (``via=`` in :class:`LoadGenerator`) the generator does not pick a backend:
every request goes to that URL (a real proxy, e.g. :class:`tests.harness.gateway.Gateway`),
and each response is counted for the backend the proxy names in its ``X-Gateway-Backend``
header; feedback still goes straight to that backend's model server (as a feedback pipeline
would), not through the proxy.

With ``users=N`` the requests come from N simulated users in turn (user ``user-<i>`` sends every
N-th request): each request carries the user's id in ``user_header`` (``X-User-Id``) and, with
``cookies=True``, the cookies the proxy set for that user before (``Set-Cookie`` answers are kept
per user, like a browser's cookie jar). :attr:`LoadGenerator.user_backends` counts, per user, the
backends that answered, so a test sees whether each user stayed on one arm. ``headers`` adds fixed
headers to every request (e.g. a tester's header that a route matches).
"""

from __future__ import annotations

import argparse
import http.client
import http.cookies
import json
import math
import queue
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from types import FrameType, TracebackType
from typing import Any, Protocol
from urllib.parse import urlsplit

GATEWAY_GROUP = "gateway.networking.k8s.io"
GATEWAY_VERSION = "v1"
HTTPROUTE_PLURAL = "httproutes"

MAX_RPS = 2000.0
MAX_WORKERS = 256
MAX_HISTORY = 10_000
MAX_USERS = 100_000
#: How far the scheduler may fall behind before it stops trying to catch up (seconds).
MAX_LAG_S = 1.0

WeightSource = Callable[[], Mapping[str, int]]

#: Response header by which a proxy (``via``) names the backend that served a request.
VIA_BACKEND_HEADER = "X-Gateway-Backend"
#: Where ``via`` responses that name no known backend are counted (e.g. the proxy's own 503).
VIA_UNATTRIBUTED = "(gateway)"


# ---- pure routing logic -----------------------------------------------------------------------------


def parse_weights(httproute: Mapping[str, Any], rule_index: int = 0) -> dict[str, int]:
    """Return ``{backendRef name: weight}`` of ``spec.rules[rule_index]`` of an HTTPRoute object.

    Gateway API semantics: a backendRef without ``weight`` has weight 1; weight 0 gets no
    traffic (kept in the result with 0). Refs that name the same backend add up. Raises
    ``ValueError`` when the object has no such rule or a weight is not a non-negative integer.
    """
    spec = httproute.get("spec")
    if not isinstance(spec, Mapping):
        raise ValueError("HTTPRoute has no spec")
    rules = spec.get("rules")
    if not isinstance(rules, list) or not rules:
        raise ValueError("HTTPRoute has no spec.rules")
    if not 0 <= rule_index < len(rules):
        raise ValueError(f"HTTPRoute has {len(rules)} rule(s); rule_index {rule_index} is out of range")
    rule = rules[rule_index]
    if not isinstance(rule, Mapping):
        raise ValueError(f"spec.rules[{rule_index}] is not an object")
    refs = rule.get("backendRefs") or []
    if not isinstance(refs, list):
        raise ValueError(f"spec.rules[{rule_index}].backendRefs is not a list")
    weights: dict[str, int] = {}
    for i, ref in enumerate(refs):
        where = f"spec.rules[{rule_index}].backendRefs[{i}]"
        if not isinstance(ref, Mapping) or not isinstance(ref.get("name"), str) or not ref["name"]:
            raise ValueError(f"{where} has no name")
        weight = ref.get("weight", 1)
        if weight is None:
            weight = 1
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
            raise ValueError(f"{where}.weight must be a non-negative integer, got {weight!r}")
        weights[ref["name"]] = weights.get(ref["name"], 0) + weight
    return weights


def effective_weights(
    weights: Mapping[str, float], skew: Mapping[str, float] | None = None
) -> dict[str, float]:
    """Weights multiplied by ``skew`` (default 1), keeping only positive finite ones."""
    skew = skew or {}
    out: dict[str, float] = {}
    for name, weight in weights.items():
        w = float(weight) * float(skew.get(name, 1.0))
        if w > 0 and math.isfinite(w):
            out[name] = w
    return out


def shares(weights: Mapping[str, float], skew: Mapping[str, float] | None = None) -> dict[str, float]:
    """The traffic share each backend gets (sums to 1, or empty when nothing can be chosen)."""
    eff = effective_weights(weights, skew)
    total = sum(eff.values())
    return {name: w / total for name, w in eff.items()} if total > 0 else {}


def choose(
    weights: Mapping[str, float], rng: random.Random, skew: Mapping[str, float] | None = None
) -> str | None:
    """Pick a backend with probability proportional to ``weight * skew``; None if all are 0.

    Backends are scanned in sorted order, so a seeded ``rng`` gives a reproducible sequence.
    """
    eff = effective_weights(weights, skew)
    if not eff:
        return None
    names = sorted(eff)
    total = sum(eff[n] for n in names)
    x = rng.random() * total
    acc = 0.0
    for name in names:
        acc += eff[name]
        if x < acc:
            return name
    return names[-1]  # float rounding at the top end


# ---- weight source backed by the API server ----------------------------------------------------------


class _CustomObjects(Protocol):
    def get_namespaced_custom_object(
        self,
        group: str,
        version: str,
        namespace: str,
        plural: str,
        name: str,
        *,
        _request_timeout: float | None = ...,
    ) -> Any: ...


class HTTPRouteWeights:
    """Callable that reads backend weights from an HTTPRoute in the API server."""

    def __init__(
        self,
        api: Any = None,
        namespace: str = "default",
        name: str = "",
        rule_index: int = 0,
        *,
        custom_objects: _CustomObjects | None = None,
        request_timeout: float = 2.0,
    ) -> None:
        if custom_objects is None:
            from kubernetes import client

            self.custom_objects: _CustomObjects = client.CustomObjectsApi(api)
        else:
            self.custom_objects = custom_objects
        self.namespace = namespace
        self.name = name
        self.rule_index = rule_index
        self.request_timeout = request_timeout

    def __call__(self) -> dict[str, int]:
        obj = self.custom_objects.get_namespaced_custom_object(
            GATEWAY_GROUP,
            GATEWAY_VERSION,
            self.namespace,
            HTTPROUTE_PLURAL,
            self.name,
            _request_timeout=self.request_timeout,
        )
        return parse_weights(obj, self.rule_index)


# ---- HTTP client -----------------------------------------------------------------------------------


class _Backend:
    def __init__(self, name: str, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"backend {name!r}: URL must be http://host:port, got {url!r}")
        self.name = name
        self.url = url.rstrip("/")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.prefix = parts.path.rstrip("/")


_RETRYABLE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


class _Connections:
    """Keep-alive connections of one worker thread, one per backend."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._conns: dict[str, http.client.HTTPConnection] = {}

    def post(self, backend: _Backend, path: str, body: Mapping[str, Any] | None) -> tuple[int, bytes]:
        status, payload, _ = self.post_with_headers(backend, path, body)
        return status, payload

    def post_with_headers(
        self,
        backend: _Backend,
        path: str,
        body: Mapping[str, Any] | None,
        extra_headers: Mapping[str, str] | None = None,
    ) -> tuple[int, bytes, http.client.HTTPMessage]:
        data = json.dumps(body if body is not None else {}).encode()
        headers = {"Content-Type": "application/json", **(extra_headers or {})}
        for attempt in range(2):
            conn = self._conns.get(backend.name)
            reused = conn is not None
            if conn is None:
                conn = http.client.HTTPConnection(backend.host, backend.port, timeout=self.timeout)
                self._conns[backend.name] = conn
            try:
                conn.request("POST", backend.prefix + path, body=data, headers=headers)
                resp = conn.getresponse()
                payload = resp.read()
                if resp.will_close:
                    self.drop(backend.name)
                return resp.status, payload, resp.headers
            except _RETRYABLE:
                self.drop(backend.name)
                if not reused or attempt:  # only an idle keep-alive connection closed by the server
                    raise
            except BaseException:
                self.drop(backend.name)
                raise
        raise AssertionError("unreachable")

    def drop(self, name: str) -> None:
        conn = self._conns.pop(name, None)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        for name in list(self._conns):
            self.drop(name)


# ---- the generator ---------------------------------------------------------------------------------


class LoadGenerator:
    """Sends ``rps`` requests per second split by HTTPRoute weights; runs in background threads.

    Stops by itself after ``max_seconds`` or ``max_requests`` dispatched requests, whichever
    comes first. ``weight_source`` replaces the HTTPRoute reader (tests without an API server).
    Requests the workers cannot take in time are dropped and counted (open-loop load).
    ``via`` sends every request to that proxy URL instead (see the module docstring); without
    ``api`` or ``weight_source`` it then reads no weights at all.
    """

    def __init__(
        self,
        api: Any,
        namespace: str,
        httproute: str,
        backends: Mapping[str, str],
        rps: float,
        max_seconds: float,
        max_requests: int,
        feedback: bool = True,
        seed: int | None = None,
        skew: Mapping[str, float] | None = None,
        workers: int = 8,
        rule_index: int = 0,
        weight_source: WeightSource | None = None,
        poll_interval: float = 1.0,
        request_timeout: float = 2.0,
        via: str | None = None,
        users: int = 0,
        user_header: str | None = "X-User-Id",
        cookies: bool = False,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if not backends:
            raise ValueError("backends must name at least one backend")
        if not (math.isfinite(rps) and 0 < rps <= MAX_RPS):
            raise ValueError(f"rps must be in (0, {MAX_RPS:g}], got {rps}")
        if not (math.isfinite(max_seconds) and max_seconds > 0):
            raise ValueError(f"max_seconds must be positive, got {max_seconds}")
        if max_requests < 0:
            raise ValueError(f"max_requests must be >= 0, got {max_requests}")
        if not 1 <= workers <= MAX_WORKERS:
            raise ValueError(f"workers must be in [1, {MAX_WORKERS}], got {workers}")
        if not (math.isfinite(poll_interval) and poll_interval > 0):
            raise ValueError(f"poll_interval must be positive, got {poll_interval}")
        if not 0 <= users <= MAX_USERS:
            raise ValueError(f"users must be in [0, {MAX_USERS}], got {users}")
        self.users = users
        self.user_header = user_header
        self.cookies = cookies
        self.headers = dict(headers or {})
        self._jars: dict[int, dict[str, str]] = {}
        self._user_backends: dict[int, dict[str, int]] = {}
        self.namespace = namespace
        self.httproute = httproute
        self.rps = float(rps)
        self.max_seconds = float(max_seconds)
        self.max_requests = int(max_requests)
        self.feedback = feedback
        self.seed = seed
        self.workers = workers
        self.rule_index = rule_index
        self.poll_interval = poll_interval
        self.request_timeout = request_timeout
        self._backends = {name: _Backend(name, url) for name, url in backends.items()}
        self._via = _Backend(VIA_UNATTRIBUTED, via) if via is not None else None
        if weight_source is None and self._via is not None and api is None:
            weight_source = dict
        if weight_source is None:
            weight_source = HTTPRouteWeights(
                api, namespace, httproute, rule_index, request_timeout=request_timeout
            )
        self._weight_source = weight_source

        self._lock = threading.Lock()
        self._skew: dict[str, float] = {}
        self.set_skew(skew or {})
        self._weights: dict[str, int] = {}
        self._history: list[tuple[float, dict[str, int]]] = []
        self._weight_reads = 0
        self._weight_errors = 0
        self._last_weight_error = ""
        self._sent: dict[str, int] = {name: 0 for name in self._backends}
        self._ok: dict[str, int] = {name: 0 for name in self._backends}
        self._errors: dict[str, int] = {name: 0 for name in self._backends}
        self._feedback_sent: dict[str, int] = {name: 0 for name in self._backends}
        self._feedback_positive: dict[str, int] = {name: 0 for name in self._backends}
        self._feedback_errors = 0
        self._dropped = 0
        self._no_route = 0
        self._latency_sum = 0.0

        self._rng = random.Random(seed)
        self._queue: queue.Queue[tuple[str, int | None] | None] = queue.Queue(maxsize=max(4, workers * 4))
        self._stop = threading.Event()
        self._done = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started_at: float | None = None
        self._finished_at: float | None = None

    # -- control --
    def start(self) -> LoadGenerator:
        if self._threads:
            raise RuntimeError("already started")
        self._started_at = time.monotonic()
        self._poll_weights()  # first weights before the first request
        self._threads = [
            threading.Thread(target=self._poll_loop, name="loadgen-weights", daemon=True),
            threading.Thread(target=self._schedule_loop, name="loadgen-scheduler", daemon=True),
        ]
        base = 0 if self.seed is None else self.seed
        for i in range(self.workers):
            rng = random.Random(f"{base}-worker-{i}") if self.seed is not None else random.Random()
            self._threads.append(
                threading.Thread(
                    target=self._worker_loop, args=(rng,), name=f"loadgen-worker-{i}", daemon=True
                )
            )
        for t in self._threads:
            t.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop sending and join every thread (by default within ``request_timeout`` + 2 s)."""
        self._stop.set()
        deadline = time.monotonic() + (timeout if timeout is not None else self.request_timeout + 2.0)
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the generator finished by itself (or was stopped); True if it has."""
        return self._done.wait(timeout)

    @property
    def running(self) -> bool:
        return bool(self._threads) and not self._done.is_set()

    def set_skew(self, skew: Mapping[str, float]) -> None:
        """Multiply backends' weights (before normalising) from now on; missing names mean 1."""
        clean: dict[str, float] = {}
        for name, factor in skew.items():
            f = float(factor)
            if not (math.isfinite(f) and f >= 0):
                raise ValueError(f"skew for {name!r} must be a finite number >= 0, got {factor!r}")
            clean[name] = f
        with self._lock:
            self._skew = clean

    def __enter__(self) -> LoadGenerator:
        if not self._threads:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- observation --
    @property
    def weights(self) -> dict[str, int]:
        with self._lock:
            return dict(self._weights)

    @property
    def weight_history(self) -> list[tuple[float, dict[str, int]]]:
        """(time.monotonic(), weights) each time the weights read differed from the previous read."""
        with self._lock:
            return [(t, dict(w)) for t, w in self._history]

    @property
    def skew(self) -> dict[str, float]:
        with self._lock:
            return dict(self._skew)

    @property
    def sent(self) -> dict[str, int]:
        with self._lock:
            return dict(self._sent)

    @property
    def ok(self) -> dict[str, int]:
        with self._lock:
            return dict(self._ok)

    @property
    def errors(self) -> dict[str, int]:
        with self._lock:
            return dict(self._errors)

    @property
    def weight_errors(self) -> int:
        with self._lock:
            return self._weight_errors

    def stats(self) -> dict[str, Any]:
        with self._lock:
            end = self._finished_at if self._finished_at is not None else time.monotonic()
            elapsed = end - self._started_at if self._started_at is not None else 0.0
            total_sent = sum(self._sent.values())
            total_ok = sum(self._ok.values())
            return {
                "elapsed_s": round(elapsed, 3),
                "running": bool(self._threads) and not self._done.is_set(),
                "weights": dict(self._weights),
                "skew": dict(self._skew),
                "sent": dict(self._sent),
                "ok": dict(self._ok),
                "errors": dict(self._errors),
                "total_sent": total_sent,
                "total_ok": total_ok,
                "total_errors": sum(self._errors.values()),
                "feedback_sent": dict(self._feedback_sent),
                "feedback_positive": dict(self._feedback_positive),
                "feedback_errors": self._feedback_errors,
                "dropped": self._dropped,
                "no_route": self._no_route,
                "weight_reads": self._weight_reads,
                "weight_errors": self._weight_errors,
                "last_weight_error": self._last_weight_error,
                "weight_changes": len(self._history),
                "mean_latency_s": self._latency_sum / total_ok if total_ok else None,
            }

    # -- threads --
    def _poll_weights(self) -> None:
        try:
            raw = self._weight_source()
            new = {str(k): int(v) for k, v in raw.items()}
        except Exception as exc:  # keep the last weights; the error is counted and shown in stats()
            with self._lock:
                self._weight_reads += 1
                self._weight_errors += 1
                self._last_weight_error = f"{type(exc).__name__}: {exc}"[:300]
            return
        with self._lock:
            self._weight_reads += 1
            if new != self._weights or not self._history:
                self._weights = new
                self._history.append((time.monotonic(), dict(new)))
                if len(self._history) > MAX_HISTORY:
                    del self._history[: len(self._history) - MAX_HISTORY]

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.poll_interval) and not self._done.is_set():
            self._poll_weights()

    def _schedule_loop(self) -> None:
        assert self._started_at is not None
        start = self._started_at
        deadline = start + self.max_seconds
        interval = 1.0 / self.rps
        next_at = start
        issued = 0
        try:
            while issued < self.max_requests and not self._stop.is_set():
                now = time.monotonic()
                if now >= deadline:
                    break
                if next_at > now:
                    if self._stop.wait(min(next_at, deadline) - now):
                        break
                    continue
                if now - next_at > MAX_LAG_S:  # fell far behind (e.g. suspended): do not burst
                    next_at = now
                next_at += interval
                with self._lock:
                    weights = dict(self._weights)
                    skew = dict(self._skew)
                name = VIA_UNATTRIBUTED if self._via is not None else choose(weights, self._rng, skew)
                user = issued % self.users if self.users else None
                issued += 1
                if name is None:
                    with self._lock:
                        self._no_route += 1
                    continue
                try:
                    self._queue.put_nowait((name, user))
                except queue.Full:
                    with self._lock:
                        self._dropped += 1
        finally:
            if not self._stop.is_set():
                # Finished by itself: let the workers take the queued requests, then exit.
                for _ in range(self.workers):
                    try:
                        self._queue.put(None, timeout=self.request_timeout * 2 + 1.0)
                    except queue.Full:
                        self._stop.set()
                        break
            self._finish_when_workers_exit()

    def _finish_when_workers_exit(self) -> None:
        for t in self._threads:
            if t.name.startswith("loadgen-worker") and t is not threading.current_thread():
                t.join(self.request_timeout * 2 + 2.0)
        with self._lock:
            self._finished_at = time.monotonic()
        self._stop.set()  # wakes the weight poller so it exits too
        self._done.set()

    def _worker_loop(self, rng: random.Random) -> None:
        conns = _Connections(self.request_timeout)
        try:
            while True:
                try:
                    item = self._queue.get(timeout=0.2)
                except queue.Empty:
                    if self._stop.is_set():
                        return
                    continue
                if item is None or self._stop.is_set():
                    return
                self._one_request(item[0], rng, conns, item[1])
        finally:
            conns.close()

    def _request_headers(self, user: int | None) -> dict[str, str]:
        """Fixed headers, then the user's id and the cookies the proxy set for this user."""
        out = dict(self.headers)
        if user is None:
            return out
        if self.user_header:
            out[self.user_header] = f"user-{user}"
        with self._lock:
            jar = dict(self._jars.get(user, {}))
        if jar:
            out["Cookie"] = "; ".join(f"{k}={v}" for k, v in jar.items())
        return out

    def _remember(self, user: int | None, name: str, headers: http.client.HTTPMessage | None) -> None:
        """Keep the cookies set for ``user`` and count which backend answered it."""
        if user is None:
            return
        jar: dict[str, str] = {}
        if self.cookies and headers is not None:
            for value in headers.get_all("Set-Cookie") or []:
                cookie = http.cookies.SimpleCookie()
                try:
                    cookie.load(value)
                except http.cookies.CookieError:
                    continue
                jar.update({k: m.value for k, m in cookie.items()})
        with self._lock:
            if jar:
                self._jars.setdefault(user, {}).update(jar)
            seen = self._user_backends.setdefault(user, {})
            seen[name] = seen.get(name, 0) + 1

    @property
    def user_backends(self) -> dict[str, dict[str, int]]:
        """Per simulated user (``user-<i>``): how many of its requests each backend answered."""
        with self._lock:
            return {f"user-{u}": dict(seen) for u, seen in self._user_backends.items()}

    def _one_request(
        self, name: str, rng: random.Random, conns: _Connections, user: int | None = None
    ) -> None:
        if self._via is not None:
            self._one_request_via(self._via, rng, conns, user)
            return
        backend = self._backends.get(name)
        with self._lock:
            self._sent[name] = self._sent.get(name, 0) + 1
            if backend is None:  # the route points at a service we have no server for: a 5xx at a gateway
                self._errors[name] = self._errors.get(name, 0) + 1
                return
        t0 = time.monotonic()
        try:
            status, body, _ = conns.post_with_headers(
                backend, "/predict", {"input": rng.random()}, self._request_headers(user)
            )
        except (OSError, http.client.HTTPException):
            status, body = 0, b""
        latency = time.monotonic() - t0
        if status == 200:
            self._remember(user, name, None)
        reply: dict[str, Any] = {}
        if status == 200:
            try:
                parsed = json.loads(body)
                if isinstance(parsed, dict):
                    reply = parsed
            except ValueError:
                status = 0
        with self._lock:
            if status == 200:
                self._ok[name] = self._ok.get(name, 0) + 1
                self._latency_sum += latency
            else:
                self._errors[name] = self._errors.get(name, 0) + 1
        if status != 200 or not self.feedback or self._stop.is_set():
            return
        self._send_feedback(backend, reply, rng, conns)

    def _one_request_via(
        self, via: _Backend, rng: random.Random, conns: _Connections, user: int | None = None
    ) -> None:
        t0 = time.monotonic()
        headers: http.client.HTTPMessage | None = None
        try:
            status, body, headers = conns.post_with_headers(
                via, "/predict", {"input": rng.random()}, self._request_headers(user)
            )
            name = headers.get(VIA_BACKEND_HEADER) or VIA_UNATTRIBUTED
        except (OSError, http.client.HTTPException):
            status, body, name = 0, b"", VIA_UNATTRIBUTED
        latency = time.monotonic() - t0
        if status == 200:
            self._remember(user, name, headers)
        reply: dict[str, Any] = {}
        if status == 200:
            try:
                parsed = json.loads(body)
                if isinstance(parsed, dict):
                    reply = parsed
            except ValueError:
                status = 0
        with self._lock:
            self._sent[name] = self._sent.get(name, 0) + 1
            if status == 200:
                self._ok[name] = self._ok.get(name, 0) + 1
                self._latency_sum += latency
            else:
                self._errors[name] = self._errors.get(name, 0) + 1
        backend = self._backends.get(name)
        if status != 200 or backend is None or not self.feedback or self._stop.is_set():
            return
        self._send_feedback(backend, reply, rng, conns)

    def _send_feedback(
        self, backend: _Backend, reply: Mapping[str, Any], rng: random.Random, conns: _Connections
    ) -> None:
        request_id = reply.get("request_id")
        p = _number(reply.get("satisfaction"), 0.0)
        mean = _number(reply.get("reward_mean"), 0.0)
        sd = max(0.0, _number(reply.get("reward_sd"), 0.0))
        positive = rng.random() < min(1.0, max(0.0, p))
        reward = rng.gauss(mean, sd) if sd > 0 else mean
        payload = {"request_id": str(request_id), "positive": positive, "reward": reward}
        try:
            status, _ = conns.post(backend, "/feedback", payload)
        except (OSError, http.client.HTTPException):
            status = 0
        with self._lock:
            if status == 204:
                self._feedback_sent[backend.name] = self._feedback_sent.get(backend.name, 0) + 1
                if positive:
                    self._feedback_positive[backend.name] = self._feedback_positive.get(backend.name, 0) + 1
            else:
                self._feedback_errors += 1


def _number(value: Any, default: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return default
    return float(value)


# ---- command line ----------------------------------------------------------------------------------


def _pair(kind: str, value: str) -> tuple[str, str]:
    name, sep, rest = value.partition("=")
    if not sep or not name or not rest:
        raise argparse.ArgumentTypeError(f"--{kind} must look like NAME=VALUE, got {value!r}")
    return name, rest


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tests.harness.loadgen", description=(__doc__ or "").strip().split("\n")[0]
    )
    p.add_argument("--kubeconfig", required=True, help="kubeconfig of the API server holding the HTTPRoute")
    p.add_argument(
        "--via",
        default=None,
        metavar="URL",
        help="send every request through this proxy (e.g. the harness's nginx gateway) instead of "
        "picking a backend; responses are counted by its X-Gateway-Backend header",
    )
    p.add_argument("--namespace", required=True)
    p.add_argument("--httproute", required=True, help="name of the HTTPRoute whose weights split the traffic")
    p.add_argument("--rule-index", type=int, default=0, help="which spec.rules entry to read (default 0)")
    p.add_argument(
        "--backend",
        action="append",
        required=True,
        type=lambda v: _pair("backend", v),
        metavar="SERVICE=URL",
        help="backendRef service name and the model server URL serving it (repeatable)",
    )
    p.add_argument("--rps", type=float, default=20.0)
    p.add_argument("--max-seconds", type=float, default=60.0)
    p.add_argument("--max-requests", type=int, default=None, help="default: rps * max-seconds")
    p.add_argument(
        "--skew",
        action="append",
        default=[],
        type=lambda v: _pair("skew", v),
        metavar="SERVICE=FACTOR",
        help="multiply a backend's weight (creates a sample-ratio mismatch; repeatable)",
    )
    p.add_argument("--no-feedback", action="store_true", help="do not post simulated user feedback")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--users", type=int, default=0, help="simulated users sending in turn (0: anonymous)")
    p.add_argument("--user-header", default="X-User-Id", help="header carrying each user's id")
    p.add_argument("--cookies", action="store_true", help="keep the cookies set for each user and send them")
    p.add_argument(
        "--header",
        action="append",
        default=[],
        type=lambda v: _pair("header", v),
        metavar="NAME=VALUE",
        help="a header on every request (repeatable)",
    )
    return p


def _line(gen: LoadGenerator) -> str:
    s = gen.stats()
    return (
        f"t={s['elapsed_s']:.1f}s weights={s['weights']} sent={s['sent']} ok={s['total_ok']} "
        f"errors={s['errors']} dropped={s['dropped']} no_route={s['no_route']} "
        f"weight_errors={s['weight_errors']}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    try:
        skew = {name: float(factor) for name, factor in args.skew}
    except ValueError:
        parser.error("--skew factors must be numbers")
    max_requests = args.max_requests
    if max_requests is None:
        max_requests = max(1, math.ceil(min(args.rps, MAX_RPS) * min(args.max_seconds, 7 * 86400.0)))

    from kubernetes import config

    api = config.new_client_from_config(config_file=args.kubeconfig)
    try:
        gen = LoadGenerator(
            api,
            args.namespace,
            args.httproute,
            dict(args.backend),
            rps=args.rps,
            max_seconds=args.max_seconds,
            max_requests=max_requests,
            feedback=not args.no_feedback,
            seed=args.seed,
            skew=skew,
            workers=args.workers,
            rule_index=args.rule_index,
            via=args.via,
            users=args.users,
            user_header=args.user_header or None,
            cookies=args.cookies,
            headers=dict(args.header),
        )
    except ValueError as exc:
        parser.error(str(exc))

    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

    gen.start()
    hard_deadline = time.monotonic() + args.max_seconds + 10.0
    try:
        while not gen.wait(1.0) and not stop.is_set() and time.monotonic() < hard_deadline:
            print(_line(gen), flush=True)
    finally:
        gen.stop()
        api.close()
    print("done " + _line(gen), flush=True)
    last_error = gen.stats()["last_weight_error"]
    if last_error:
        print(f"last weight read error: {last_error}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
