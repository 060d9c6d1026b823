"""The long record of analyses, out of the hot object: ConfigMaps owned by the object, per revision.

``status.series`` keeps only the last few analyses (engine/series.py: :data:`SERIES_LIMIT` points and
:data:`SERIES_MAX_BYTES`), so what a LIST of the objects or a status write carries is bounded per
object, however long a run is. Every analysis is also kept here, for the decision report
(``kubectl mlrollouts report``) and for anyone who wants the whole trajectory:

- ConfigMaps named ``<mro|mexp>-<name>-series-<revision>-<chunk>`` in the object's namespace,
  labelled ``mlrollouts.io/series-of=<uid>`` and ``mlrollouts.io/series-revision=<revision>``, with an
  ownerReference to the object (the garbage collector deletes them with it);
- one key per analysis, ``t<epoch seconds>``, whose value is the point's JSON, exactly as in
  ``status.series``.

The operator only ever writes them (RBAC: ``create`` and ``patch`` on ConfigMaps), never reads them.
Points are archived in batches, before the window can lose them: after a status write, if a point
of ``status.series`` not archived yet could leave the window within the next two analyses (the
count and byte bounds, with points as large as the largest now), one JSON merge patch adds every
point not yet archived (nothing else is sent; a 404 creates the ConfigMap). With a window of 5 that
is one ConfigMap write per 4 analyses, the first after the 4th analysis (a rollout that finishes
sooner archives at its terminal phase), none between analyses; a finished object (a terminal phase)
archives the rest at once. Which points are archived is remembered in memory only: after a restart
the window counts as not archived and goes with the next batch (the same keys, so nothing changes).
Until then the newest points are in ``status.series``, which the report merges with the archive.
A write that fails is logged and retried with the next status write (the points are still in the
window); if it keeps failing for as many analyses as the window holds, those points are only
missing from the long record, never from a decision.

A chunk holds at most :data:`CHUNK_BYTES` of points (ConfigMaps are limited to 1 MiB): the chunk
number is the point's time divided by ``interval x points-per-chunk``, where points-per-chunk comes
from the size of the point being written. Readers list by label and sort by time, so the naming
only has to keep each ConfigMap small.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from model_rollouts.api.common import SERIES_LIMIT, SERIES_MAX_BYTES, parse_duration
from model_rollouts.api.experiment import TERMINAL_PHASES as EXPERIMENT_TERMINAL
from model_rollouts.api.rollout import TERMINAL_PHASES as ROLLOUT_TERMINAL
from model_rollouts.kube.client import REQUEST_TIMEOUT, api, sent

log = logging.getLogger("model_rollouts.series")

LABEL_OF = "mlrollouts.io/series-of"
LABEL_REVISION = "mlrollouts.io/series-revision"
#: At most this many bytes of points per ConfigMap (the API server's limit is 1 MiB).
CHUNK_BYTES = 512 * 1024
#: And at most this many points.
CHUNK_POINTS = 1000
SHORT = {"ModelRollout": "mro", "ModelExperiment": "mexp"}
#: Objects whose last archive write failed: their window is sent again with the next status write.
_retry: OrderedDict[str, None] = OrderedDict()
#: Per object uid: the revision and the time of the newest point archived (what the next batch
#: starts after). Memory only; a restart archives the window again.
_archived: OrderedDict[str, tuple[str, datetime]] = OrderedDict()
MAX_TRACKED = 100_000
#: Phases after which nothing is added to the series: archive what is left at once.
FINAL_PHASES = frozenset({*ROLLOUT_TERMINAL, *EXPERIMENT_TERMINAL})
_lock = threading.Lock()


def _time(p: Mapping[str, Any]) -> datetime:
    return datetime.fromisoformat(str(p["time"]).replace("Z", "+00:00"))


def key_of(point: Mapping[str, Any]) -> str:
    """The ConfigMap key of a point: ``t`` and its time in whole epoch seconds."""
    return f"t{int(_time(point).timestamp())}"


def revision_of(status: Mapping[str, Any]) -> str:
    return str(status.get("revision") or "0")


def chunk_of(point: Mapping[str, Any], interval_s: float) -> int:
    """Which chunk a point goes to: at most CHUNK_BYTES / CHUNK_POINTS of points of this size each."""
    size = len(json.dumps(point, separators=(",", ":"))) + 16
    per_chunk = max(1, min(CHUNK_POINTS, CHUNK_BYTES // size))
    return int(_time(point).timestamp() // (max(interval_s, 1.0) * per_chunk))


def configmap_name(kind: str, name: str, revision: str, chunk: int) -> str:
    """A DNS-subdomain name (at most 253 characters; a long object name is cut and hashed)."""
    tail = f"-series-{revision}-{chunk}"
    head = f"{SHORT.get(kind, 'obj')}-{name}"
    if len(head) + len(tail) > 253:
        head = f"{head[: 253 - len(tail) - 11]}-{hashlib.sha256(name.encode()).hexdigest()[:10]}"
    return head + tail


def _interval(obj: Mapping[str, Any]) -> float:
    try:
        return parse_duration(str(((obj.get("spec") or {}).get("analysis") or {}).get("interval") or "30s"))
    except ValueError:
        return 30.0


#: Analyses ahead the archive looks when it decides whether a window point is at risk: one more than
#: the next, so a failed archive write is retried before its points can leave the window.
LOOKAHEAD = 2


def at_risk(points: list[dict[str, Any]], lookahead: int = LOOKAHEAD) -> int:
    """How many of the window's oldest ``points`` the next ``lookahead`` analyses could push out,
    assuming each adds a point as large as the largest now (an object's points keep their shape)."""
    sizes = [len(json.dumps(p, separators=(",", ":"))) for p in points]
    if not sizes:
        return 0
    sizes += [max(sizes)] * lookahead
    kept = sizes[-SERIES_LIMIT:]
    total, drop = sum(kept), 0
    while total > SERIES_MAX_BYTES and drop < len(kept) - 1:
        total -= kept[drop]
        drop += 1
    return min(len(points), len(sizes) - len(kept) + drop)


def new_points(obj: Mapping[str, Any], status: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The points of ``status.series`` to archive now: every point not archived yet, when one of them
    could leave the window within the next :data:`LOOKAHEAD` analyses (engine/series.py's count and
    byte bounds) or the phase is terminal; else none (they wait for a batch). When this object's
    archive state is unknown (a restart) every point of the window counts as not archived; after a
    failed write the whole window is sent with the next status write."""
    uid = str(obj["metadata"].get("uid") or "")
    pts = [p for p in (status.get("series") or []) if isinstance(p, dict) and "time" in p]
    if not pts:
        return []
    revision = revision_of(status)
    with _lock:
        if uid in _retry:
            return pts
        done = _archived.get(uid)
    pending = pts if done is None or done[0] != revision else [p for p in pts if _time(p) > done[1]]
    if not pending:
        return []
    if status.get("phase") in FINAL_PHASES or any(p is pending[0] for p in pts[: at_risk(pts)]):
        return pending
    return []


def _archived_to(uid: str, revision: str, points: list[dict[str, Any]]) -> None:
    with _lock:
        _archived[uid] = (revision, max(_time(p) for p in points))
        _archived.move_to_end(uid)
        while len(_archived) > MAX_TRACKED:
            _archived.popitem(last=False)


def archive_written(obj: Mapping[str, Any], status: Mapping[str, Any]) -> None:
    """After a successful status write: add its new analyses to the object's series ConfigMaps.
    Never raises (the status write has already recorded the decision)."""
    uid = str(obj["metadata"].get("uid") or "")
    try:
        pts = new_points(obj, status)
        if not pts:
            return
        revision = revision_of(status)
        with _lock:
            known = (_archived.get(uid) or ("",))[0] == revision
        # A revision's first points, none archived by this process: most likely no ConfigMap yet
        # (its first archive comes when the window is about to lose its oldest point).
        first = not known and len(status.get("series") or []) < SERIES_LIMIT
        ok = archive(obj, revision, pts, create_first=first)
    except Exception as e:  # never the exception's text: it may quote a response body
        log.warning("archiving the series of %s failed: %s", obj["metadata"].get("name"), type(e).__name__)
        ok = False
    if ok:
        _archived_to(uid, revision_of(status), pts)
    with _lock:
        if ok:
            _retry.pop(uid, None)
        else:
            _retry[uid] = None
            while len(_retry) > 10000:
                _retry.popitem(last=False)


def archive(
    obj: Mapping[str, Any], revision: str, points: Iterable[Mapping[str, Any]], create_first: bool = False
) -> bool:
    """Write ``points`` (one merge patch per chunk they fall in; create on 404, or first when
    ``create_first``). True if all landed."""
    meta = obj["metadata"]
    chunks: dict[int, dict[str, str]] = {}
    interval = _interval(obj)
    for p in points:
        chunks.setdefault(chunk_of(p, interval), {})[key_of(p)] = json.dumps(p, separators=(",", ":"))
    core = client.CoreV1Api(api())
    ok = True
    for chunk, data in sorted(chunks.items()):
        name = configmap_name(str(obj.get("kind")), meta["name"], revision, chunk)
        try:
            _patch_or_create(core, obj, name, revision, data, create_first)
        except ApiException as e:
            log.warning("archiving the series of %s/%s: HTTP %s", meta["namespace"], meta["name"], e.status)
            ok = False
    return ok


def _patch_or_create(
    core: client.CoreV1Api,
    obj: Mapping[str, Any],
    name: str,
    revision: str,
    data: dict[str, str],
    create_first: bool = False,
) -> None:
    """Patch the ConfigMap, creating it on 404; ``create_first`` (a revision's first points) tries
    the create first, so a new object's first archive is one request, not a 404 and a create."""
    meta = obj["metadata"]
    ns = meta["namespace"]
    for attempt in range(2):
        if attempt > 0 or not create_first:
            try:
                sent(core.patch_namespaced_config_map(
                    name, ns, {"data": data}, _content_type="application/merge-patch+json",
                    _request_timeout=REQUEST_TIMEOUT, _preload_content=False,
                ))  # fmt: skip
                return
            except ApiException as e:
                if e.status != 404:
                    raise
        body: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": name,
                "namespace": ns,
                "labels": {
                    LABEL_OF: str(meta.get("uid") or ""),
                    LABEL_REVISION: revision,
                    "app.kubernetes.io/managed-by": "model-rollouts",
                },
                "ownerReferences": [
                    {
                        "apiVersion": obj["apiVersion"],
                        "kind": obj["kind"],
                        "name": meta["name"],
                        "uid": meta["uid"],
                    }
                ],
            },
            "data": data,
        }
        try:
            made = core.create_namespaced_config_map(
                ns,
                body,  # type: ignore[arg-type]
                _request_timeout=REQUEST_TIMEOUT,
                _preload_content=False,
            )
            sent(made)
            return
        except ApiException as e:
            if e.status != 409:  # created meanwhile (another replica): patch it
                raise


def points_of(obj: Mapping[str, Any], configmaps: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The points in those of ``configmaps`` that archive ``obj``'s current revision, oldest first."""
    meta = obj.get("metadata") or {}
    revision = revision_of(obj.get("status") or {})
    points: dict[str, dict[str, Any]] = {}
    for cm in configmaps:
        labels = (cm.get("metadata") or {}).get("labels") or {}
        if labels.get(LABEL_OF) != meta.get("uid") or labels.get(LABEL_REVISION) != revision:
            continue
        for k, v in (cm.get("data") or {}).items():
            try:
                p = json.loads(v)
            except (TypeError, ValueError):
                continue
            if isinstance(p, dict) and "time" in p:
                points[k] = p
    return sorted(points.values(), key=_time)


def read(
    api_client: client.ApiClient, obj: Mapping[str, Any], timeout: float | None = None
) -> list[dict[str, Any]]:
    """Every archived point of the object's current revision, oldest first (one LIST by label).
    ApiException (e.g. 403 when the reader may not list ConfigMaps) is the caller's to handle."""
    meta = obj["metadata"]
    selector = f"{LABEL_OF}={meta.get('uid')},{LABEL_REVISION}={revision_of(obj.get('status') or {})}"
    got = client.CoreV1Api(api_client).list_namespaced_config_map(
        meta.get("namespace") or "default",
        label_selector=selector,
        _request_timeout=timeout or REQUEST_TIMEOUT,
    )
    maps = [
        {"metadata": {"labels": (cm.metadata.labels if cm.metadata else None) or {}}, "data": cm.data or {}}
        for cm in got.items
    ]
    return points_of(obj, maps)
