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
    "test_rollout_faults.py",
    "test_experiment.py",
    "test_tenancy.py",
    "test_cli.py",
    "test_notifications.py",
    "test_rollout.py",
    "test_observability.py",
    "test_report.py",
    "test_tenancy_hostile.py",
    "test_tenancy_rbac.py",
    "test_tenancy_isolation.py",
    "test_smoke.py",
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
