"""ModelRolloutsNoLeader in the real Prometheus (Debian's 2.42), with dashboards/alerts.rules.yaml loaded.

Two "replicas" export ``mlrollouts_leader`` exactly as the operator's telemetry does (the gauge, from
prometheus_client, on an HTTP port Prometheus scrapes every second): a leader (1) and a standby (0).
The alert stays inactive while one leads; it goes active when both report 0, and when no replica
is scraped at all (both stopped: the series go stale and ``absent()`` answers).

The rules file is loaded unchanged, so the alert's own ``for: 2m`` is what Prometheus reports, and
the test sees it *pending*. To see it *firing* without waiting two minutes, Prometheus also loads
a copy of the same rule whose only change is ``for: 3s`` (in its own group) — the one override,
made in the test only.

The second test runs the real operator on the local stack, scraped by the stack's Prometheus with
the unchanged rules file: a lone standby (the Lease held by a replica nobody scrapes) makes the
alert pending, taking the Lease clears it, stopping the operator makes it pending again.
"""

from __future__ import annotations

import copy
import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from tests.harness.cluster import MissingComponent
from tests.harness.procs import LOOPBACK, REPO, free_port
from tests.harness.prom import Prometheus, Target

RULES = REPO / "dashboards" / "alerts.rules.yaml"
ALERT = "ModelRolloutsNoLeader"


class Replica:
    """An HTTP /metrics with mlrollouts_leader, as one operator replica exports it."""

    def __init__(self, leading: bool) -> None:
        self.registry = CollectorRegistry()
        self.gauge = Gauge("mlrollouts_leader", "1 while this replica holds the leader Lease and acts",
                           registry=self.registry)  # fmt: skip
        self.gauge.set(1 if leading else 0)
        self.port = free_port()
        self.server, self.thread = start_http_server(self.port, addr=LOOPBACK, registry=self.registry)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def short_for_copy(dest: Path) -> Path:
    doc = yaml.safe_load(RULES.read_text())
    rule = copy.deepcopy(next(r for g in doc["groups"] for r in g["rules"] if r["alert"] == ALERT))
    rule["for"] = "3s"
    dest.write_text(yaml.safe_dump({"groups": [{"name": "short-for", "rules": [rule]}]}))
    return dest


def states(prom: Prometheus) -> dict[str, tuple[str, float]]:
    """The alert's state and `for` (seconds) in each rule group."""
    with urllib.request.urlopen(prom.url + "/api/v1/rules?type=alert", timeout=5) as r:
        groups = json.load(r)["data"]["groups"]
    return {g["name"]: (r["state"], r["duration"]) for g in groups for r in g["rules"] if r["name"] == ALERT}


def wait_states(prom: Prometheus, want: dict[str, str], timeout: float) -> float:
    t0 = time.monotonic()
    got: dict[str, Any] = {}
    while time.monotonic() - t0 < timeout:
        got = {k: v[0] for k, v in states(prom).items()}
        if got == want:
            return time.monotonic() - t0
        time.sleep(0.5)
    raise AssertionError(f"{ALERT}: wanted {want} within {timeout:.0f}s, got {got}")


@pytest.fixture()
def replicas() -> Iterator[tuple[Replica, Replica]]:
    leader, standby = Replica(leading=True), Replica(leading=False)
    yield leader, standby
    for r in (leader, standby):
        r.stop()


def test_no_leader_alert_fires_when_no_replica_leads_and_when_none_is_scraped(
    tmp_path: Path, replicas: tuple[Replica, Replica]
) -> None:
    leader, standby = replicas
    targets = [Target("model-rollouts", f"{LOOPBACK}:{r.port}") for r in (leader, standby)]
    try:
        prom = Prometheus(
            targets, workdir=tmp_path / "prom", rule_files=[RULES, short_for_copy(tmp_path / "s.yaml")]
        )
        prom.start()
    except MissingComponent as e:
        pytest.skip(str(e))
    try:
        assert states(prom)["model-rollouts"][1] == 120  # the file's own `for: 2m`, as Prometheus read it
        # One replica leads: inactive (after the first scrapes; before them nothing is scraped yet).
        wait_states(prom, {"model-rollouts": "inactive", "short-for": "inactive"}, 30)

        # The leader loses the Lease and nobody takes over: both export 0.
        leader.gauge.set(0)
        took = wait_states(prom, {"model-rollouts": "pending", "short-for": "firing"}, 30)
        print(f"no replica leading -> firing (for: 3s copy) and pending (for: 2m) in {took:.1f}s")
        alerts = json.load(urllib.request.urlopen(prom.url + "/api/v1/alerts", timeout=5))["data"]["alerts"]
        mine = [a for a in alerts if a["labels"]["alertname"] == ALERT]
        assert {a["labels"]["severity"] for a in mine} == {"critical"}
        assert all(a["annotations"]["runbook_url"].endswith("#modelrolloutsnoleader") for a in mine)

        # A replica takes over: inactive again.
        standby.gauge.set(1)
        wait_states(prom, {"model-rollouts": "inactive", "short-for": "inactive"}, 30)

        # Every replica gone: nothing is scraped, the series go stale, absent() fires.
        leader.stop()
        standby.stop()
        took = wait_states(prom, {"model-rollouts": "pending", "short-for": "firing"}, 30)
        print(f"no replica scraped at all -> firing (for: 3s copy) and pending in {took:.1f}s")
    finally:
        prom.close()


def test_the_real_operator_as_a_lone_standby_makes_the_alert_pending(real_components: None) -> None:
    """The real operator, scraped by the stack's Prometheus with the rules file, while a replica that
    Prometheus does not see holds the Lease (a zombie leader): it exports 0, the alert is pending.
    When it takes the Lease the alert clears; when it stops (nothing scraped) it is pending again."""
    import datetime as dt

    from kubernetes import client

    from tests.harness.stack import Stack

    with Stack(variants={"nl-v1": {"error_rate": 0.0}}, route="nl", rps=1, max_seconds=300,
               prometheus_rules=[RULES]) as s:  # fmt: skip
        assert s.prom is not None
        co = client.CoordinationV1Api(s.api)
        now = dt.datetime.now(dt.UTC)
        co.create_namespaced_lease(
            "model-rollouts",
            client.V1Lease(
                metadata=client.V1ObjectMeta(name="no-leader", namespace="model-rollouts"),
                spec=client.V1LeaseSpec(
                    holder_identity="a-replica-nobody-scrapes",
                    lease_duration_seconds=3600,
                    acquire_time=now,
                    renew_time=now,
                ),
            ),
        )
        s.start_operator(["--leader-election-id", "no-leader"])
        t0 = time.monotonic()
        while [float(r["value"][1]) for r in s.prom.query("mlrollouts_leader")] != [0.0]:
            assert time.monotonic() - t0 < 60, "the standby's mlrollouts_leader 0 was never scraped"
            time.sleep(0.5)
        # Scraped and 0 (not absent): the expression's first half holds the alert pending.
        wait_states(s.prom, {"model-rollouts": "pending"}, 10)
        print(f"real standby, Lease held elsewhere: leader 0 after {time.monotonic() - t0:.1f}s, pending")

        co.delete_namespaced_lease("no-leader", "model-rollouts")  # the zombie is gone: it takes over
        took = wait_states(s.prom, {"model-rollouts": "inactive"}, 60)
        print(f"the operator took the Lease -> inactive in {took:.1f}s")

        s.stop_operator()
        took = wait_states(s.prom, {"model-rollouts": "pending"}, 60)
        print(f"the operator stopped (nothing scraped) -> pending in {took:.1f}s")
