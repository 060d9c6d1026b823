"""The ``kubectl mlrollouts`` plugin: see :mod:`model_rollouts.cli.app`.

Its libraries (rich, jsonschema, cel-python) are the ``plugin`` extra, which the operator does not
install: this package imports the app only when it is used, and says what to install if they are
missing.
"""

from __future__ import annotations

import sys
from typing import Any

#: Modules of the ``plugin`` extra (import names).
PLUGIN_MODULES = ("rich", "jsonschema", "celpy")
INSTALL_HINT = 'the kubectl plugin needs its extra: pip install "model-rollouts[plugin]"'


def main() -> None:
    try:
        from model_rollouts.cli.app import main as run
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in PLUGIN_MODULES:
            raise
        print(f"error: {INSTALL_HINT} (missing: {e.name})", file=sys.stderr)
        sys.exit(1)
    run()


def __getattr__(name: str) -> Any:
    if name == "cli":
        from model_rollouts.cli.app import cli

        return cli
    raise AttributeError(name)


__all__ = ["cli", "main"]
