"""/readyz and /healthz decisions (operator/model_rollouts/health.py), over a real HTTP server.

The real-stack behaviour (a standby cut from the API server, RBAC without the watched kinds) is in
tests/integration/test_probes.py; here each condition is flipped on its own.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from model_rollouts import health, leader


def get(port: int, path: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture()
def probes(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[health.Probes, int]]:
    p = health.Probes(list_check=lambda: None)
    monkeypatch.setattr(health, "PROBES", p)
    monkeypatch.setattr(leader, "ELECTOR", leader.Elector(None, "", ""))
    server = health.serve("http://127.0.0.1:0/healthz")
    yield p, server.server_port
    p.stopping.set()
    server.shutdown()
    server.server_close()


def test_not_ready_until_kopf_has_started(probes: tuple[health.Probes, int]) -> None:
    p, port = probes
    status, body = get(port, "/readyz")
    assert status == 503 and body["problems"][0].startswith("starting")
    assert get(port, "/healthz")[0] == 200  # alive while starting
    p.started.set()
    p._check_list_once()
    assert get(port, "/readyz") == (200, {"ready": True, "role": "leader", "problems": []})


def test_a_replica_that_cannot_list_is_not_ready(probes: tuple[health.Probes, int]) -> None:
    p, port = probes
    p.started.set()

    def forbidden() -> str | None:
        raise ApiException(status=403, reason="Forbidden")

    p.list_check = forbidden
    p._check_list_once()
    status, body = get(port, "/readyz")
    assert status == 503 and body["problems"] == [
        "cannot list the watched objects: the API server answered 403 (ApiException)"
    ]
    assert get(port, "/healthz")[0] == 200


def test_a_stale_list_result_is_not_trusted(probes: tuple[health.Probes, int]) -> None:
    p, port = probes
    p.started.set()
    p._list_result = (time.monotonic() - 600, None)
    status, body = get(port, "/readyz")
    assert status == 503 and "last listed" in body["problems"][0]


def test_a_standby_without_api_contact_is_not_ready_a_fresh_one_is(
    probes: tuple[health.Probes, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    p, port = probes
    p.started.set()
    p._check_list_once()
    elector = leader.Elector(object(), "ops", "lease", lease_seconds=6, retry_seconds=1)  # type: ignore[arg-type]
    monkeypatch.setattr(leader, "ELECTOR", elector)
    status, body = get(port, "/readyz")
    assert status == 503 and body["role"] == "standby" and "has not been read yet" in body["problems"][0]
    elector._last_contact = time.monotonic()  # a standby's successful read of the Lease
    assert get(port, "/readyz") == (200, {"ready": True, "role": "standby", "problems": []})
    elector._last_contact = time.monotonic() - 7  # older than the lease
    status, body = get(port, "/readyz")
    assert status == 503 and "no answer from the API server" in body["problems"][0]
    elector._valid_until = time.monotonic() + 5
    elector._last_contact = time.monotonic()
    assert get(port, "/readyz")[1]["role"] == "leader"


def test_stopping_is_not_ready(probes: tuple[health.Probes, int]) -> None:
    p, port = probes
    p.started.set()
    p._check_list_once()
    p.stopping.set()
    status, body = get(port, "/readyz")
    assert status == 503 and body["problems"] == ["stopping"]


def test_a_blocked_event_loop_fails_liveness_and_readiness(
    probes: tuple[health.Probes, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    p, port = probes
    monkeypatch.setattr(health, "LOOP_TIMEOUT", 0.5)
    p.started.set()
    p._check_list_once()
    loop = asyncio.new_event_loop()
    release = threading.Event()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    p.loop = loop
    try:
        assert get(port, "/healthz")[0] == 200
        loop.call_soon_threadsafe(release.wait, 10)  # a handler that blocks the loop
        time.sleep(0.1)
        status, body = get(port, "/healthz")
        assert status == 503 and "event loop did not answer" in body["problems"][0]
        assert get(port, "/readyz")[0] == 503
        release.set()
        time.sleep(0.2)
        assert get(port, "/healthz")[0] == 200
    finally:
        release.set()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def test_unknown_paths_are_404(probes: tuple[health.Probes, int]) -> None:
    _, port = probes
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
    assert e.value.code == 404
