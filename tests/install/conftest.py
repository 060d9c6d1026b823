"""Install tests (chart, manifests, Argo CD Lua, Dockerfile) run in their own CI stage, `make chart`.

They are collected only when this directory is named on the command line (or
MODEL_ROLLOUTS_INSTALL_TESTS=1), so `make test` stays the operator's suite.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.install.tools import named_explicitly

HERE = Path(__file__).resolve().parent


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if collection_path.resolve() != HERE and not named_explicitly(config, HERE):
        return True
    return None
