"""Label delay: compare labels with the predictions they belong to. Pure: no I/O.

Feedback (a click, a chargeback) arrives some time D after its prediction, D anywhere in
[0, ``delay``]. Counting, since the epoch began at S, the labels that have arrived by now T against the
predictions made by T (the undelayed comparison) is biased: the newest predictions have no labels yet
(every rate is too low), and labels arriving early in an epoch belong to predictions made before the
weight change, at the old split (the arm whose weight went up looks worse, the other better).

Here an epoch's comparison uses two windows of the same length T - S - ``delay``:

* labels (successes, or the sums of a mean) that **arrived** in (S + delay, T]: all of them belong to
  predictions made in this epoch, since a label arriving after S + delay was made after S;
* predictions (trials) **made** in (S, T - delay]: in Prometheus, the trials query over that window
  with ``offset`` ``delay``.

When traffic is steady within the epoch, the labels arriving in the first window and the labels that
will eventually arrive for the predictions in the second have the same expectation, whatever the
delay distribution, so the rate is unbiased (the benchmark ``label_delay`` in ``make bench-stats``
measures it). No verdict is given before S + ``delay`` (no label of the epoch is known to be
complete), and each epoch gives up its first ``delay`` of data: a weight step shorter than the delay
adds nothing to the comparison.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from model_rollouts.analysis import stats


@dataclass(frozen=True)
class LabelWindow:
    """Where to count an epoch's labels and its trials."""

    #: Count labels that arrived after this instant and up to ``labels_to``.
    labels_from: datetime
    labels_to: datetime
    #: Count trials over a window of the same length ending this many seconds before ``labels_to``.
    trials_offset_seconds: float
    #: Length of both windows, in seconds.
    seconds: float


def _seconds(delay: timedelta | float) -> float:
    s = delay.total_seconds() if isinstance(delay, timedelta) else float(delay)
    if not math.isfinite(s) or s < 0:
        raise ValueError(f"label delay must be a finite duration >= 0, got {delay!r}")
    return s


def first_verdict_at(epoch_start: datetime, delay: timedelta | float) -> datetime:
    """The earliest instant an epoch that began at ``epoch_start`` can be judged."""
    return epoch_start + timedelta(seconds=_seconds(delay))


def label_window(epoch_start: datetime, now: datetime, delay: timedelta | float) -> LabelWindow | None:
    """The windows of an epoch (open, or closed at ``now``); None while no label window exists yet."""
    d = _seconds(delay)
    length = (now - epoch_start).total_seconds() - d
    if length <= 0:
        return None
    return LabelWindow(
        labels_from=epoch_start + timedelta(seconds=d),
        labels_to=now,
        trials_offset_seconds=d,
        seconds=length,
    )


def delayed_proportion(successes: float, trials: float) -> stats.ProportionData:
    """Labels that arrived in the label window over trials made in the trials window.

    The two windows hold different (overlapping) sets of predictions, so by chance the labels can
    outnumber the trials when the rate is high; they are capped at the trials.
    """
    s, n = max(0.0, float(successes)), max(0.0, float(trials))
    return stats.ProportionData(min(s, n), n)
