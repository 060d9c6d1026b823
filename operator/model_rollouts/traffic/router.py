"""The traffic-router interface. One file per implementation; only weights are ever written.

A router weights **arms**: an arm is a role (``stable``/``candidate`` of a rollout, a variant's name
in an experiment, ``retired`` for a Service an earlier revision used) and the backend the router
weights for it (a Service for Gateway API, a Deployment for a replica ratio, one of the two
predictors of a KServe InferenceService). A tick reads the route once (:meth:`TrafficRouter.read`,
a :class:`RouteState`), checks and decides from that state, and writes at most once
(:meth:`TrafficRouter.write`, which writes nothing when the state already carries the weights and
returns what the API server stored, so the caller verifies instead of assuming).

A router with ``Capabilities.mirroring`` also carries at most one **mirror** the operator owns: a copy
of a share of the route's requests sent to one arm's backend, whose answers nobody sees (a rollout's
shadow step). The operator owns a mirror on the managed rule whose target is the backend of the
``candidate`` arm it writes (:func:`mirror_owned`); :meth:`TrafficRouter.write` with ``mirror=None``
removes such a mirror, so every write that ends a rollout (rollback, promotion, abort, deletion)
also ends its shadow. Other mirrors are never written.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from model_rollouts.api.errors import SpecError

#: The role of a Service an earlier revision or a removed variant used: weighted 0, and only when
#: the route still has it (one already gone from the route carries no traffic).
RETIRED = "retired"
#: The role of a rollout's candidate: the only arm the operator mirrors to (a shadow step).
CANDIDATE = "candidate"


class RouterError(SpecError):
    """The router's target cannot be used; ``field`` names the spec field at fault."""


class NotOptedIn(RouterError):
    """The route does not let this object manage its weights; retrying cannot change that."""


@dataclass(frozen=True)
class Arm:
    """One arm of a split: who it is (``role``) and what the router weights for it (``backend``)."""

    role: str
    backend: str


@dataclass(frozen=True)
class Capabilities:
    """What a router can do; the engine's decisions must fit (checked before any write)."""

    max_arms: int | None = None  # None: any number
    granularity: int = 1  # weights are multiples of this (percent)
    mirroring: bool = False
    header_match: bool = False

    def fit_mirror(self, field: str, mirror: Mirror | None) -> None:
        """RouterError naming ``field`` when a mirror is asked of a router that cannot mirror."""
        if mirror is not None and not self.mirroring:
            raise RouterError(field, "this router cannot mirror requests (a shadow step needs it)")

    def fit(self, field: str, weights: Mapping[Arm, int]) -> None:
        """RouterError naming ``field`` unless this router can carry these weights."""
        live = [a for a, w in weights.items() if a.role != RETIRED or w]
        if self.max_arms is not None and len(live) > self.max_arms:
            raise RouterError(field, f"this router weights at most {self.max_arms} arms, not {len(live)}")
        off = sorted(a.backend for a, w in weights.items() if w % self.granularity)
        if off:
            raise RouterError(
                field, f"this router sets weights in steps of {self.granularity}; not so for {', '.join(off)}"
            )


@dataclass(frozen=True)
class Mirror:
    """A copy of ``percent`` % of the route's requests to ``arm``'s backend; its answers are dropped."""

    arm: Arm
    percent: int


def mirror_owned(weights: Mapping[Arm, int], mirror: Mirror | None) -> set[str]:
    """Backends whose mirror on the managed rule is the operator's: the candidate arm's (and the
    asked mirror's)."""
    return {a.backend for a in weights if a.role == CANDIDATE} | ({mirror.arm.backend} if mirror else set())


@dataclass(frozen=True)
class RouteState:
    """One read of a route: the weight per backend it carries, and the object as read (for the write).

    ``mirrors``: backend -> percent of every mirror on the managed rule (a router that cannot
    mirror leaves it empty)."""

    weights: dict[str, int]
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    mirrors: dict[str, int] = field(default_factory=dict)

    def mirror_wrong(self, weights: Mapping[Arm, int], mirror: Mirror | None) -> dict[str, int] | None:
        """The operator's mirrors (to the arms in ``weights``) this route carries, when they are not
        exactly ``mirror``; None when they are."""
        backends = mirror_owned(weights, mirror)
        ours = {b: p for b, p in self.mirrors.items() if b in backends}
        want = {mirror.arm.backend: mirror.percent} if mirror else {}
        return None if ours == want else ours

    def carries(self, weights: Mapping[Arm, int]) -> bool:
        """Whether this route already carries these weights (a retired arm it lacks carries 0)."""
        return all(self.weights.get(a.backend, 0) == w for a, w in weights.items())

    def wrong(self, weights: Mapping[Arm, int]) -> dict[str, int | None]:
        """Backend -> weight carried, for every arm whose weight differs from the one asked."""
        return {
            a.backend: self.weights.get(a.backend)
            for a, w in weights.items()
            if self.weights.get(a.backend, 0) != w
        }


class TrafficRouter(Protocol):
    #: The spec field of this router (``spec.trafficRouting.<name>``), for messages.
    field: str
    capabilities: ClassVar[Capabilities]

    def read(self) -> RouteState:
        """The route as the API server has it: the operator's watch's copy where the router keeps one
        (Gateway API: traffic/watched.py), else one GET. RouterError if it cannot be used at all."""
        ...

    def admit(self, state: RouteState, arms: list[Arm]) -> None:
        """RouterError unless this object may write the route and it can weight every arm given."""
        ...

    def write(
        self, state: RouteState, weights: Mapping[Arm, int], mirror: Mirror | None = None
    ) -> RouteState:
        """Set the weight of each arm (and the operator's mirror: ``mirror``, or none), touching nothing
        else: no request at all if ``state`` already carries them, else one write that fails (nothing
        written) if the route changed under it in a way that matters. Returns the route as the API
        server stored it. A mirror asked of a router without ``mirroring`` is a RouterError."""
        ...


@dataclass(frozen=True)
class RouterType:
    """A router as the registry knows it (``ROUTER`` in its module, see traffic/registry.py)."""

    #: Its field under ``spec.trafficRouting``.
    name: str
    capabilities: Capabilities
    #: (API client, namespace, its spec model, owner (kind, name) or None) -> the router.
    make: Callable[[Any, str, Any, tuple[str, str] | None], TrafficRouter]
    #: Its spec field as stored (raw) -> (target, index): what one object at a time may own.
    claim: Callable[[Mapping[str, Any]], tuple[str, int] | None]
    #: (target, index) -> the words for messages ("HTTPRoute fraud rule 0").
    describe: Callable[[str, int], str]
    #: The spec field that names the target, for messages.
    field: str
