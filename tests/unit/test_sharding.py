"""Shards: which objects an operator instance owns, and that Kopf asks the API server to select them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import kopf
import pytest
from kopf._cogs.structs import references

from model_rollouts import main, sharding
from model_rollouts.sharding import INSTANCE_LABEL, label_selector, lease_name, owns, validate_instance


def _resource(plural: str, kind: str) -> references.Resource:
    return references.Resource(
        "mlrollouts.io", "v1alpha1", plural, kind=kind, namespaced=True, verbs=["list", "watch", "patch"]
    )


@pytest.fixture()
def instance() -> Iterator[list[str]]:
    """main.configure() sets process-wide state: the instance, and the route cache switched on."""
    from model_rollouts.traffic import watched

    saved, enabled = list(main.INSTANCE), watched.ROUTES.enabled
    yield main.INSTANCE
    main.INSTANCE[:] = saved
    watched.ROUTES.enabled = enabled


def test_the_default_instance_owns_only_unlabelled_objects() -> None:
    assert owns("", None) and owns("", {"team": "a"})
    assert not owns("", {INSTANCE_LABEL: "a"})
    assert not owns("", {INSTANCE_LABEL: ""})  # the label is there, naming no instance
    assert label_selector("") == f"!{INSTANCE_LABEL}"


def test_a_named_instance_owns_only_objects_labelled_with_its_name() -> None:
    assert owns("a", {INSTANCE_LABEL: "a"})
    assert not owns("a", {INSTANCE_LABEL: "b"}) and not owns("a", {}) and not owns("a", None)
    assert label_selector("a") == f"{INSTANCE_LABEL}=a"


def test_each_instance_has_its_own_lease() -> None:
    assert lease_name("model-rollouts", "") == "model-rollouts"
    assert lease_name("model-rollouts", "shard-a") == "model-rollouts-shard-a"
    assert lease_name("model-rollouts", "a") != lease_name("model-rollouts", "b")


@pytest.mark.parametrize("name", ["", "a", "shard-1", "0", "x" * sharding.MAX_NAME])
def test_valid_instance_names(name: str) -> None:
    assert validate_instance(name) is None


@pytest.mark.parametrize("name", ["A", "shard_a", "-a", "a-", "a.b", "a b", "x" * (sharding.MAX_NAME + 1)])
def test_invalid_instance_names_are_named(name: str) -> None:
    assert validate_instance(name)


def test_the_operator_rejects_a_bad_instance_name(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main.main(["--instance", "Shard_A", "--no-leader-election", "--metrics-port", "0"])
    assert e.value.code == 2
    assert "--instance" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["", "shard-a"])
def test_kopf_lists_and_watches_both_kinds_with_the_instance_selector(instance: list[str], name: str) -> None:
    """Server-side: the selector goes into every list and watch URL of our two kinds, none other."""
    instance[:] = [name]
    settings = kopf.OperatorSettings()
    main.configure(settings=settings)
    for plural, kind in (("modelrollouts", "ModelRollout"), ("modelexperiments", "ModelExperiment")):
        assert list(settings.watching.label_selectors.collect(_resource(plural, kind))) == [
            label_selector(name)
        ]
    other = references.Resource("mlrollouts.io", "v1alpha1", "metrictemplates", kind="MetricTemplate")
    assert list(settings.watching.label_selectors.collect(other)) == []


def _series(name: str) -> int:
    from prometheus_client import REGISTRY

    return sum(
        1
        for family in REGISTRY.collect()
        for s in family.samples
        if s.labels.get("name") == name and family.name.startswith("mlrollouts_")
    )


def _body(name: str, uid: str, deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": "ml", "uid": uid}
    if deleting:
        meta["deletionTimestamp"] = "2026-12-07T15:00:00Z"
    return {"metadata": meta}


def test_an_object_that_leaves_the_instance_takes_its_series_with_it() -> None:
    """Relabelled to another shard, the watch sees it DELETED: this instance exports it no more."""
    from model_rollouts import telemetry
    from model_rollouts.handlers import shards

    phases = ("Progressing", "Paused")
    telemetry.set_phase("ModelRollout", "ml", "moved", "Paused", phases)
    telemetry.WEIGHT.labels("ModelRollout", "ml", "moved", "candidate").set(20)
    telemetry.set_phase("ModelExperiment", "ml", "moved-exp", "Progressing", phases)
    assert _series("moved") == 2  # its phase (one series: the current one) and its weight
    shards.rollout_event(type="MODIFIED", body=_body("moved", "u-1"))
    assert _series("moved") == 2
    shards.rollout_event(type="DELETED", body=_body("moved", "u-1"))
    assert _series("moved") == 0
    assert _series("moved-exp") == 1
    shards.experiment_event(type="DELETED", body=_body("moved-exp", "u-2"))
    assert _series("moved-exp") == 0


def test_an_object_that_left_is_not_here_until_it_comes_back() -> None:
    from model_rollouts.handlers import shards

    assert shards.here(uid="u-3")
    shards.rollout_event(type="DELETED", body=_body("gone", "u-3"))  # left the selector, still exists
    assert not shards.here(uid="u-3")
    shards.rollout_event(type="ADDED", body=_body("gone", "u-3"))  # relabelled back
    assert shards.here(uid="u-3")
    shards.rollout_event(type="DELETED", body=_body("deleted", "u-4", deleting=True))  # really deleted
    assert shards.here(uid="u-4")


def test_no_timer_per_object_and_an_object_that_left_is_no_longer_scheduled() -> None:
    """No Kopf timer per object (the one scheduler wakes them), and an object relabelled to another
    shard (the watch says DELETED, it still exists) is dropped from the scheduler with its due time."""
    from model_rollouts.handlers import experiment, rollout, scheduler, shards  # noqa: F401  (registers them)

    timers = [
        h
        for h in kopf.get_default_registry()._spawning.get_all_handlers()
        if type(h).__name__ == "TimerHandler"
    ]
    assert timers == []
    body = {
        "metadata": {"name": "moving", "namespace": "ml", "uid": "u-moving", "resourceVersion": "5"},
        "spec": {},
        "status": {"phase": "Progressing"},
    }
    events = (("modelrollouts", shards.rollout_event), ("modelexperiments", shards.experiment_event))
    for kind, event in events:
        event(type="ADDED", body=body)
        assert (kind, "u-moving") in scheduler.SCHEDULER.pending()
        event(type="DELETED", body=body)
        assert (kind, "u-moving") not in scheduler.SCHEDULER.pending()
        assert not shards.here(uid="u-moving")
        event(type="MODIFIED", body=body)  # relabelled back: scheduled again
        assert (kind, "u-moving") in scheduler.SCHEDULER.pending()
        scheduler.SCHEDULER.drop((kind, "u-moving"))


def test_a_stopped_timer_gets_time_to_end_instead_of_a_dummy_status_patch(instance: list[str]) -> None:
    """Kopf's default (a few zero-time cycles, then a re-check 60 s later through a patch of status)
    wrote status once per finished object without any change (tests/integration/test_writes.py)."""
    settings = kopf.OperatorSettings()
    assert settings.background.instant_exit_timeout is None  # Kopf's default
    main.configure(settings=settings)
    assert settings.background.instant_exit_timeout == 0.5
