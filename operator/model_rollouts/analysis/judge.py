"""The one interface every judge has.

A judge is a pure function of its spec (the user's declaration, e.g. a ``Guardrail``, or a small frozen
spec built from it) and the arms' observations, returning a :class:`Finding`. Adding a judge (segments,
distribution shift, calibration) is one new module with such a function plus its spec model; the engines
store its finding with :func:`~model_rollouts.analysis.vocabulary.measurement` and :func:`assess` applies
the limits to it like to any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from model_rollouts.analysis.vocabulary import Finding

S_contra = TypeVar("S_contra", contravariant=True)
O_co = TypeVar("O_co", covariant=True)
O_contra = TypeVar("O_contra", contravariant=True)


@dataclass(frozen=True)
class Arms(Generic[O_co]):
    """The observations of the two roles of one judgement (either may be missing)."""

    baseline: O_co | None
    candidate: O_co | None


class Judge(Protocol[S_contra, O_contra]):
    def __call__(self, spec: S_contra, arms: O_contra, /) -> Finding: ...
