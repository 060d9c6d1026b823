"""The traffic generator: weight parsing and choice as pure functions, then a short real run."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.harness.loadgen import HTTPRouteWeights, LoadGenerator, choose, parse_weights, shares
from tests.harness.modelserver import REPO_ROOT, ModelServerProcess


def route(*refs: dict[str, Any], extra_rules: int = 0) -> dict[str, Any]:
    rules: list[dict[str, Any]] = [{"backendRefs": list(refs)}]
    rules += [{"backendRefs": [{"name": f"other-{i}", "port": 80}]} for i in range(extra_rules)]
    return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute", "spec": {"rules": rules}}


# ---- parse_weights -------------------------------------------------------------------------------


def test_parse_weights_reads_names_and_weights() -> None:
    obj = route({"name": "v1", "port": 80, "weight": 80}, {"name": "v2", "port": 80, "weight": 20})
    assert parse_weights(obj) == {"v1": 80, "v2": 20}


def test_parse_weights_missing_weight_is_one_and_zero_is_kept() -> None:
    obj = route({"name": "v1", "port": 80}, {"name": "v2", "weight": 0}, {"name": "v3", "weight": None})
    assert parse_weights(obj) == {"v1": 1, "v2": 0, "v3": 1}


def test_parse_weights_rule_index_and_duplicates() -> None:
    obj = route({"name": "v1", "weight": 3}, {"name": "v1", "weight": 2}, extra_rules=2)
    assert parse_weights(obj, 0) == {"v1": 5}
    assert parse_weights(obj, 2) == {"other-1": 1}
    with pytest.raises(ValueError, match="rule_index 3"):
        parse_weights(obj, 3)


def test_parse_weights_empty_backend_refs() -> None:
    assert parse_weights({"spec": {"rules": [{}]}}) == {}


@pytest.mark.parametrize(
    "obj",
    [
        {},
        {"spec": {}},
        {"spec": {"rules": []}},
        route({"port": 80}),
        route({"name": "v1", "weight": -1}),
        route({"name": "v1", "weight": "50"}),
        route({"name": "v1", "weight": 1.5}),
    ],
)
def test_parse_weights_rejects_malformed_routes(obj: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        parse_weights(obj)


# ---- choose ----------------------------------------------------------------------------------------


def draw(
    weights: dict[str, float], n: int, seed: int = 1, skew: dict[str, float] | None = None
) -> Counter[str]:
    rng = random.Random(seed)
    counts: Counter[str] = Counter()
    for _ in range(n):
        name = choose(weights, rng, skew)
        assert name is not None
        counts[name] += 1
    return counts


def test_choose_80_20_split() -> None:
    counts = draw({"v1": 80, "v2": 20}, 5000)
    assert abs(counts["v1"] / 5000 - 0.80) < 0.03
    assert abs(counts["v2"] / 5000 - 0.20) < 0.03


def test_choose_never_picks_weight_zero() -> None:
    counts = draw({"v1": 0, "v2": 1, "v3": 3}, 5000)
    assert counts["v1"] == 0
    assert abs(counts["v3"] / 5000 - 0.75) < 0.03


def test_choose_with_nothing_to_choose() -> None:
    rng = random.Random(0)
    assert choose({}, rng) is None
    assert choose({"v1": 0, "v2": 0}, rng) is None
    assert choose({"v1": 10}, rng, {"v1": 0.0}) is None


def test_skew_changes_the_split() -> None:
    # 50/50 weights, v2 doubled: v2 gets 2/3 of the traffic
    counts = draw({"v1": 50, "v2": 50}, 6000, skew={"v2": 2.0})
    assert abs(counts["v2"] / 6000 - 2 / 3) < 0.03
    assert shares({"v1": 50, "v2": 50}, {"v2": 2.0}) == pytest.approx({"v1": 1 / 3, "v2": 2 / 3})


def test_choose_is_reproducible_with_a_seed() -> None:
    weights = {"a": 1, "b": 2, "c": 3}
    seq1 = [choose(weights, rng) for rng in [random.Random(42)] for _ in range(200)]
    seq2 = [choose(weights, rng) for rng in [random.Random(42)] for _ in range(200)]
    assert seq1 == seq2
    # dict order must not matter
    seq3 = [choose(dict(reversed(weights.items())), rng) for rng in [random.Random(42)] for _ in range(200)]
    assert seq1 == seq3


# ---- HTTPRoute reader (fake CustomObjectsApi) -------------------------------------------------------


class FakeCustomObjects:
    def __init__(self, obj: dict[str, Any]) -> None:
        self.obj = obj
        self.calls: list[tuple[str, ...]] = []
        self.fail = False

    def get_namespaced_custom_object(
        self,
        group: str,
        version: str,
        namespace: str,
        plural: str,
        name: str,
        *,
        _request_timeout: float | None = None,
    ) -> Any:
        self.calls.append((group, version, namespace, plural, name))
        if self.fail:
            raise ConnectionError("api server down")
        return self.obj


def test_httproute_reader_asks_for_the_route() -> None:
    fake = FakeCustomObjects(route({"name": "v1", "weight": 9}, {"name": "v2"}))
    read = HTTPRouteWeights(namespace="ml", name="recsys", custom_objects=fake)
    assert read() == {"v1": 9, "v2": 1}
    assert fake.calls == [("gateway.networking.k8s.io", "v1", "ml", "httproutes", "recsys")]


# ---- a short real run against two model servers ----------------------------------------------------


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, ModelServerProcess]]:
    a = ModelServerProcess("stable", seed=1, latency_ms=1.0, positive_rate=0.9, max_seconds=120)
    b = ModelServerProcess("canary", seed=2, latency_ms=1.0, positive_rate=0.1, max_seconds=120)
    with a, b:
        yield {"svc-stable": a, "svc-canary": b}


def backends(servers: dict[str, ModelServerProcess]) -> dict[str, str]:
    return {name: srv.url for name, srv in servers.items()}


class SwitchableWeights:
    def __init__(self, weights: dict[str, int]) -> None:
        self.weights = weights
        self.fail = False
        self.lock = threading.Lock()

    def __call__(self) -> dict[str, int]:
        with self.lock:
            if self.fail:
                raise RuntimeError("read failed")
            return dict(self.weights)

    def set(self, weights: dict[str, int] | None = None, fail: bool = False) -> None:
        with self.lock:
            if weights is not None:
                self.weights = weights
            self.fail = fail


def feedback_totals(srv: ModelServerProcess) -> tuple[float, float]:
    pos = neg = 0.0
    for line in srv.metrics_text().splitlines():
        if line.startswith("model_feedback_total{") and 'feedback="positive"' in line:
            pos = float(line.rsplit(" ", 1)[1])
        if line.startswith("model_feedback_total{") and 'feedback="negative"' in line:
            neg = float(line.rsplit(" ", 1)[1])
    return pos, neg


def test_run_splits_by_weights_sends_feedback_and_stops_at_max_requests(
    servers: dict[str, ModelServerProcess],
) -> None:
    before = {name: feedback_totals(srv) for name, srv in servers.items()}
    source = SwitchableWeights({"svc-stable": 75, "svc-canary": 25})
    gen = LoadGenerator(
        None,
        "ml",
        "recsys",
        backends(servers),
        rps=400,
        max_seconds=10,
        max_requests=600,
        seed=3,
        workers=8,
        weight_source=source,
    )
    with gen:
        assert gen.wait(timeout=10), gen.stats()
    stats = gen.stats()
    assert stats["total_sent"] + stats["dropped"] == 600
    assert stats["dropped"] < 30  # the workers keep up, even on a busy machine
    assert stats["total_errors"] == 0
    assert stats["total_ok"] == stats["total_sent"]
    share = gen.sent["svc-stable"] / stats["total_sent"]
    assert abs(share - 0.75) < 0.06
    assert gen.weights == {"svc-stable": 75, "svc-canary": 25}
    # every OK answer got feedback, and the simulated users follow each server's satisfaction
    assert stats["feedback_errors"] == 0
    assert stats["feedback_sent"] == gen.ok
    for name, srv in servers.items():
        pos, neg = feedback_totals(srv)
        dpos, dneg = pos - before[name][0], neg - before[name][1]
        assert dpos + dneg == gen.ok[name]
        rate = dpos / (dpos + dneg)
        expected = 0.9 if name == "svc-stable" else 0.1
        assert abs(rate - expected) < 0.12, (name, rate)


def test_run_follows_weight_changes_skew_and_read_errors(servers: dict[str, ModelServerProcess]) -> None:
    source = SwitchableWeights({"svc-stable": 100, "svc-canary": 0})
    gen = LoadGenerator(
        None,
        "ml",
        "recsys",
        backends(servers),
        rps=200,
        max_seconds=10,
        max_requests=100_000,
        feedback=False,
        seed=5,
        weight_source=source,
        poll_interval=0.1,
    )
    with gen:
        time.sleep(0.5)
        assert gen.sent["svc-canary"] == 0
        stable_before = gen.sent["svc-stable"]
        assert stable_before > 0

        source.set({"svc-stable": 0, "svc-canary": 100})
        deadline = time.monotonic() + 3
        while gen.weights != {"svc-stable": 0, "svc-canary": 100} and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gen.weights == {"svc-stable": 0, "svc-canary": 100}
        time.sleep(0.3)
        assert gen.sent["svc-canary"] > 0
        mark = gen.sent

        # a failed read keeps the last weights and is counted
        source.set(fail=True)
        time.sleep(0.4)
        assert gen.weight_errors >= 1
        assert gen.weights == {"svc-stable": 0, "svc-canary": 100}
        source.set(fail=False)

        # skew: equal weights, but stable gets 3x
        source.set({"svc-stable": 50, "svc-canary": 50})
        gen.set_skew({"svc-stable": 3.0})
        time.sleep(0.3)
        mark = gen.sent
        time.sleep(1.5)
        now = gen.sent
    d_stable = now["svc-stable"] - mark["svc-stable"]
    d_canary = now["svc-canary"] - mark["svc-canary"]
    assert d_stable + d_canary > 100
    assert abs(d_stable / (d_stable + d_canary) - 0.75) < 0.12
    history = [w for _, w in gen.weight_history]
    assert history == [
        {"svc-stable": 100, "svc-canary": 0},
        {"svc-stable": 0, "svc-canary": 100},
        {"svc-stable": 50, "svc-canary": 50},
    ]
    times = [t for t, _ in gen.weight_history]
    assert times == sorted(times)
    assert not gen.running


def test_stops_at_max_seconds_and_stop_is_prompt(servers: dict[str, ModelServerProcess]) -> None:
    gen = LoadGenerator(
        None,
        "ml",
        "recsys",
        backends(servers),
        rps=50,
        max_seconds=0.6,
        max_requests=10_000,
        weight_source=lambda: {"svc-stable": 1},
    )
    t0 = time.monotonic()
    gen.start()
    assert gen.wait(timeout=5)
    assert time.monotonic() - t0 < 3
    assert 15 <= gen.stats()["total_sent"] <= 40  # about 0.6 s * 50 rps
    gen.stop()

    gen2 = LoadGenerator(
        None,
        "ml",
        "recsys",
        backends(servers),
        rps=50,
        max_seconds=60,
        max_requests=10_000,
        weight_source=lambda: {"svc-stable": 1},
    ).start()
    time.sleep(0.2)
    t0 = time.monotonic()
    gen2.stop()
    assert time.monotonic() - t0 < 3
    assert not any(t.is_alive() for t in threading.enumerate() if t.name.startswith("loadgen-"))


def test_unknown_backend_and_unreachable_server_count_as_errors(
    servers: dict[str, ModelServerProcess],
) -> None:
    dead = ModelServerProcess("dead", max_seconds=30).start()
    dead_url = dead.url
    dead.stop()
    gen = LoadGenerator(
        None,
        "ml",
        "recsys",
        {"svc-dead": dead_url, **backends(servers)},
        rps=100,
        max_seconds=5,
        max_requests=60,
        seed=1,
        weight_source=lambda: {"svc-dead": 1, "svc-missing": 1, "svc-stable": 1},
        request_timeout=1.0,
    )
    with gen:
        assert gen.wait(timeout=8)
    errors, sent = gen.errors, gen.sent
    assert errors["svc-dead"] == sent["svc-dead"] > 0
    assert errors["svc-missing"] == sent["svc-missing"] > 0
    assert errors["svc-stable"] == 0
    assert gen.ok["svc-stable"] == sent["svc-stable"] > 0


def test_constructor_validates_arguments() -> None:
    ok: dict[str, Any] = {
        "backends": {"a": "http://127.0.0.1:1"},
        "rps": 10,
        "max_seconds": 1,
        "max_requests": 1,
        "weight_source": dict,
    }
    LoadGenerator(None, "ns", "r", **ok)
    bad_args: list[dict[str, Any]] = [
        {"rps": 0},
        {"rps": float("inf")},
        {"max_seconds": 0},
        {"max_requests": -1},
        {"workers": 0},
        {"backends": {}},
        {"backends": {"a": "https://127.0.0.1:1"}},
        {"skew": {"a": -1.0}},
    ]
    for bad in bad_args:
        with pytest.raises(ValueError):
            LoadGenerator(None, "ns", "r", **{**ok, **bad})


# ---- the command line, against a stand-in for the API server's HTTPRoute endpoint ---------------------


class _RouteHandler(BaseHTTPRequestHandler):
    route: dict[str, Any] = {}
    path_seen: list[str] = []

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.path_seen.append(self.path)
        if self.path.split("?")[0] == "/apis/gateway.networking.k8s.io/v1/namespaces/ml/httproutes/recsys":
            body, code = json.dumps(self.route).encode(), 200
        else:
            body, code = b'{"kind":"Status","code":404}', 404
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_cli_reads_the_route_through_the_kubernetes_client(
    servers: dict[str, ModelServerProcess], tmp_path: Path
) -> None:
    _RouteHandler.route = route({"name": "svc-stable", "weight": 0}, {"name": "svc-canary"})
    _RouteHandler.path_seen = []
    api = ThreadingHTTPServer(("127.0.0.1", 0), _RouteHandler)
    thread = threading.Thread(target=api.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {"name": "c", "cluster": {"server": f"http://127.0.0.1:{api.server_address[1]}"}}
                ],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "tests.harness.loadgen",
                "--kubeconfig",
                str(kubeconfig),
                "--namespace",
                "ml",
                "--httproute",
                "recsys",
                "--backend",
                f"svc-stable={servers['svc-stable'].url}",
                "--backend",
                f"svc-canary={servers['svc-canary'].url}",
                "--rps",
                "40",
                "--max-seconds",
                "1.6",
                "--skew",
                "svc-canary=2",
                "--no-feedback",
            ],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        api.shutdown()
        api.server_close()
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    # the first progress line comes about a second in (later on a loaded machine); its weights are exact
    assert re.match(r"t=1\.\ds weights=\{'svc-stable': 0, 'svc-canary': 1\}", lines[0]), lines[0]
    assert lines[-1].startswith("done ")
    assert "'svc-stable': 0" in lines[-1]  # weight 0: no traffic
    assert "weight_errors=0" in lines[-1]
    assert len(_RouteHandler.path_seen) >= 2  # read at start and re-read every second


def test_cli_requires_backends() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.harness.loadgen",
            "--kubeconfig",
            "x",
            "--namespace",
            "n",
            "--httproute",
            "r",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "--backend" in proc.stderr
