"""Two operator shards on one cluster, on the real stack.

Shard ``a`` and shard ``b`` each run two replicas (leader + standby) of the operator with
``--instance a`` / ``--instance b``, each under its own ServiceAccount so the API server's audit log
tells their requests apart. Each shard owns the objects labelled ``mlrollouts.io/controller-instance``
with its name; an unlabelled object belongs to the default instance, which does not run here.

What is asserted, from the API server (audit log, Leases, routes) and not from the operator's word:
- each shard writes the status and routes of its own objects only, and never even reads another's
  object (its lists and watches carry its label selector: the API server filters them);
- nobody touches the unlabelled object or its route;
- SIGKILL of shard a's leader: a's standby takes a's Lease and continues a's rollout with the weights
  in step order, while shard b keeps its leader (same holder, no Lease transition) and its rollout
  goes on in order.
"""

from __future__ import annotations

import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from tests.harness import objects
from tests.harness.cluster import ControlPlane, kubectl_apply, write_kubeconfig
from tests.harness.loadgen import LoadGenerator
from tests.harness.objects import phase, weight
from tests.harness.procs import stop_proc
from tests.harness.stack import Stack, httproute

V1, V2 = "shard-v1", "shard-v2"
G, V, P, EXP = "mlrollouts.io", "v1alpha1", "modelrollouts", "modelexperiments"
LABEL = "mlrollouts.io/controller-instance"
OPERATOR_NS = "model-rollouts"
USER_A = f"system:serviceaccount:{OPERATOR_NS}:model-rollouts"  # the chart's ServiceAccount
SA_B = "model-rollouts-b"
USER_B = f"system:serviceaccount:{OPERATOR_NS}:{SA_B}"
LEASE_A, LEASE_B = "model-rollouts-a", "model-rollouts-b"
WRITES = {"create", "update", "patch", "delete", "deletecollection"}
#: Each shard's objects (rollouts, experiments, routes, Lease) by name.
OWN = {
    USER_A: {"a1", "ra", LEASE_A},
    USER_B: {"b1", "eb", "rb", "reb", LEASE_B},
}
UNOWNED = {"u1", "ru"}
STEPS = [
    {"setWeight": 20},
    {"pause": {"duration": "10s"}},
    {"setWeight": 40},
    {"pause": {"duration": "10s"}},
    {"setWeight": 60},
    {"pause": {"duration": "10s"}},
    {"setWeight": 100},
]


@pytest.fixture(scope="module")
def stack(real_components: None) -> Iterator[Stack]:
    cluster = ControlPlane(
        audit=True, audit_rules=[{"level": "Metadata", "users": [USER_A, USER_B]}, {"level": "None"}]
    )
    with Stack(
        variants={V1: {"error_rate": 0.0}, V2: {"error_rate": 0.0}},
        route="ra",
        rps=30,
        max_seconds=900,
        cluster=cluster,
    ) as s:
        yield s


def _second_service_account(s: Stack) -> Path:
    """Shard b's ServiceAccount, bound to the chart's roles, and a kubeconfig with its token."""
    assert s.workdir is not None
    ref = {"apiGroup": "rbac.authorization.k8s.io"}
    subject = [{"kind": "ServiceAccount", "name": SA_B, "namespace": OPERATOR_NS}]
    kubectl_apply(
        s.api,
        [
            {
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": {"name": SA_B, "namespace": OPERATOR_NS},
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRoleBinding",
                "metadata": {"name": SA_B},
                "roleRef": {**ref, "kind": "ClusterRole", "name": "model-rollouts"},
                "subjects": subject,
            },
            *(
                {
                    "apiVersion": "rbac.authorization.k8s.io/v1",
                    "kind": "RoleBinding",
                    "metadata": {"name": f"{SA_B}-{role}", "namespace": OPERATOR_NS},
                    "roleRef": {**ref, "kind": "Role", "name": f"model-rollouts-{role}"},
                    "subjects": subject,
                }
                for role in ("leader-election", "provider-secrets")
            ),
        ],
    )
    token = (
        client.CoreV1Api(s.api)
        .create_namespaced_service_account_token(
            SA_B,
            OPERATOR_NS,
            client.AuthenticationV1TokenRequest(
                spec=client.V1TokenRequestSpec(audiences=[s.cluster.server], expiration_seconds=3600)
            ),
        )
        .status.token
    )
    path = s.workdir / "shard-b.kubeconfig"
    write_kubeconfig(path, s.cluster.server, s.workdir / "pki" / "ca.crt", token)
    return path


def _labelled(doc: dict[str, Any], instance: str | None) -> dict[str, Any]:
    if instance is not None:
        doc["metadata"]["labels"] = {LABEL: instance}
    return doc


def _lease(s: Stack, name: str) -> client.V1LeaseSpec:
    spec: client.V1LeaseSpec = client.CoordinationV1Api(s.api).read_namespaced_lease(name, OPERATOR_NS).spec
    return spec


def _holder_pid(s: Stack, lease: str) -> int:
    """The pid in the Lease holder's identity (``<host>_<pid>_<random>``, see leader.py)."""
    return int(str(_lease(s, lease).holder_identity).rsplit("_", 2)[1])


class Routes:
    """Polls the candidate's weight on each route and each object's phase, recording every change."""

    def __init__(self, s: Stack, routes: list[str]) -> None:
        self.s, self.routes = s, routes
        self.seen: dict[str, list[int]] = {r: [] for r in routes}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        co = client.CustomObjectsApi(self.s.api)
        for r in self.routes:
            try:
                route = co.get_namespaced_custom_object(
                    "gateway.networking.k8s.io", "v1", self.s.namespace, "httproutes", r
                )
            except Exception:
                continue
            w = {b["name"]: int(b.get("weight", 1)) for b in route["spec"]["rules"][0]["backendRefs"]}.get(
                V2, 0
            )
            if not self.seen[r] or self.seen[r][-1] != w:
                self.seen[r].append(w)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(0.1)

    def __enter__(self) -> Routes:
        self._sample()
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join(5)
        self._sample()


def _decisions(log: Path, name: str) -> int:
    text = log.read_text(errors="replace") if log.exists() else ""
    return sum(
        1 for line in text.splitlines() if f"/{name} WeightChanged" in line or f"/{name} Promoted" in line
    )


def _requests(s: Stack) -> list[dict[str, Any]]:
    """The shards' completed requests (a watch counts when its response starts); ``objectRef`` is {}
    for a request that names no resource (discovery)."""
    out = []
    for e in s.cluster.audit_events():
        if e.get("stage") == ("ResponseStarted" if e.get("verb") == "watch" else "ResponseComplete"):
            e["objectRef"] = e.get("objectRef") or {}
            out.append(e)
    return out


@dataclass
class Shards:
    """Shard a (the chart's ServiceAccount) and shard b (its own), each a leader and a standby."""

    s: Stack
    procs: dict[str, Any]

    def pid(self, name: str) -> int:
        return int(self.procs[name].pid)


@pytest.fixture(scope="module")
def shards(stack: Stack) -> Iterator[Shards]:
    s = stack
    kube_b = _second_service_account(s)
    procs: dict[str, Any] = {}
    lg_b = None
    try:
        procs["a1"] = s.start_operator(["--instance", "a"], log_name="shard-a1.log")
        procs["a2"] = s.start_operator(["--instance", "a"], log_name="shard-a2.log")
        kube_a, s.operator_kubeconfig = s.operator_kubeconfig, kube_b
        try:
            procs["b1"] = s.start_operator(["--instance", "b"], log_name="shard-b1.log")
            procs["b2"] = s.start_operator(["--instance", "b"], log_name="shard-b2.log")
        finally:
            s.operator_kubeconfig = kube_a
        deadline = time.monotonic() + 30
        while True:
            try:
                _holder_pid(s, LEASE_A), _holder_pid(s, LEASE_B)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise AssertionError("the shards' Leases were not taken within 30s") from None
                time.sleep(0.5)
        for route in ("rb", "reb", "ru"):
            kubectl_apply(s.api, [httproute(route, s.namespace, {V1: 100, V2: 0})])
        lg_b = LoadGenerator(
            api=s.api,
            namespace=s.namespace,
            httproute="rb",
            backends={V1: s.servers[V1].url, V2: s.servers[V2].url},
            rps=30,
            max_seconds=600,
            max_requests=30 * 600,
        ).start()
        yield Shards(s, procs)
    finally:
        if lg_b is not None:
            lg_b.stop()
        for p in procs.values():
            stop_proc(p)
        s.operator = None


def _rollout(
    s: Stack, name: str, route: str, instance: str | None, steps: list[dict[str, Any]]
) -> dict[str, Any]:
    assert s.prom is not None
    doc = objects.rollout(
        name, s.prom.url, steps, stable=V1, candidate={"service": V2}, route=route, compare=False
    )
    return _labelled(doc, instance)


def _by_user(events: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {USER_A: [], USER_B: []}
    for e in events:
        user = (e.get("user") or {}).get("username")
        if user in out:
            out[user].append(e)
    return out


def test_two_shards_each_act_only_on_their_own_objects_and_fail_over_on_their_own(shards: Shards) -> None:
    s = shards.s
    assert s.prom is not None and s.workdir is not None
    pids = {name: shards.pid(name) for name in shards.procs}
    holders = (_holder_pid(s, LEASE_A), _holder_pid(s, LEASE_B))
    assert holders[0] in (pids["a1"], pids["a2"]) and holders[1] in (pids["b1"], pids["b2"]), (holders, pids)
    b_holder = _lease(s, LEASE_B)
    experiment = objects.experiment(
        "eb",
        s.prom.url,
        [{"name": "control", "service": V1, "control": True}, {"name": "b", "service": V2}],
        "reb",
    )
    with Routes(s, ["ra", "rb", "ru"]) as routes:
        s.apply(_rollout(s, "u1", "ru", None, STEPS))  # the default instance's: nobody here may act on it
        s.apply(_labelled(experiment, "b"))
        s.apply(_rollout(s, "a1", "ra", "a", STEPS))
        s.apply(_rollout(s, "b1", "rb", "b", STEPS))
        s.wait_for(P, "a1", lambda o: weight(o) == 40, 90)
        a_leader = next(n for n in ("a1", "a2") if pids[n] == _holder_pid(s, LEASE_A))
        a_standby = "a2" if a_leader == "a1" else "a1"
        assert _decisions(s.workdir / f"shard-{a_leader}.log", "a1") >= 1
        killed_at = time.monotonic()
        shards.procs[a_leader].kill()  # SIGKILL: no hand-back, the Lease must expire
        shards.procs[a_leader].wait(10)
        s.wait_for(P, "a1", lambda o: (weight(o) or 0) >= 60, 60)
        takeover = time.monotonic() - killed_at
        s.wait_for(P, "a1", lambda o: phase(o) == "Promoted", 90)
        s.wait_for(P, "b1", lambda o: phase(o) == "Promoted", 90)
        eb = s.wait_for(EXP, "eb", lambda o: phase(o) is not None, 30)
        u1 = s.get(P, "u1")
        a_holder, b_after = _holder_pid(s, LEASE_A), _lease(s, LEASE_B)
    time.sleep(2)  # the audit backend logs a request after its response
    events = _requests(s)

    # a's standby continued a's rollout in step order; b's went on in order under the same leader.
    assert routes.seen["ra"] == [0, 20, 40, 60, 100], routes.seen
    assert routes.seen["rb"] == [0, 20, 40, 60, 100], routes.seen
    assert a_holder == pids[a_standby]
    assert _decisions(s.workdir / f"shard-{a_standby}.log", "a1") >= 1
    assert _decisions(s.workdir / "shard-a1.log", "b1") == _decisions(s.workdir / "shard-a2.log", "b1") == 0
    assert b_after.holder_identity == b_holder.holder_identity, (b_holder, b_after)
    assert (b_after.lease_transitions or 0) == (b_holder.lease_transitions or 0), (b_holder, b_after)
    assert takeover < 6 + 10 + 2 * 5 + 5, takeover
    # The unlabelled object belongs to the default instance, which does not run: nobody acted.
    assert not (u1.get("status") or {}).get("phase"), u1.get("status")
    assert routes.seen["ru"] == [0], routes.seen
    assert eb["status"]["phase"]

    # From the audit log: who touched what.
    by_user = _by_user(events)
    for user, own in OWN.items():
        mine = by_user[user]
        others = set().union(*(names for u, names in OWN.items() if u != user)) | UNOWNED
        named = [(e["verb"], e["objectRef"].get("resource"), e["objectRef"].get("name")) for e in mine]
        # Never a read or a write of another shard's (or the default instance's) object by name ...
        assert not [n for n in named if n[2] in others], (user, [n for n in named if n[2] in others])
        # ... it wrote its own objects' status and routes only ...
        writes = {(r, n) for v, r, n in named if v in WRITES}
        assert {n for r, n in writes if r in (P, EXP)} <= own and {
            n for r, n in writes if r == "httproutes"
        } <= own
        # ... and every list and watch of our kinds was filtered by the API server with its selector.
        instance = "a" if user == USER_A else "b"
        for e in mine:
            if e["objectRef"].get("resource") in (P, EXP) and e["verb"] in ("list", "watch"):
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(e["requestURI"]).query)
                assert query.get("labelSelector") == [f"{LABEL}={instance}"], e["requestURI"]
    writes_a = {
        (e["objectRef"].get("resource"), e["objectRef"].get("name"))
        for e in by_user[USER_A]
        if e["verb"] in WRITES
    }
    writes_b = {
        (e["objectRef"].get("resource"), e["objectRef"].get("name"))
        for e in by_user[USER_B]
        if e["verb"] in WRITES
    }
    assert (P, "a1") in writes_a and ("httproutes", "ra") in writes_a, writes_a
    assert {(P, "b1"), (EXP, "eb"), ("httproutes", "rb")} <= writes_b, writes_b


def test_a_rollout_relabelled_at_its_gate_moves_to_the_other_shard(shards: Shards) -> None:
    """Paused at a manual gate in shard a, relabelled to b: b resumes and promotes it; a writes it no more."""
    s = shards.s
    kubectl_apply(s.api, [httproute("rm", s.namespace, {V1: 100, V2: 0})])
    lg = LoadGenerator(
        api=s.api,
        namespace=s.namespace,
        httproute="rm",
        backends={V1: s.servers[V1].url, V2: s.servers[V2].url},
        rps=20,
        max_seconds=300,
        max_requests=20 * 300,
    ).start()
    try:
        with Routes(s, ["rm"]) as routes:
            s.apply(_rollout(s, "m1", "rm", "a", [{"setWeight": 20}, {"pause": {}}, {"setWeight": 100}]))
            s.wait_for(P, "m1", lambda o: phase(o) == "Paused" and weight(o) == 20, 90)
            time.sleep(3)  # a's last status write at the gate has landed
            moved = datetime.now(UTC)
            client.CustomObjectsApi(s.api).patch_namespaced_custom_object(
                G, V, s.namespace, P, "m1", {"metadata": {"labels": {LABEL: "b"}}}
            )
            time.sleep(4)  # b's watch has it
            s.annotate(P, "m1", {"mlrollouts.io/resume": "moved"})
            s.wait_for(P, "m1", lambda o: phase(o) == "Promoted", 90)
    finally:
        lg.stop()
    time.sleep(2)
    by_user = _by_user(_requests(s))

    def touched(user: str, after: datetime) -> list[str]:
        return [
            f"{e['verb']} {e['objectRef'].get('resource')}"
            for e in by_user[user]
            if e["objectRef"].get("name") in ("m1", "rm")
            and e["verb"] in WRITES
            and datetime.fromisoformat(e["requestReceivedTimestamp"].replace("Z", "+00:00")) >= after
        ]

    assert routes.seen["rm"] == [0, 20, 100], routes.seen
    # A tick a had already started when the label changed may still land (within a second or two).
    settled = moved + timedelta(seconds=3)
    assert touched(USER_A, settled) == [], touched(USER_A, moved)
    assert touched(USER_B, moved), "shard b never wrote the rollout it was given"
