"""Status that stays small, on the real stack: a rollout held at a gate and analysed every 5 s, three
times as many analyses as status.series keeps. What a LIST carries for it and what each status write
sends (the request bodies, from the API server's audit log) stay under fixed bounds and do not grow
with the run, while the decision report (the plugin, through the API server) still has every analysis,
from the series ConfigMaps the operator archives them to.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from kubernetes import client

from model_rollouts.kube import series_store
from model_rollouts.report.data import load
from tests.harness import objects
from tests.harness.cluster import ControlPlane
from tests.harness.objects import GROUP, VERSION, phase, weight
from tests.harness.stack import Stack, httproute

pytestmark = pytest.mark.integration

V1, V2, ROUTE = "size-v1", "size-v2", "size"
P = "modelrollouts"
USER = "system:serviceaccount:model-rollouts:model-rollouts"
#: Analyses to run (every 5 s): three times what status.series keeps (5), so that the object and the
#: write bodies are measured over 7 analyses after the window filled (at the ~300 bytes per analysis an
#: unbounded series grew by, that is over 2 KiB of growth, four times the 512-byte allowance below).
ANALYSES = 15
#: Bounds on the object as LISTed and on one status write's body, for this spec (1 guardrail and 1
#: comparison); before, the object grew by about 300 bytes per analysis up to 120 analyses (36 KiB of
#: series), and every status write sent all of it.
MAX_OBJECT_BYTES = 12 * 1024
MAX_WRITE_BYTES = 6 * 1024


@pytest.fixture(scope="module")
def stack(real_components: None) -> Iterator[Stack]:
    rules = [
        {"level": "Request", "users": [USER], "verbs": ["patch", "update", "create"],
         "resources": [{"group": GROUP, "resources": ["modelrollouts/status"]},
                       {"group": "", "resources": ["configmaps"]}]},
        {"level": "Metadata", "users": [USER]},
        {"level": "None"},
    ]  # fmt: skip
    with Stack(
        variants={
            V1: {"error_rate": 0.0, "positive_rate": 0.5},
            V2: {"error_rate": 0.0, "positive_rate": 0.5},
        },
        route=ROUTE,
        rps=30,
        max_seconds=900,
        cluster=ControlPlane(audit=True, audit_rules=rules),
    ) as s:
        s.apply(httproute(ROUTE, s.namespace, {V1: 100, V2: 0}))
        s.start_operator()
        yield s


def listed_bytes(s: Stack, name: str) -> int:
    """Bytes of the object as a LIST of the namespace returns it (compact JSON, as the server sends)."""
    got = client.CustomObjectsApi(s.api).list_namespaced_custom_object(GROUP, VERSION, s.namespace, P)
    (item,) = [i for i in got["items"] if i["metadata"]["name"] == name]
    return len(json.dumps(item, separators=(",", ":")))


def _at(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def test_object_and_status_writes_stay_small_and_the_report_has_every_analysis(
    stack: Stack, tmp_path: Path
) -> None:
    s = stack
    assert s.prom is not None
    start = datetime.now(UTC)
    s.apply(
        objects.rollout(
            "long",
            s.prom.url,
            [{"setWeight": 20}, {"pause": {}}],
            stable=V1,
            candidate={"service": V2},
            route=ROUTE,
        )
    )
    s.wait_for(P, "long", lambda o: phase(o) == "Paused" and weight(o) == 20, 90)
    analyses: set[str] = set()
    sizes: list[tuple[int, int]] = []  # (analyses seen, bytes listed)
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            try:
                t = (s.get(P, "long").get("status") or {}).get("lastAnalysisTime")
                if t:
                    analyses.add(t)
            except Exception:
                pass
            time.sleep(0.25)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    deadline = time.monotonic() + ANALYSES * 5 * 3
    try:
        while len(analyses) < ANALYSES and time.monotonic() < deadline:
            sizes.append((len(analyses), listed_bytes(s, "long")))
            time.sleep(5)
    finally:
        stop.set()
        poller.join(5)
    obj = s.get(P, "long")
    assert len(analyses) >= ANALYSES, (len(analyses), obj.get("status"))
    status = obj["status"]
    assert len(status["series"]) == 5  # the window; the rest is archived
    print(f"\nobject as LISTed after n analyses (n, bytes): {sizes[:: max(1, len(sizes) // 8)]}")

    # The object as LISTed: under the bound, and no larger late in the run than once the window filled.
    filled = [b for n, b in sizes if n >= 8]
    assert max(b for _, b in sizes) <= MAX_OBJECT_BYTES, sizes
    assert filled[-1] <= filled[0] + 512, sizes

    # Each status write: a merge patch of the changed fields, under the bound; about one per analysis.
    time.sleep(2)  # the audit backend logs a request after its response
    events = [
        e
        for e in s.cluster.audit_events()
        if (e.get("user") or {}).get("username") == USER
        and e.get("stage") == "ResponseComplete"
        and _at(e["requestReceivedTimestamp"]) >= start
    ]
    writes = [
        e
        for e in events
        if e["verb"] in ("patch", "update")
        and (e.get("objectRef") or {}).get("resource") == P
        and (e.get("objectRef") or {}).get("subresource") == "status"
        and (e.get("objectRef") or {}).get("name") == "long"
    ]
    assert all(e["verb"] == "patch" for e in writes), [e["verb"] for e in writes]
    # Ours (Kopf's own progress patches of status.kopf, at creation, are not the operator's record).
    ours = [e for e in writes if set((e.get("requestObject") or {}).get("status") or {}) - {"kopf"}]
    bodies = [len(json.dumps(e.get("requestObject") or {}, separators=(",", ":"))) for e in ours]
    assert bodies and max(bodies) <= MAX_WRITE_BYTES, bodies
    unguarded = [e.get("requestObject") for e in ours if "resourceVersion" not in
                 (((e.get("requestObject") or {}).get("metadata")) or {})]  # fmt: skip
    assert unguarded == [], str(unguarded)[:2000]
    late = bodies[len(bodies) // 2 :]
    print(f"status write bodies (bytes): first {bodies[:6]}, last {bodies[-6:]}, max {max(bodies)}")
    assert max(late) <= max(bodies[: len(bodies) // 2]) + 512, bodies
    assert len(ours) <= len(analyses) + 6, (len(ours), len(analyses))

    # The archive, in batches (issue 18): the first points at once, then whatever is not archived yet
    # whenever one of the window's two oldest points is among it: about one ConfigMap write per 4
    # analyses, each adding at most the window's 5 points, and never more than 4 points behind.
    cm_writes = [e for e in events if (e.get("objectRef") or {}).get("resource") == "configmaps"]
    patches = [e for e in cm_writes if e["verb"] == "patch"]
    assert len(cm_writes) <= len(analyses) // 4 + 3, (len(cm_writes), len(analyses))
    assert all(len((e.get("requestObject") or {}).get("data") or {}) <= 5 for e in patches)
    assert len(series_store.read(s.api, obj)) >= len(analyses) - 4
    maps = client.CoreV1Api(s.api).list_namespaced_config_map(
        s.namespace, label_selector=f"{series_store.LABEL_OF}={obj['metadata']['uid']}"
    )
    assert maps.items
    for cm in maps.items:
        (owner,) = cm.metadata.owner_references
        assert (owner.kind, owner.name, owner.uid) == ("ModelRollout", "long", obj["metadata"]["uid"])

    # The report has every analysis: through the API server as the plugin reads it ...
    archived = series_store.read(s.api, obj)
    r = load(obj, archived)
    times = {p["time"] for p in r.series}
    assert {_at(t) for t in analyses} <= {_at(t) for t in times}, sorted(analyses - times)
    assert len(r.series) >= ANALYSES
    # ... and from the plugin itself (kubectl mlrollouts report), in its summary.
    cmd = [sys.executable, "-m", "model_rollouts.report", "long", "-n", s.namespace,
           "--kubeconfig", str(s.cluster.kubeconfig), "-o", "md", "--out", str(tmp_path)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    md = (tmp_path / "long-report.md").read_text()
    m = re.search(r"\*\*Analyses in the report\*\*: (\d+) \(every analysis", md)
    assert m is not None, md[:2000]
    assert int(m.group(1)) >= len(analyses)
