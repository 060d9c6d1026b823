"""One reader of a stored comparison's numbers, whichever kind wrote it.

Status details use one key vocabulary for both kinds: ``baseline``/``candidate`` (the estimates),
``baselineN``/``candidateN`` (the samples), ``difference``, ``ciLow``, ``ciHigh``, ``pValue`` and
friends. Objects written before it carry the per-kind keys (``stable``/``stableN`` of a rollout,
``control``/``variant``/``controlN``/``variantN`` of an experiment); status still carries them too, as
the plugin's JSON and existing dashboards read them. :func:`numbers` reads either.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

#: The per-kind names of the two arms' estimates, written alongside the shared ones.
ROLLOUT_NAMES = ("stable", "candidate")
EXPERIMENT_NAMES = ("control", "variant")
#: The shared keys of the two arms, and their older per-kind names (either kind).
_LEGACY = {
    "baseline": ("stable", "control"),
    "candidate": ("variant",),
    "baselineN": ("stableN", "controlN"),
    "candidateN": ("variantN",),
}
ARM_KEYS = tuple(_LEGACY)
#: The other numbers of a comparison, the same key in every version.
NUMBER_KEYS = (
    "difference",
    "ciLow",
    "ciHigh",
    "pValue",
    "alpha",
    "adjustedPValue",
    "probabilityToBeBest",
    "moreSamplesNeeded",
    "epochs",
)


def _finite(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
        return None
    return float(x)


def numbers(details: Mapping[str, Any] | None) -> dict[str, float | None]:
    """The comparison's numbers under the shared keys (None where absent or not finite)."""
    d = details or {}
    out: dict[str, float | None] = {}
    for key, legacy in _LEGACY.items():
        found = next((d[k] for k in (key, *legacy) if k in d), None)
        out[key] = _finite(found)
    for key in NUMBER_KEYS:
        out[key] = _finite(d.get(key))
    return out


def with_names(shared: Mapping[str, Any], names: tuple[str, str]) -> dict[str, Any]:
    """``shared`` plus the arms' numbers under a kind's own names (``names``: baseline, candidate)."""
    base, cand = names
    return {
        **shared,
        base: shared.get("baseline"),
        cand: shared.get("candidate"),
        f"{base}N": shared.get("baselineN"),
        f"{cand}N": shared.get("candidateN"),
    }


def baseline_name(spec: Mapping[str, Any]) -> str:
    """The baseline arm's name in a spec: an experiment's control variant, else a rollout's stable."""
    return next((str(v.get("name")) for v in spec.get("variants") or [] if v.get("control")), "stable")
