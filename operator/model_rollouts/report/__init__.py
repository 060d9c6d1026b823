"""``kubectl mlrollouts report``: a decision report (plots and tables) of a rollout or an experiment.

Rendered from the object (``status.history``, the spec's thresholds, the last analyses in
``status.series``) and the series ConfigMaps that hold every analysis of its revision, so it works on
a live cluster and on a saved object (``--from-file``; save the ConfigMaps in the same file with
``kubectl get cm -l mlrollouts.io/series-of=<uid>`` for every analysis).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from model_rollouts.report.document import FORMATS, Written, write

__all__ = ["FORMATS", "Written", "write"]


def __getattr__(name: str) -> Any:
    # Imported on first use: document loads matplotlib, which registering the `report` command in
    # `kubectl mlrollouts` (and its --help) does not need.
    if name in __all__:
        from model_rollouts.report import document

        return getattr(document, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
