"""``kubectl mlrollouts report``: a decision report (plots and tables) of a rollout or an experiment.

Rendered from the object alone (``status.series``, ``status.history``, the spec's thresholds), so it
works on a saved object (``--from-file``) as well as on a live cluster.
"""

from model_rollouts.report.document import FORMATS, Written, write

__all__ = ["FORMATS", "Written", "write"]
