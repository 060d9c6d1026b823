"""Status writes that stay small: a merge patch of what changed, and the series archived out of status."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from model_rollouts.api.common import dump
from model_rollouts.engine import rollout as eng
from model_rollouts.kube import client as kube_client
from model_rollouts.kube import series_store
from model_rollouts.kube import status as kstatus
from model_rollouts.report.data import load
from tests.unit.test_report_series import rollout_obs, rollout_spec

T0 = datetime(2026, 3, 1, tzinfo=UTC)


def apply_merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386, written from the RFC's pseudo-code (independent of the code under test)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = apply_merge_patch(out.get(k), v)
    return out


# -- the patch --------------------------------------------------------------------------------------


def test_merge_patch_sends_changed_fields_lists_whole_and_removed_keys_as_null() -> None:
    old = {"phase": "Progressing", "weight": 10, "gone": "x", "nested": {"a": 1, "b": 2}, "l": [1, 2]}
    new = {"phase": "Progressing", "weight": 20, "nested": {"a": 1, "b": 3}, "l": [1, 2, 3], "new": True}
    patch = kstatus.merge_patch(old, new)
    assert patch == {"weight": 20, "gone": None, "nested": {"b": 3}, "l": [1, 2, 3], "new": True}
    assert apply_merge_patch(old, patch) == new
    assert kstatus.merge_patch(new, copy.deepcopy(new)) == {}
    # A bool is not the number it equals in Python.
    assert kstatus.merge_patch({"x": 1}, {"x": True}) == {"x": True}


def test_status_patch_never_touches_kopfs_own_status() -> None:
    obj = {"status": {"phase": "Pending", "kopf": {"progress": {"h": {}}}}}
    assert kstatus.status_patch(obj, {"phase": "Progressing"}) == {"phase": "Progressing"}
    assert kstatus.status_patch(obj, {"phase": "Pending"}) == {}


def _drive(analyses: int) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(status before, status after) of every engine decision over ``analyses`` analyses that keep
    a rollout at its first analysis step (the guardrail passes, the comparison is inconclusive)."""
    spec = rollout_spec()
    spec.steps[1].analysis.duration = "100000s"  # type: ignore[union-attr]
    status, now, out = eng.ModelRolloutStatus(), T0, []
    done = 0
    while done < analyses:
        obs = None
        if eng.needs_measurement(spec, status, now):
            obs, done = rollout_obs(1000 * (done + 1), 0.01), done + 1
        new = eng.reconcile(spec, status, now=now, generation=1, observations=obs).status
        out.append((dump(status), dump(new)))
        status, now = new, now + timedelta(seconds=10)
    return out


def test_each_engine_transition_patched_onto_the_old_status_gives_the_new_one() -> None:
    for old, new in _drive(40):
        patch = kstatus.status_patch({"status": old}, new)
        assert apply_merge_patch(old, patch) == new


def test_bytes_per_status_write_do_not_grow_with_the_length_of_the_run() -> None:
    steps = _drive(500)
    patches = [
        len(json.dumps(kstatus.status_patch({"status": o}, n), separators=(",", ":")))
        for o, n in steps
        if o != n
    ]
    early, late = max(patches[20:60]), max(patches[-40:])
    assert late <= early * 1.1 + 256, (early, late)
    assert late < 6 * 1024  # spec-dependent, not run-dependent: here about 3.5 KB
    last_old, last_new = steps[-1]
    assert len(last_new["series"]) == 5
    # Fields an analysis does not touch are not sent (the whole status is larger than the patch).
    patch = kstatus.status_patch({"status": last_old}, last_new)
    assert "history" not in patch and "revision" not in patch and "stepStartedAt" not in patch


# -- the write ----------------------------------------------------------------------------------------


class FakeCustomObjects:
    """Records status patches; answers 409 for the first ``conflicts`` of them."""

    conflicts = 0
    calls: list[dict[str, Any]] = []
    fresh: dict[str, Any] | None = None

    def __init__(self, *_: object) -> None:
        pass

    def patch_namespaced_custom_object_status(self, *args: Any, **kw: Any) -> Any:
        FakeCustomObjects.calls.append({"args": args[:5], "body": args[5], **kw})
        if FakeCustomObjects.conflicts > 0:
            FakeCustomObjects.conflicts -= 1
            raise ApiException(status=409)
        return args[5]

    def get_namespaced_custom_object(self, *_: Any, **__: Any) -> Any:
        return FakeCustomObjects.fresh


class FakeCore:
    """ConfigMaps in memory: merge patch (404 if absent) and create (409 if present)."""

    maps: dict[str, dict[str, Any]] = {}
    calls: list[tuple[str, str]] = []
    fail: int | None = None

    def __init__(self, *_: object) -> None:
        pass

    def patch_namespaced_config_map(self, name: str, ns: str, body: Any, **kw: Any) -> Any:
        FakeCore.calls.append(("patch", name))
        assert kw.get("_content_type") == "application/merge-patch+json"
        if FakeCore.fail:
            raise ApiException(status=FakeCore.fail)
        if name not in FakeCore.maps:
            raise ApiException(status=404)
        FakeCore.maps[name]["data"].update(body["data"])
        return FakeCore.maps[name]

    def create_namespaced_config_map(self, ns: str, body: Any, **_: Any) -> Any:
        FakeCore.calls.append(("create", body["metadata"]["name"]))
        if FakeCore.fail:
            raise ApiException(status=FakeCore.fail)
        if body["metadata"]["name"] in FakeCore.maps:
            raise ApiException(status=409)
        FakeCore.maps[body["metadata"]["name"]] = copy.deepcopy(body)
        return body


@pytest.fixture()
def fake(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeCustomObjects.conflicts, FakeCustomObjects.calls, FakeCustomObjects.fresh = 0, [], None
    FakeCore.maps, FakeCore.calls, FakeCore.fail = {}, [], None
    series_store._retry.clear()
    series_store._archived.clear()
    monkeypatch.setattr(client, "CustomObjectsApi", FakeCustomObjects)
    monkeypatch.setattr(client, "CoreV1Api", FakeCore)
    monkeypatch.setattr(kube_client, "_api", object())
    monkeypatch.setattr(kstatus.time, "sleep", lambda _: None)


def _obj(status: dict[str, Any], rv: str = "7") -> dict[str, Any]:
    return {
        "apiVersion": "mlrollouts.io/v1alpha1",
        "kind": "ModelRollout",
        "metadata": {
            "name": "fraud",
            "namespace": "ml",
            "uid": "u-1",
            "resourceVersion": rv,
            "generation": 1,
        },
        "spec": {"analysis": {"interval": "10s"}},
        "status": status,
    }


def _point(i: int, **extra: Any) -> dict[str, Any]:
    t = (T0 + timedelta(seconds=10 * i)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"time": t, "weight": 20, "step": 1, "phase": "Progressing", **extra}


@pytest.mark.usefixtures("fake")
def test_write_sends_only_the_changed_fields_with_the_resource_version_and_kopf_untouched() -> None:
    old = {"phase": "Progressing", "weight": 20, "message": "m", "kopf": {"x": 1}, "revision": "r1"}
    obj = _obj(old)
    assert kstatus.write_status("modelrollouts", obj, {**old, "message": "m2", "kopf": {"y": 2}})
    (call,) = FakeCustomObjects.calls
    assert call["_content_type"] == "application/merge-patch+json"
    assert call["body"] == {"metadata": {"resourceVersion": "7"}, "status": {"message": "m2"}}
    assert call["args"][2:] == ("ml", "modelrollouts", "fraud")


@pytest.mark.usefixtures("fake")
def test_no_request_when_nothing_changed() -> None:
    old = {"phase": "Progressing", "weight": 20}
    assert kstatus.write_status("modelrollouts", _obj({**old, "kopf": {}}), dict(old))
    assert FakeCustomObjects.calls == [] and FakeCore.calls == []


@pytest.mark.usefixtures("fake")
def test_a_409_on_the_same_inputs_is_retried_with_the_fresh_resource_version() -> None:
    old = {"phase": "Progressing", "weight": 20}
    FakeCustomObjects.conflicts = 1
    FakeCustomObjects.fresh = _obj({**old, "kopf": {"touched": True}}, rv="9")
    assert kstatus.write_status("modelrollouts", _obj(old), {**old, "weight": 40})
    assert [c["body"]["metadata"]["resourceVersion"] for c in FakeCustomObjects.calls] == ["7", "9"]
    assert [c["body"]["status"] for c in FakeCustomObjects.calls] == [{"weight": 40}] * 2


@pytest.mark.usefixtures("fake")
def test_a_409_after_someone_else_changed_status_is_a_conflict_not_a_retry() -> None:
    old = {"phase": "Progressing", "weight": 20}
    FakeCustomObjects.conflicts = 1
    FakeCustomObjects.fresh = _obj({**old, "weight": 30}, rv="9")
    assert not kstatus.write_status("modelrollouts", _obj(old), {**old, "weight": 40})
    assert len(FakeCustomObjects.calls) == 1
    assert FakeCore.calls == []  # nothing archived from a decision that was not recorded


# -- the archive --------------------------------------------------------------------------------------


@pytest.mark.usefixtures("fake")
def test_each_written_analysis_is_archived_once_in_a_configmap_owned_by_the_object() -> None:
    window: list[dict[str, Any]] = []
    status: dict[str, Any] = {"phase": "Progressing", "revision": "r1", "series": []}
    for i in range(25):
        obj = _obj(copy.deepcopy(status), rv=str(i))
        window = [*window, _point(i)][-5:]
        status = {**status, "series": window}
        assert kstatus.write_status("modelrollouts", obj, status)
        # An unchanged write (a reconcile error, say) archives nothing.
        assert kstatus.write_status("modelrollouts", _obj(copy.deepcopy(status)), {**status, "message": "x"})
    patches = [c for c in FakeCore.calls if c[0] == "patch"]
    # In batches, before the window of 5 can lose a point within the next two analyses: the 4th
    # analysis sends the first 4 (creating the ConfigMap: one request, no 404 first), then every 4th
    # (8, 12, 16, 20, 24) sends the 4 not yet archived; none for the other writes.
    assert [c[0] for c in FakeCore.calls] == ["create"] + ["patch"] * 5
    assert len(patches) == 5
    (name,) = FakeCore.maps
    assert len(FakeCore.maps[name]["data"]) == 24
    # The report merges the archive with the window: every analysis, before the run has ended...
    pts = series_store.points_of(_obj(status), [FakeCore.maps[name]])
    assert len(load(_obj(status), pts).series) == 25
    # ...and a finished run archives what is left at once.
    final = {**status, "phase": "Promoted"}
    assert kstatus.write_status("modelrollouts", _obj(copy.deepcopy(status)), final)
    assert len([c for c in FakeCore.calls if c[0] == "patch"]) == 6
    status = final
    cm = FakeCore.maps[name]
    assert name == "mro-fraud-series-r1-" + name.rsplit("-", 1)[1]
    assert cm["metadata"]["labels"][series_store.LABEL_OF] == "u-1"
    assert cm["metadata"]["labels"][series_store.LABEL_REVISION] == "r1"
    (owner,) = cm["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"]) == ("ModelRollout", "fraud", "u-1")
    assert len(cm["data"]) == 25
    pts = series_store.points_of(_obj(status), [cm])
    assert [p["time"] for p in pts] == [_point(i)["time"] for i in range(25)]
    # A saved object and its ConfigMaps give the report every analysis, not only the window.
    r = load(_obj(status), pts)
    assert len(r.series) == 25 and r.archived == 25
    assert len(load(_obj(status)).series) == 5


@pytest.mark.usefixtures("fake")
def test_a_failed_archive_is_retried_with_the_next_write_and_never_fails_the_status_write() -> None:
    # Three analyses: none at risk yet, nothing sent.
    s0: dict[str, Any] = {"phase": "Progressing", "revision": "r1", "series": [_point(i) for i in range(3)]}
    assert kstatus.write_status("modelrollouts", _obj({"phase": "Progressing", "revision": "r1"}), s0)
    assert FakeCore.calls == []
    # The fourth: the oldest could leave within two analyses; the archive write fails (RBAC, say).
    FakeCore.fail = 403
    s1 = {**s0, "series": [_point(i) for i in range(4)]}
    assert kstatus.write_status("modelrollouts", _obj(copy.deepcopy(s0)), s1)
    assert FakeCore.maps == {}
    FakeCore.fail = None
    s2 = {**s0, "series": [_point(i) for i in range(5)]}
    assert kstatus.write_status("modelrollouts", _obj(copy.deepcopy(s1)), s2)
    (cm,) = FakeCore.maps.values()
    assert len(cm["data"]) == 5  # the points whose archive failed came along


def test_configmap_names_are_valid_and_chunks_stay_under_the_limit() -> None:
    long = "a" * 253
    name = series_store.configmap_name("ModelExperiment", long, "abcdef0123", 123456)
    assert len(name) <= 253 and name.endswith("-series-abcdef0123-123456") and name.startswith("mexp-a")
    small = [_point(i) for i in range(3000)]
    per_chunk: dict[int, int] = {}
    for p in small:
        c = series_store.chunk_of(p, 10.0)
        per_chunk[c] = per_chunk.get(c, 0) + 1
    assert max(per_chunk.values()) <= series_store.CHUNK_POINTS
    big = [_point(i, pad="x" * 20000) for i in range(300)]
    per_chunk = {}
    for p in big:
        c = series_store.chunk_of(p, 10.0)
        per_chunk[c] = per_chunk.get(c, 0) + len(json.dumps(p))
    assert max(per_chunk.values()) <= series_store.CHUNK_BYTES


def test_points_of_takes_only_this_objects_current_revision() -> None:
    obj = _obj({"revision": "r2"})
    mine = {"metadata": {"labels": {series_store.LABEL_OF: "u-1", series_store.LABEL_REVISION: "r2"}},
            "data": {"t1": json.dumps(_point(1)), "t0": json.dumps(_point(0))}}  # fmt: skip
    old = {"metadata": {"labels": {series_store.LABEL_OF: "u-1", series_store.LABEL_REVISION: "r1"}},
           "data": {"t5": json.dumps(_point(5))}}  # fmt: skip
    other = {"metadata": {"labels": {series_store.LABEL_OF: "u-2", series_store.LABEL_REVISION: "r2"}},
             "data": {"t6": json.dumps(_point(6))}}  # fmt: skip
    pts = series_store.points_of(obj, [mine, old, other])
    assert [p["time"] for p in pts] == [_point(0)["time"], _point(1)["time"]]


@pytest.mark.usefixtures("fake")
def test_after_a_restart_the_whole_window_is_archived_again_and_nothing_is_lost() -> None:
    window: list[dict[str, Any]] = []
    status: dict[str, Any] = {"phase": "Progressing", "revision": "r1", "series": []}
    for i in range(9):
        if i == 4:
            series_store._archived.clear()  # a new process: nothing known of what was archived
        obj = _obj(copy.deepcopy(status), rv=str(i))
        window = [*window, _point(i)][-5:]
        status = {**status, "series": window}
        assert kstatus.write_status("modelrollouts", obj, status)
    (cm,) = FakeCore.maps.values()
    archived = series_store.points_of(_obj(status), [cm])
    # Points 0-3 at the 4th analysis, the whole window (0-4, the same keys) right after the restart
    # (its oldest could leave within two analyses), 5-8 when 5 came within two of leaving: every
    # point, no gap.
    assert [p["time"] for p in archived] == [_point(i)["time"] for i in range(9)]
    assert [c[0] for c in FakeCore.calls] == ["create", "patch", "patch"]
    assert len(load(_obj(status), archived).series) == 9


def test_large_points_are_archived_before_the_byte_bound_can_drop_them() -> None:
    """The window is bounded by bytes too: points of 3 kB leave an 8 kB window after two analyses,
    so they count as at risk at once; small points only when the count bound comes within two."""
    small = [_point(i) for i in range(3)]
    assert series_store.at_risk(small) == 0
    assert series_store.at_risk([*small, _point(3)]) == 1
    assert series_store.at_risk([*small, _point(3), _point(4)]) == 2
    big = [_point(i, pad="x" * 3000) for i in range(2)]
    assert series_store.at_risk(big[:1]) == 1
    assert series_store.at_risk(big) == 2
