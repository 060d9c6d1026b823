"""Integration tests run on real components only; without them they skip, saying why.

CI sets MODEL_ROLLOUTS_REQUIRE_INTEGRATION=1, which turns a missing component into a failure.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator

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


@pytest.fixture(autouse=True)
def _collect_garbage_between_tests() -> Iterator[None]:
    """Finalise what a test left behind at its own teardown, not inside a later test.

    Helpers that run event loops in threads (the fault proxy, recording HTTP servers) can leave
    coroutines for the garbage collector. Finalised in the middle of a later test, one of them can
    re-enter ``ast.parse`` while pytest renders a traceback, which CPython 3.11 reports as
    ``SystemError: AST constructor recursion depth mismatch`` and pytest as an INTERNALERROR that
    hides the real outcome.
    """
    yield
    gc.collect()
