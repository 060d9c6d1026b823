"""Suite-wide collection order: the longest real-stack modules first.

``make test`` runs the suite in two pytest-xdist workers with ``--dist loadfile`` (one module
stays on one worker, so module-scoped stacks are shared by that module's tests). Workers take
modules in collection order, so starting with the longest integration modules and ending with
the short unit modules keeps both workers busy to the end instead of leaving one long module
alone at the tail. The order only changes when tests run, never what they assert.
"""

from __future__ import annotations

import pytest

# Measured wall time of each integration module on 2 cores (make test -n 2, seconds), longest
# first. A module that is not listed runs after these and before the unit tests.
SLOWEST_FIRST = [
    "test_rollout_faults.py",  # 543 s
    "test_experiment.py",  # 289 s
    "test_cli.py",  # 246 s
    "test_tenancy_fairness.py",  # 190 s
    "test_observability.py",  # 180 s
    "test_rollout.py",  # 162 s
    "test_tenancy_bounds.py",
    "test_tenancy.py",  # 128 s
    "test_notifications.py",  # 118 s
    "test_report.py",  # 115 s
    "test_examples.py",
    "test_tenancy_rbac.py",  # 98 s
    "test_probes.py",
    "test_tenancy_isolation.py",  # 69 s
    "test_smoke.py",  # 57 s
    "test_dataplane.py",  # 40 s
    "test_alert_no_leader.py",
    "test_tenancy_hostile.py",  # 17 s
]


def _rank(item: pytest.Item) -> tuple[int, int]:
    path = item.path
    if "integration" in path.parts:
        try:
            return (0, SLOWEST_FIRST.index(path.name))
        except ValueError:
            return (1, 0)
    return (2, 0)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=_rank)  # stable: the order inside a module is unchanged
