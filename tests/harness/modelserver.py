"""A small, real model server used by the integration tests and the demo.

Run it as a process::

    python -m tests.harness.modelserver --variant stable --port 0

It prints exactly one line, ``listening http://127.0.0.1:PORT``, on stdout once it
accepts connections (``--port 0`` picks a free port), and exits by itself after
``--max-seconds`` or on SIGTERM/SIGINT.

Endpoints
---------
``POST /predict``   200 with a prediction (or 500 with probability ``error_rate``)
``POST /feedback``  204; records simulated user feedback and an optional reward
``GET  /metrics``   Prometheus text exposition (private registry)
``GET  /admin``     current parameters as JSON
``POST /admin``     change any subset of the parameters at run time
``GET  /healthz``   200

Metric names are a contract with the PromQL used elsewhere (see ``METRIC_NAMES``);
every series carries the label ``variant``.

Model lifecycle signals (``LIFECYCLE_METRIC_NAMES``, added after the metrics above, which are
unchanged):

* every prediction belongs to a segment, label ``region`` (``--segments``, default four regions,
  drawn by ``segment_share`` or taken from the request's ``"region"``); each segment's positive rate is
  ``segment_positive_rate[region]`` (default ``positive_rate``): ``model_segment_requests_total`` and
  ``model_segment_feedback_total{region,feedback}``;
* the model's predicted probability (``score`` in the reply) is the request's true positive rate
  (``satisfaction``), drawn from Beta(mean = the segment's rate, concentration =
  ``score_concentration``; 0 = always the rate itself), plus ``score_bias`` (miscalibration), clipped
  to [0, 1]: ``model_prediction_score`` (a histogram, buckets 0.1 .. 1.0);
* calibration counters by predicted-probability bin (``bin`` = the bin's upper bound, 0.1 .. 1) and
  outcome: ``model_calibration_outcomes_total{bin,outcome}`` and
  ``model_calibration_score_sum_total{bin}``;
* labels (feedback, rewards and all the counters they move) are counted ``label delay`` seconds after
  they are posted: uniform on [``label_delay_min_s``, ``label_delay_max_s``], or, with
  ``label_delay_mean_s`` > 0, that minimum plus an exponential with that mean truncated at the maximum.
  With the defaults (0) feedback counts at once, as before.

:class:`ModelServerProcess` starts the module as a subprocess for tests.
"""

from __future__ import annotations

import argparse
import heapq
import http.client
import ipaddress
import json
import math
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any
from urllib.parse import urlsplit

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
LISTENING_PREFIX = "listening "

#: Exposed sample names (as Prometheus sees them). Other files build PromQL from these.
REQUESTS_TOTAL = "model_requests_total"
REQUEST_DURATION_SECONDS = "model_request_duration_seconds"
FEEDBACK_TOTAL = "model_feedback_total"
REWARD_SUM_TOTAL = "model_reward_sum_total"
REWARD_COUNT_TOTAL = "model_reward_count_total"
REWARD_SQUARES_TOTAL = "model_reward_squares_total"
DRIFT_SCORE = "model_drift_score"
CALIBRATION_ERROR = "model_calibration_error"
METRIC_NAMES: tuple[str, ...] = (
    REQUESTS_TOTAL,
    REQUEST_DURATION_SECONDS,
    FEEDBACK_TOTAL,
    REWARD_SUM_TOTAL,
    REWARD_COUNT_TOTAL,
    REWARD_SQUARES_TOTAL,
    DRIFT_SCORE,
    CALIBRATION_ERROR,
)
SEGMENT_REQUESTS_TOTAL = "model_segment_requests_total"
SEGMENT_FEEDBACK_TOTAL = "model_segment_feedback_total"
PREDICTION_SCORE = "model_prediction_score"
CALIBRATION_OUTCOMES_TOTAL = "model_calibration_outcomes_total"
CALIBRATION_SCORE_SUM_TOTAL = "model_calibration_score_sum_total"
LIFECYCLE_METRIC_NAMES: tuple[str, ...] = (
    SEGMENT_REQUESTS_TOTAL,
    SEGMENT_FEEDBACK_TOTAL,
    PREDICTION_SCORE,
    CALIBRATION_OUTCOMES_TOTAL,
    CALIBRATION_SCORE_SUM_TOTAL,
)
#: The segment label's name and its default values.
SEGMENT_LABEL = "region"
DEFAULT_SEGMENTS: tuple[str, ...] = ("north", "south", "east", "west")
#: Upper bounds of the score histogram's buckets and of the calibration bins.
SCORE_BUCKETS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
MAX_LABEL_DELAY_S = 86_400.0

#: Histogram buckets for request latency: 1 ms to 2 s.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    0.75,
    1.0,
    1.5,
    2.0,
)

MAX_LATENCY_MS = 60_000.0
MAX_BODY_BYTES = 1 << 20
LATENCY_JITTER = 0.1  # +-10 % of the configured latency
IDLE_CONNECTION_TIMEOUT_S = 30.0


class ParamError(ValueError):
    """An invalid parameter; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass
class Params:
    """Behaviour of the simulated model; every field can be changed through ``POST /admin``."""

    error_rate: float = 0.0
    latency_ms: float = 10.0
    positive_rate: float = 0.6
    reward_mean: float = 1.0
    reward_sd: float = 0.5
    drift: float = 0.05
    calibration_error: float = 0.02
    score_concentration: float = 0.0
    score_bias: float = 0.0
    label_delay_min_s: float = 0.0
    label_delay_max_s: float = 0.0
    label_delay_mean_s: float = 0.0
    #: {segment: positive rate}; a segment not named uses ``positive_rate``.
    segment_positive_rate: dict[str, float] = field(default_factory=dict)
    #: {segment: share of the traffic} (relative weights); a segment not named has weight 1.
    segment_share: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        for f in fields(self):
            _check_param(f.name, getattr(self, f.name))
        if self.label_delay_max_s < self.label_delay_min_s:
            raise ParamError("label_delay_max_s", "must be >= label_delay_min_s")

    def updated(self, changes: Mapping[str, Any]) -> Params:
        """Return a copy with ``changes`` applied; raise :class:`ParamError` naming the bad field."""
        if not isinstance(changes, Mapping):
            raise ParamError("body", "must be a JSON object")
        known = {f.name for f in fields(self)}
        values = asdict(self)
        for name, value in changes.items():
            if name not in known:
                raise ParamError(str(name), f"unknown field; allowed: {', '.join(sorted(known))}")
            values[name] = _check_param(name, value)
        new = Params(**values)
        new.validate()
        return new


_UNIT_INTERVAL = ("error_rate", "positive_rate", "calibration_error")
_NON_NEGATIVE = ("reward_sd", "drift", "score_concentration")
_DELAYS = ("label_delay_min_s", "label_delay_max_s", "label_delay_mean_s")
_MAPPINGS = {"segment_positive_rate": (0.0, 1.0), "segment_share": (0.0, math.inf)}


def _check_param(name: str, value: Any) -> Any:
    if name in _MAPPINGS:
        return _check_mapping(name, value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ParamError(name, f"must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ParamError(name, f"must be finite, got {value!r}")
    if name in _UNIT_INTERVAL and not 0.0 <= number <= 1.0:
        raise ParamError(name, f"must be in [0, 1], got {value!r}")
    if name in _NON_NEGATIVE and number < 0.0:
        raise ParamError(name, f"must be >= 0, got {value!r}")
    if name == "latency_ms" and not 0.0 <= number <= MAX_LATENCY_MS:
        raise ParamError(name, f"must be in [0, {MAX_LATENCY_MS:g}], got {value!r}")
    if name == "score_bias" and not -1.0 <= number <= 1.0:
        raise ParamError(name, f"must be in [-1, 1], got {value!r}")
    if name in _DELAYS and not 0.0 <= number <= MAX_LABEL_DELAY_S:
        raise ParamError(name, f"must be in [0, {MAX_LABEL_DELAY_S:g}], got {value!r}")
    return number


def _check_mapping(name: str, value: Any) -> dict[str, float]:
    if not isinstance(value, Mapping):
        raise ParamError(name, f"must be an object of segment: number, got {value!r}")
    lo, hi = _MAPPINGS[name]
    out: dict[str, float] = {}
    for key, v in value.items():
        if not isinstance(key, str) or not key:
            raise ParamError(name, f"segment names must be non-empty strings, got {key!r}")
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or not lo <= v <= hi:
            raise ParamError(name, f"{key}: must be a number in [{lo:g}, {hi:g}], got {v!r}")
        out[key] = float(v)
    return out


def score_bin(score: float) -> str:
    """The calibration bin of a predicted probability: its upper bound as text ("0.1" .. "1")."""
    for upper in SCORE_BUCKETS:
        if score <= upper:
            return f"{upper:g}"
    return f"{SCORE_BUCKETS[-1]:g}"


class ModelMetrics:
    """The server's Prometheus metrics, in a private registry."""

    def __init__(
        self,
        variant: str,
        registry: CollectorRegistry | None = None,
        segments: tuple[str, ...] = DEFAULT_SEGMENTS,
    ) -> None:
        self.variant = variant
        self.segments = segments
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        # prometheus_client appends "_total" to counter names when it exposes them.
        self.requests = Counter(
            "model_requests", "Prediction requests by HTTP status code.", ["variant", "code"], registry=r
        )
        self.duration = Histogram(
            "model_request_duration_seconds",
            "Time to serve a prediction request.",
            ["variant"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.feedback = Counter(
            "model_feedback", "User feedback received, by polarity.", ["variant", "feedback"], registry=r
        )
        self.reward_sum = Counter(
            "model_reward_sum", "Sum of rewards posted with feedback.", ["variant"], registry=r
        )
        self.reward_count = Counter(
            "model_reward_count", "Number of rewards posted with feedback.", ["variant"], registry=r
        )
        self.reward_squares = Counter(
            "model_reward_squares", "Sum of squared rewards posted with feedback.", ["variant"], registry=r
        )
        self.drift = Gauge("model_drift_score", "Simulated input drift score.", ["variant"], registry=r)
        self.calibration = Gauge(
            "model_calibration_error", "Simulated expected calibration error.", ["variant"], registry=r
        )
        # Create every series up front so rate() and increase() have data from the first scrape.
        for code in ("200", "500"):
            self.requests.labels(variant=variant, code=code)
        for polarity in ("positive", "negative"):
            self.feedback.labels(variant=variant, feedback=polarity)
        self.duration.labels(variant=variant)
        self.reward_sum.labels(variant=variant)
        self.reward_count.labels(variant=variant)
        self.reward_squares.labels(variant=variant)
        self._lifecycle_metrics(r)

    def _lifecycle_metrics(self, r: CollectorRegistry) -> None:
        """Segments, scores and calibration, registered after (and exposed after) the metrics above."""
        v, seg = self.variant, SEGMENT_LABEL
        self.segment_requests = Counter(
            "model_segment_requests", "Predictions served, by segment.", ["variant", seg], registry=r
        )
        self.segment_feedback = Counter(
            "model_segment_feedback",
            "User feedback received, by segment and polarity.",
            ["variant", seg, "feedback"],
            registry=r,
        )
        self.score = Histogram(
            "model_prediction_score",
            "The model's predicted probability.",
            ["variant"],
            buckets=SCORE_BUCKETS,
            registry=r,
        )
        self.calibration_outcomes = Counter(
            "model_calibration_outcomes",
            "Labelled predictions by predicted-probability bin (upper bound) and outcome.",
            ["variant", "bin", "outcome"],
            registry=r,
        )
        self.calibration_score_sum = Counter(
            "model_calibration_score_sum",
            "Sum of the predicted probabilities of labelled predictions, by bin.",
            ["variant", "bin"],
            registry=r,
        )
        for s in self.segments:
            self.segment_requests.labels(v, s)
            for polarity in ("positive", "negative"):
                self.segment_feedback.labels(v, s, polarity)
        self.score.labels(variant=v)
        for upper in SCORE_BUCKETS:
            b = f"{upper:g}"
            self.calibration_score_sum.labels(v, b)
            for outcome in ("positive", "negative"):
                self.calibration_outcomes.labels(v, b, outcome)

    def set_model_signals(self, params: Params) -> None:
        self.drift.labels(variant=self.variant).set(params.drift)
        self.calibration.labels(variant=self.variant).set(params.calibration_error)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class ModelState:
    """Parameters, random source and metrics shared by all request threads."""

    def __init__(
        self,
        variant: str,
        params: Params,
        seed: int | None = None,
        segments: tuple[str, ...] = DEFAULT_SEGMENTS,
    ) -> None:
        params.validate()
        if not segments or len(set(segments)) != len(segments) or not all(segments):
            raise ParamError("segments", "must be distinct non-empty names")
        self.variant = variant
        self.segments = segments
        self.metrics = ModelMetrics(variant, segments=segments)
        self._params = params
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        # Segments, scores and delays draw from their own source: the sequence above is unchanged.
        self._life_rng = random.Random(None if seed is None else seed + 1_000_003)
        self.feedback_unknown = 0  # feedback for request ids this server never issued
        # Bounded, insertion-ordered map of recent request ids to their (segment, score).
        self._issued: dict[str, tuple[str, float] | None] = {}
        self.labels = LabelQueue()
        self.metrics.set_model_signals(params)

    @property
    def params(self) -> Params:
        with self._lock:
            return self._params

    def update(self, changes: Mapping[str, Any]) -> Params:
        with self._lock:
            new = self._params.updated(changes)
            self._params = new
        self.metrics.set_model_signals(new)
        return new

    def draw(self) -> tuple[float, float, float]:
        """Return (u for the error decision, jitter factor, prediction) from the seeded source."""
        with self._lock:
            u = self._rng.random()
            jitter = 1.0 + self._rng.uniform(-LATENCY_JITTER, LATENCY_JITTER)
            prediction = self._rng.random()
        return u, jitter, prediction

    def draw_lifecycle(self, params: Params, region: Any = None) -> tuple[str, float, float]:
        """(segment, true positive rate, predicted probability) of one prediction.

        ``region``: the request's own segment when it names a known one; otherwise one is drawn by
        ``segment_share``.
        """
        with self._lock:
            rng = self._life_rng
            if not (isinstance(region, str) and region in self.segments):
                shares = [params.segment_share.get(s, 1.0) for s in self.segments]
                region = (
                    rng.choices(self.segments, weights=shares)[0] if sum(shares) > 0 else self.segments[0]
                )
            rate = params.segment_positive_rate.get(region, params.positive_rate)
            k = params.score_concentration
            truth = rate
            if k > 0 and 0.0 < rate < 1.0:
                truth = rng.betavariate(rate * k, (1.0 - rate) * k)
        score = min(1.0, max(0.0, truth + params.score_bias))
        return region, truth, score

    def label_delay(self, params: Params) -> float:
        """Seconds until a label posted now is counted (see the module docstring)."""
        lo, hi, mean = params.label_delay_min_s, params.label_delay_max_s, params.label_delay_mean_s
        if hi <= lo:
            return lo
        with self._lock:
            u = self._life_rng.random()
        if mean <= 0:
            return lo + u * (hi - lo)
        # Inverse CDF of an exponential with this mean, truncated to [0, hi - lo].
        return lo - mean * math.log(1.0 - u * (1.0 - math.exp(-(hi - lo) / mean)))

    def new_request_id(self, info: tuple[str, float] | None = None) -> str:
        rid = f"{self.variant}-{uuid.uuid4().hex[:16]}"
        with self._lock:
            self._issued[rid] = info
            if len(self._issued) > 100_000:
                self._issued.pop(next(iter(self._issued)))
        return rid

    def note_feedback_id(self, request_id: str) -> tuple[str, float] | None:
        """The request's (segment, score), or None (and counted) for an id this server never issued."""
        with self._lock:
            if request_id not in self._issued:
                self.feedback_unknown += 1
                return None
            return self._issued[request_id]


class LabelQueue:
    """Runs label callbacks after their delay, in due order, on one daemon thread (started lazily)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._cond = threading.Condition()
        self._seq = 0
        self._thread: threading.Thread | None = None

    def schedule(self, delay: float, fn: Callable[[], None]) -> None:
        if delay <= 0:
            fn()
            return
        with self._cond:
            self._seq += 1
            heapq.heappush(self._heap, (time.monotonic() + delay, self._seq, fn))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="labels", daemon=True)
                self._thread.start()
            self._cond.notify()

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._heap)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    timeout = None if not self._heap else self._heap[0][0] - time.monotonic()
                    self._cond.wait(timeout)
                _, _, fn = heapq.heappop(self._heap)
            fn()


class ModelRequestHandler(BaseHTTPRequestHandler):
    server: ModelHTTPServer
    protocol_version = "HTTP/1.1"  # keep-alive; every response carries Content-Length
    # Headers and body go out in separate writes: without TCP_NODELAY, Nagle's algorithm and the
    # client's delayed ACK add ~40 ms to every keep-alive request.
    disable_nagle_algorithm = True
    timeout = IDLE_CONNECTION_TIMEOUT_S
    server_version = "model-rollouts-test-modelserver/1"

    # ---- plumbing -------------------------------------------------------------------------------
    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:
            super().log_message(format, *args)

    def _send(self, status: int, body: bytes = b"", content_type: str = "application/json") -> None:
        self.send_response(status)
        if body or status != HTTPStatus.NO_CONTENT:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj).encode() + b"\n")

    def _error(self, status: int, message: str) -> None:
        self._send_json(status, {"error": message})

    def _read_body(self) -> bytes | None:
        """Read the request body; on a bad length reply 400/413 and return None."""
        raw = self.headers.get("Content-Length")
        if raw is None:
            if self.headers.get("Transfer-Encoding"):
                self.close_connection = True
                self._error(HTTPStatus.LENGTH_REQUIRED, "Content-Length required")
                return None
            return b""
        try:
            length = int(raw)
        except ValueError:
            self.close_connection = True
            self._error(HTTPStatus.BAD_REQUEST, "invalid Content-Length")
            return None
        if length < 0 or length > MAX_BODY_BYTES:
            self.close_connection = True
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body must be at most {MAX_BODY_BYTES} bytes")
            return None
        return self.rfile.read(length) if length else b""

    def _read_json(self, *, required: bool) -> tuple[bool, Any]:
        body = self._read_body()
        if body is None:
            return False, None
        if not body.strip():
            if required:
                self._error(HTTPStatus.BAD_REQUEST, "body: a JSON object is required")
                return False, None
            return True, None
        try:
            return True, json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            self._error(HTTPStatus.BAD_REQUEST, f"body: invalid JSON ({exc})")
            return False, None

    # ---- routing --------------------------------------------------------------------------------
    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        state = self.server.state
        if path == "/healthz":
            self._send(HTTPStatus.OK, b"ok\n", "text/plain; charset=utf-8")
        elif path == "/metrics":
            self._send(HTTPStatus.OK, state.metrics.exposition(), CONTENT_TYPE_LATEST)
        elif path == "/admin":
            self._send_json(HTTPStatus.OK, {"variant": state.variant, **asdict(state.params)})
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no such path: {path}")

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        if path == "/predict":
            self._predict()
        elif path == "/feedback":
            self._feedback()
        elif path == "/admin":
            self._admin()
        else:
            self._read_body()
            self._error(HTTPStatus.NOT_FOUND, f"no such path: {path}")

    # ---- endpoints ------------------------------------------------------------------------------
    def _predict(self) -> None:
        start = time.perf_counter()
        ok, payload = self._read_json(required=False)
        if not ok:
            return
        state = self.server.state
        params = state.params
        u, jitter, prediction = state.draw()
        if u < params.error_rate:
            code = HTTPStatus.INTERNAL_SERVER_ERROR
            body: dict[str, Any] = {"variant": state.variant, "error": "simulated model failure"}
        else:
            delay = params.latency_ms / 1000.0 * jitter
            if delay > 0:
                time.sleep(delay)
            code = HTTPStatus.OK
            hint = payload.get(SEGMENT_LABEL) if isinstance(payload, dict) else None
            region, truth, score = state.draw_lifecycle(params, hint)
            body = {
                "variant": state.variant,
                "request_id": state.new_request_id((region, score)),
                "prediction": prediction,
                "satisfaction": truth,
                "reward_mean": params.reward_mean,
                "reward_sd": params.reward_sd,
                SEGMENT_LABEL: region,
                "score": score,
            }
        m = state.metrics
        m.requests.labels(variant=state.variant, code=str(int(code))).inc()
        m.duration.labels(variant=state.variant).observe(time.perf_counter() - start)
        if code == HTTPStatus.OK:
            m.segment_requests.labels(state.variant, body[SEGMENT_LABEL]).inc()
            m.score.labels(variant=state.variant).observe(body["score"])
        self._send_json(code, body)

    def _feedback(self) -> None:
        ok, payload = self._read_json(required=True)
        if not ok:
            return
        if not isinstance(payload, dict):
            self._error(HTTPStatus.BAD_REQUEST, "body: must be a JSON object")
            return
        request_id = payload.get("request_id")
        if not isinstance(request_id, str) or not request_id:
            self._error(HTTPStatus.BAD_REQUEST, "request_id: required non-empty string")
            return
        positive = payload.get("positive")
        if not isinstance(positive, bool):
            self._error(HTTPStatus.BAD_REQUEST, "positive: required boolean")
            return
        reward = payload.get("reward")
        if reward is not None and (
            isinstance(reward, bool) or not isinstance(reward, int | float) or not math.isfinite(reward)
        ):
            self._error(HTTPStatus.BAD_REQUEST, "reward: must be a finite number")
            return
        state = self.server.state
        info = state.note_feedback_id(request_id)
        label = _Label(
            state.metrics, state.variant, positive, None if reward is None else float(reward), info
        )
        state.labels.schedule(state.label_delay(state.params), label.count)
        self._send(HTTPStatus.NO_CONTENT)

    def _admin(self) -> None:
        ok, payload = self._read_json(required=True)
        if not ok:
            return
        state = self.server.state
        try:
            new = state.update(payload)
        except ParamError as exc:
            self._send_json(HTTPStatus.BAD_REQUEST, {"error": str(exc), "field": exc.field})
            return
        self._send_json(HTTPStatus.OK, {"variant": state.variant, **asdict(new)})


@dataclass(frozen=True)
class _Label:
    """One posted label, counted when its delay has passed."""

    metrics: ModelMetrics
    variant: str
    positive: bool
    reward: float | None
    info: tuple[str, float] | None  # the prediction's (segment, score), if this server issued it

    def count(self) -> None:
        m, v = self.metrics, self.variant
        polarity = "positive" if self.positive else "negative"
        m.feedback.labels(variant=v, feedback=polarity).inc()
        if self.reward is not None:
            x = self.reward
            # Counter.inc() rejects negative amounts; Σx may go down, so adjust the value directly.
            _add(m.reward_sum.labels(variant=v), x)
            m.reward_count.labels(variant=v).inc()
            m.reward_squares.labels(variant=v).inc(x * x)
        if self.info is not None:
            region, score = self.info
            m.segment_feedback.labels(v, region, polarity).inc()
            b = score_bin(score)
            m.calibration_outcomes.labels(v, b, polarity).inc()
            m.calibration_score_sum.labels(v, b).inc(score)


def _add(counter_child: Any, amount: float) -> None:
    """Add a possibly negative amount to a counter child (Σx of rewards can decrease).

    The exposed series is still named ``*_total``; PromQL ``increase()`` on it is only used
    together with the count and squares to build means, and rewards are simulated around a
    positive mean, so resets are not inferred in practice. Positive amounts use ``inc``.
    """
    if amount >= 0:
        counter_child.inc(amount)
    else:
        counter_child._value.inc(amount)


class ModelHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], state: ModelState, verbose: bool = False) -> None:
        self.state = state
        self.verbose = verbose
        super().__init__(address, ModelRequestHandler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A proxy (nginx) closing an idle keep-alive connection is not an error worth a traceback."""
        if isinstance(sys.exc_info()[1], ConnectionResetError | BrokenPipeError):
            return
        super().handle_error(request, client_address)


# ---- command line -------------------------------------------------------------------------------


def _host(value: str) -> str:
    try:
        ipaddress.IPv4Address(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--host must be an IPv4 address, got {value!r}") from exc
    return value


def _json_object(value: str) -> dict[str, Any]:
    try:
        obj = json.loads(value)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return obj


def _names(value: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in value.split(","))
    if not all(names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"--segments must be distinct non-empty names, got {value!r}")
    return names


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tests.harness.modelserver", description=__doc__.split("\n")[0]
    )
    p.add_argument("--variant", required=True, help="value of the 'variant' label on every metric")
    p.add_argument("--port", type=int, default=0, help="TCP port; 0 picks a free one (default 0)")
    p.add_argument(
        "--host", type=_host, default="127.0.0.1", help="loopback address to bind (default 127.0.0.1)"
    )
    p.add_argument(
        "--allow-non-loopback", action="store_true", help="permit a --host that is not a loopback address"
    )
    defaults = Params()
    p.add_argument("--error-rate", type=float, default=defaults.error_rate)
    p.add_argument("--latency-ms", type=float, default=defaults.latency_ms)
    p.add_argument("--positive-rate", type=float, default=defaults.positive_rate)
    p.add_argument("--reward-mean", type=float, default=defaults.reward_mean)
    p.add_argument("--reward-sd", type=float, default=defaults.reward_sd)
    p.add_argument("--drift", type=float, default=defaults.drift)
    p.add_argument("--calibration-error", type=float, default=defaults.calibration_error)
    for name in ("score_concentration", "score_bias", *_DELAYS):
        p.add_argument(_flag(name), type=float, default=getattr(defaults, name))
    for name in _MAPPINGS:
        p.add_argument(_flag(name), type=_json_object, default={}, help="a JSON object {segment: number}")
    p.add_argument(
        "--segments",
        type=_names,
        default=DEFAULT_SEGMENTS,
        help=f"comma-separated values of the {SEGMENT_LABEL!r} label (default {','.join(DEFAULT_SEGMENTS)})",
    )
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-seconds", type=float, default=3600.0, help="exit after this long (default 3600)")
    p.add_argument("--exit-with-parent", action="store_true", help="exit when the parent process goes away")
    p.add_argument("--verbose", action="store_true", help="log every request to stderr")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    parser_error = parser.error
    if not args.allow_non_loopback and not ipaddress.IPv4Address(args.host).is_loopback:
        parser_error(f"--host {args.host} is not a loopback address (use --allow-non-loopback)")
    if not 0 <= args.port <= 65535:
        parser_error("--port must be in [0, 65535]")
    if not (math.isfinite(args.max_seconds) and args.max_seconds > 0):
        parser_error("--max-seconds must be a positive number")
    try:
        params = Params().updated({f.name: getattr(args, f.name) for f in fields(Params)})
    except ParamError as exc:
        parser_error(f"--{exc}")

    try:
        from prometheus_client import disable_created_metrics

        disable_created_metrics()  # no *_created series: less noise in Prometheus
    except ImportError:  # pragma: no cover - older prometheus_client
        pass

    state = ModelState(args.variant, params, seed=args.seed, segments=args.segments)
    server = ModelHTTPServer((args.host, args.port), state, verbose=args.verbose)
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

    serve = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    serve.start()
    port = server.server_address[1]
    print(f"{LISTENING_PREFIX}http://{args.host}:{port}", flush=True)

    parent = os.getppid()
    deadline = time.monotonic() + args.max_seconds
    while not stop.is_set():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        if args.exit_with_parent and os.getppid() != parent:
            break
        stop.wait(min(1.0, remaining))
    server.shutdown()
    server.server_close()
    serve.join(timeout=2.0)
    return 0


# ---- Python API for tests -------------------------------------------------------------------------


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class ModelServerProcess:
    """A model server running as a real child process.

    >>> with ModelServerProcess("candidate", error_rate=0.0, seed=1) as srv:  # doctest: +SKIP
    ...     srv.set(error_rate=0.5)

    Parameters are those of :class:`Params` (``error_rate=...`` etc.); ``seed``,
    ``max_seconds`` and ``segments`` are passed through. The child exits on its own when this
    process dies.
    """

    def __init__(
        self,
        variant: str,
        *,
        port: int = 0,
        host: str = "127.0.0.1",
        seed: int | None = None,
        max_seconds: float = 900.0,
        startup_timeout: float = 15.0,
        stop_timeout: float = 5.0,
        stderr: IO[Any] | int | None = None,
        verbose: bool = False,
        segments: tuple[str, ...] | None = None,
        **params: Any,
    ) -> None:
        Params().updated(params)  # validate names and values early (raises ParamError)
        self.segments = segments
        self.variant = variant
        self.host = host
        self.requested_port = port
        self.seed = seed
        self.max_seconds = max_seconds
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.params: dict[str, Any] = dict(params)
        self._stderr = stderr
        self._verbose = verbose
        self.proc: subprocess.Popen[str] | None = None
        self._url: str | None = None

    # -- lifecycle --
    def command(self) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "tests.harness.modelserver",
            "--variant",
            self.variant,
            "--host",
            self.host,
            "--port",
            str(self.requested_port),
            "--max-seconds",
            str(self.max_seconds),
            "--exit-with-parent",
        ]
        if self.seed is not None:
            cmd += ["--seed", str(self.seed)]
        for name, value in self.params.items():
            cmd += [_flag(name), json.dumps(value) if name in _MAPPINGS else repr(float(value))]
        if self.segments is not None:
            cmd += ["--segments", ",".join(self.segments)]
        if self._verbose:
            cmd.append("--verbose")
        return cmd

    def start(self) -> ModelServerProcess:
        if self.proc is not None:
            raise RuntimeError("already started")
        self.proc = subprocess.Popen(
            self.command(),
            cwd=str(REPO_ROOT),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            start_new_session=True,  # a Ctrl-C in the terminal goes to the test runner, which stops us
        )
        lines: queue.Queue[str] = queue.Queue(maxsize=1)
        stdout = self.proc.stdout
        assert stdout is not None

        def _read_first_line() -> None:
            try:
                lines.put_nowait(stdout.readline())  # "" on EOF if the child dies
            except (OSError, ValueError):  # the pipe was closed by stop()
                lines.put_nowait("")

        reader = threading.Thread(
            target=_read_first_line, name=f"modelserver-{self.variant}-stdout", daemon=True
        )
        reader.start()
        try:
            line = lines.get(timeout=self.startup_timeout)
        except queue.Empty:
            self.stop()
            reader.join(timeout=1.0)
            raise TimeoutError(
                f"model server {self.variant!r} printed no listening line within {self.startup_timeout}s"
            ) from None
        if not line.startswith(LISTENING_PREFIX):
            code = self.stop()
            raise RuntimeError(f"model server {self.variant!r} failed to start (exit {code}): {line!r}")
        self._url = line[len(LISTENING_PREFIX) :].strip()
        return self

    def stop(self) -> int | None:
        """Terminate the child (SIGTERM, then SIGKILL after ``stop_timeout``); return its exit code."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=self.stop_timeout)
        if proc.stdout is not None:
            proc.stdout.close()
        return proc.returncode

    def __enter__(self) -> ModelServerProcess:
        if self.proc is None:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- info --
    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("model server not started")
        return self._url

    @property
    def port(self) -> int:
        port = urlsplit(self.url).port
        assert port is not None
        return port

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("model server not started")
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- HTTP helpers --
    def request(self, method: str, path: str, body: Any = None, timeout: float = 5.0) -> tuple[int, bytes]:
        """Send one request (no proxies); return (status, body)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            headers = {}
            data = None
            if body is not None:
                data = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def set(self, **params: Any) -> dict[str, Any]:
        """Change parameters at run time (``POST /admin``); return the new parameters."""
        status, body = self.request("POST", "/admin", params)
        if status != HTTPStatus.OK:
            raise ValueError(
                f"model server {self.variant!r} rejected {params}: {body.decode(errors='replace')}"
            )
        result: dict[str, Any] = json.loads(body)
        return result

    def get_params(self) -> dict[str, Any]:
        status, body = self.request("GET", "/admin")
        if status != HTTPStatus.OK:
            raise RuntimeError(f"GET /admin returned {status}")
        result: dict[str, Any] = json.loads(body)
        return result

    def metrics_text(self) -> str:
        status, body = self.request("GET", "/metrics")
        if status != HTTPStatus.OK:
            raise RuntimeError(f"GET /metrics returned {status}")
        return body.decode()


if __name__ == "__main__":
    sys.exit(main())
