"""Integration tests run on real components only; without them they skip, saying why.

CI sets MODEL_ROLLOUTS_REQUIRE_INTEGRATION=1, which turns a missing component into a failure.
"""

from __future__ import annotations

import os

import pytest

from tests.harness.cluster import MissingComponent, find_binaries, gateway_api_crds
from tests.harness.prom import find_prometheus


def _missing() -> str | None:
    try:
        find_binaries(controller_manager=True)
        gateway_api_crds()
        find_prometheus()
    except MissingComponent as e:
        return str(e)
    return None


@pytest.fixture(scope="session")
def real_components() -> None:
    reason = _missing()
    if reason:
        if os.environ.get("MODEL_ROLLOUTS_REQUIRE_INTEGRATION") == "1":
            pytest.fail(f"integration components missing and required: {reason}")
        print(f"\nSKIP integration: {reason}")
        pytest.skip(reason)


@pytest.fixture(autouse=True)
def _require_real_components(real_components: None) -> None:
    """Every integration test needs the real control plane and Prometheus."""
