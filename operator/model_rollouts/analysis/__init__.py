"""Where a measurement becomes a verdict (pure, no I/O), the same for both kinds.

``vocabulary``: the verdicts, the arm roles and the measurement ``Result``. Judges, one file each and
all of the shape :class:`~model_rollouts.analysis.judge.Judge` (a spec and the arms' observations in,
a :class:`~model_rollouts.analysis.vocabulary.Finding` out): ``threshold`` (guardrail bounds),
``sequential`` (two arms compared by ``stats``), ``srm`` (sample-ratio mismatch). ``assess`` turns one
analysis's findings into what the engine must do: failure limit, error limit, ``noData``, holds and the
Healthy condition. ``comparison`` reads a stored comparison's numbers for telemetry, the plugin and the
report, whichever kind wrote it.
"""
