"""What a LIST and a status write carry per object, after a long run: before (status.series of up to 120
points / 256 KiB, every status write a full replace) and now (a 5-point / 8 KiB window, a merge patch of
the changed fields, every analysis archived once to a ConfigMap).

Runs the real engines (no I/O) through ``--analyses`` analyses of a rollout held at an analysis step
(1 guardrail, 1 comparison: the real-stack tests' spec) and of an experiment (3 variants, 2 guardrails),
and measures the bodies exactly as the operator builds them. ``python -m tests.bench.bench_status_size``;
the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from model_rollouts.analysis.stats import ProportionData
from model_rollouts.api.common import dump
from model_rollouts.api.experiment import ModelExperimentSpec, ModelExperimentStatus
from model_rollouts.api.rollout import ModelRolloutSpec, ModelRolloutStatus
from model_rollouts.engine import experiment as xeng
from model_rollouts.engine import rollout as reng
from model_rollouts.engine import series
from model_rollouts.kube.status import status_patch
from model_rollouts.metrics.provider import Result

T0 = datetime(2026, 3, 1, tzinfo=UTC)
ANALYSIS = {"interval": "5s", "prometheus": {"address": "http://prometheus:9090"}}
META = {"name": "fraud-scorer", "namespace": "ml", "uid": "0b9e3c1e-6a1f-4c55-9d0e-5a3c2f1b7e42",
        "resourceVersion": "123456", "generation": 1,
        "creationTimestamp": "2026-03-01T00:00:00Z"}  # fmt: skip


def _compact(x: Any) -> int:
    return len(json.dumps(x, separators=(",", ":")))


@contextmanager
def old_bounds() -> Iterator[None]:
    """The series bounds before this change: 120 points and 256 KiB."""
    limit, size = series.SERIES_LIMIT, series.SERIES_MAX_BYTES
    series.SERIES_LIMIT, series.SERIES_MAX_BYTES = 120, 256 * 1024
    try:
        yield
    finally:
        series.SERIES_LIMIT, series.SERIES_MAX_BYTES = limit, size


def rollout_run(analyses: int) -> tuple[dict[str, Any], list[tuple[dict[str, Any], dict[str, Any]]]]:
    spec = ModelRolloutSpec.model_validate(
        {
            "stable": {"service": "fraud-v1"},
            "candidate": {"service": "fraud-v2", "modelVersion": "2.0"},
            "trafficRouting": {"gatewayAPI": {"httpRoute": "fraud"}},
            "steps": [{"setWeight": 20}, {"analysis": {"duration": "1000h"}}, {"setWeight": 100}],
            "analysis": {
                **ANALYSIS,
                "guardrails": [{"name": "error-rate", "query": "q", "max": 0.05}],
                "comparisons": [
                    {"name": "positive-feedback", "successes": "s", "trials": "t", "margin": 0.02}
                ],
            },
        }
    )
    status, now, done, out = ModelRolloutStatus(), T0, 0, []
    while done < analyses:
        obs = None
        if reng.needs_measurement(spec, status, now):
            n = 1000.0 * (done + 1)
            obs = reng.Observations(
                guardrails={"error-rate": Result("value", 0.01 + done * 1e-6)},
                comparisons={
                    "positive-feedback": reng.ComparisonData(
                        stable=ProportionData(0.5 * n, n), candidate=ProportionData(0.5 * n, n)
                    )
                },
            )
            done += 1
        new = reng.reconcile(spec, status, now=now, generation=1, observations=obs).status
        out.append((dump(status), dump(new)))
        status, now = new, now + timedelta(seconds=5)
    return dump(spec), out


def experiment_run(analyses: int) -> tuple[dict[str, Any], list[tuple[dict[str, Any], dict[str, Any]]]]:
    spec = ModelExperimentSpec.model_validate(
        {
            "variants": [{"name": "control", "service": "rec-0", "control": True}]
            + [{"name": f"b{i}", "service": f"rec-{i}"} for i in (1, 2)],
            "trafficRouting": {"gatewayAPI": {"httpRoute": "rec"}},
            "primaryMetric": {"name": "ctr", "type": "proportion", "successes": "s", "trials": "t"},
            "guardrails": [{"name": f"g{i}", "query": "q", "max": 0.5} for i in range(2)],
            "successCriteria": {"minimumDetectableEffect": 0.05},
            "stoppingRules": {"minSamplesPerVariant": 10**9, "maxSamplesPerVariant": 10**10},
            "analysis": ANALYSIS,
        }
    )
    status, now, out = ModelExperimentStatus(), T0, []
    for i in range(analyses + 1):
        n = 300.0 * (i + 1)
        obs = xeng.Observations(
            variants={
                v.name: xeng.VariantObservation(
                    primary=ProportionData(round(0.1 * n), n),
                    guardrails={g.name: Result("value", 0.01) for g in spec.guardrails},
                )
                for v in spec.variants
            }
        )
        new = xeng.reconcile(spec, status, now=now, generation=1, observations=obs if i else None).status
        out.append((dump(status), dump(new)))
        status, now = new, now + timedelta(seconds=5)
    return dump(spec), out


def measure(
    kind: str, run: Callable[[int], tuple[dict[str, Any], list[Any]]], analyses: int
) -> dict[str, Any]:
    """Object bytes as LISTed at the end, and bytes per status write over the last 100 writes."""

    def obj(spec: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
        return {"apiVersion": "mlrollouts.io/v1alpha1", "kind": kind, "metadata": META, "spec": spec,
                "status": status}  # fmt: skip

    with old_bounds():
        spec, steps = run(analyses)
    changed = [(o, n) for o, n in steps if o != n]
    # A full replace sent apiVersion, kind, name, namespace, resourceVersion and all of status.
    full_meta = {k: META[k] for k in ("name", "namespace", "resourceVersion")}
    before_writes = [
        _compact({"apiVersion": "mlrollouts.io/v1alpha1", "kind": kind, "metadata": full_meta, "status": n})
        for _, n in changed
    ]
    before_obj = _compact(obj(spec, changed[-1][1]))
    before_points = len(changed[-1][1]["series"])
    spec, steps = run(analyses)
    changed = [(o, n) for o, n in steps if o != n]
    after_writes = [
        _compact(
            {
                "metadata": {"resourceVersion": META["resourceVersion"]},
                "status": status_patch({"status": o}, n),
            }
        )
        for o, n in changed
    ]
    last = changed[-1][1]
    point = last["series"][-1]
    return {
        "analyses": analyses,
        "before": {
            "object_bytes": before_obj,
            "series_points": before_points,
            "status_write_bytes_mean": round(statistics.mean(before_writes[-100:])),
            "status_write_bytes_max": max(before_writes),
        },
        "after": {
            "object_bytes": _compact(obj(spec, last)),
            "series_points": len(last["series"]),
            "status_write_bytes_mean": round(statistics.mean(after_writes[-100:])),
            "status_write_bytes_max": max(after_writes),
            "configmap_write_bytes": _compact(
                {"data": {"t1772323200": json.dumps(point, separators=(",", ":"))}}
            ),
            "archived_bytes_total": analyses * (len(json.dumps(point, separators=(",", ":"))) + 14),
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--analyses", type=int, default=500)
    args = ap.parse_args()
    out = {
        "rollout": measure("ModelRollout", rollout_run, args.analyses),
        "experiment": measure("ModelExperiment", experiment_run, args.analyses),
    }
    for kind, m in out.items():
        b, a = m["before"], m["after"]
        print(f"{kind} after {m['analyses']} analyses: object as LISTed {b['object_bytes']} -> "
              f"{a['object_bytes']} bytes; status write mean {b['status_write_bytes_mean']} -> "
              f"{a['status_write_bytes_mean']} bytes "
              f"(max {b['status_write_bytes_max']} -> {a['status_write_bytes_max']}); one ConfigMap write "
              f"{a['configmap_write_bytes']} bytes per analysis")  # fmt: skip
    print(json.dumps(out))


if __name__ == "__main__":
    main()
