"""Route rules the operator owns: the header/cookie match (``spec.trafficRouting.match``) and sticky
cohorts (``spec.trafficRouting.affinity``), for both routers.

What the operator adds, while a rollout or experiment runs, and removes at its end (promotion,
rollback, abort, deletion, or when the field leaves the spec):

- **Match rule**: one rule named ``mlrollouts-<owner hash>-match`` that sends requests carrying the
  headers / cookie to the match's arm (a rollout's candidate, an experiment's ``match.variant``).
  Its matches are the managed rule's matches, each with the headers added (a cookie is a
  regular-expression match on the ``Cookie`` header: Gateway API has no cookie matcher; Istio is given
  ``headers: {cookie: {regex: ...}}``), so it is strictly more specific than the managed rule.
- **Sticky rules** (affinity): one rule per arm with a positive weight, named
  ``mlrollouts-<owner hash>-sticky-<backend>``, that sends requests carrying ``NAME=<backend>`` (cookie,
  or the header) straight to that arm; and, on each arm's destination of the managed rule, a response
  header that hands out that value (Gateway API: a ``ResponseHeaderModifier`` filter in the
  backendRef's ``filters``; Istio: the destination's ``headers.response.add``), marked by the header
  ``x-mlrollouts-arm: <backend>``. Affinity applies only while at least two arms have weight (a
  rollout before its first weight pins nobody); an arm at weight 0 loses its sticky rule, so its users
  are split again.

Where: Gateway API rules are appended after the user's rules (the managed rule's index never moves);
precedence is by match specificity (the match and sticky rules carry more header matches than the
managed rule) and, on a tie, list order, in which the match rule comes first. Istio ``http`` routes
are tried in order, so the operator's routes are inserted right before the managed route, the match
route first.

Every change is part of the router's one JSON patch: the operator's rules are found by name (tested
before they are removed), no other rule is touched, and the result is read back from the API server's
answer (:func:`mismatch`).
"""

from __future__ import annotations

import copy
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from model_rollouts.traffic.router import RETIRED, Arm, RouterError

#: Every rule the operator adds is named with this prefix (Gateway API rule ``name``, Istio route ``name``).
PREFIX = "mlrollouts-"
#: Response header that marks the operator's per-arm response header (its value: the arm's backend).
MARKER = "x-mlrollouts-arm"
MATCH_FIELD = "spec.trafficRouting.match"
AFFINITY_FIELD = "spec.trafficRouting.affinity"
_SAFE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


class RulesNotVerified(Exception):
    """The API server's answer to the patch does not carry the operator's rules as written."""


@dataclass(frozen=True)
class Owned:
    """The operator's rules one route must carry (empty: none; every rule of this owner is removed)."""

    owner: str  # "<kind>/<namespace>/<name>"
    #: (headers [(name, kind "exact"|"regex", value)], backend) of the match rule, or None.
    match: tuple[tuple[tuple[str, str, str], ...], str] | None = None
    #: ("cookie"|"header", name) of the affinity, or None.
    affinity: tuple[str, str] | None = None
    #: Backends handed out by the response header (every arm that is not retired).
    arms: tuple[str, ...] = ()
    #: Backends with a sticky rule (arms with a positive weight).
    sticky: tuple[str, ...] = field(default=())
    #: The spec sets match or affinity (even once finished: its rules must then be looked for).
    uses: bool = False

    @property
    def prefix(self) -> str:
        return f"{PREFIX}{hashlib.sha256(self.owner.encode()).hexdigest()[:8]}-"

    def name(self, purpose: str, backend: str = "") -> str:
        if not backend:
            return self.prefix + purpose
        tail = backend if _SAFE.match(backend) else hashlib.sha256(backend.encode()).hexdigest()[:12]
        return f"{self.prefix}{purpose}-{tail}"

    def value(self, backend: str) -> str:
        """What the response header hands out for ``backend`` (cookie: a Set-Cookie value)."""
        assert self.affinity is not None
        kind, key = self.affinity
        return f"{key}={backend}; Path=/" if kind == "cookie" else backend

    def response_header(self) -> str:
        assert self.affinity is not None
        kind, key = self.affinity
        return "Set-Cookie" if kind == "cookie" else key

    def sticky_condition(self, backend: str) -> tuple[str, str, str]:
        assert self.affinity is not None
        kind, key = self.affinity
        if kind == "cookie":
            return ("cookie", "regex", cookie_regex(key, backend))
        return (key, "exact", backend)


def cookie_regex(name: str, value: str) -> str:
    """A whole-value regular expression (RE2 and PCRE alike) for a Cookie header holding name=value."""
    return rf"^(.*;\s*)?{re.escape(name)}={re.escape(value)}(;.*)?$"


def target_role(kind: str, routing: Any) -> str | None:
    """The arm role the match sends requests to; RouterError naming the field if it cannot be known."""
    match = getattr(routing, "match", None)
    if match is None:
        return None
    if kind == "ModelExperiment":
        if not match.variant:
            raise RouterError(f"{MATCH_FIELD}.variant", "name the variant that matching requests go to")
        return str(match.variant)
    if match.variant:
        raise RouterError(
            f"{MATCH_FIELD}.variant", "a ModelRollout's matching requests go to its candidate: leave it unset"
        )
    return "candidate"


def check(kind: str, routing: Any, arms: list[Arm]) -> None:
    """RouterError naming the field unless the match's arm is one of ``arms``."""
    role = target_role(kind, routing)
    if role is not None and role not in {a.role for a in arms}:
        raise RouterError(
            f"{MATCH_FIELD}.variant", f"{role} is not a variant (variants: {', '.join(a.role for a in arms)})"
        )


def desired(
    kind: str, namespace: str, name: str, routing: Any, weights: Mapping[Arm, int], active: bool
) -> Owned:
    """The operator's rules for these weights: none once the object is finished (``active`` False)."""
    owner = f"{kind}/{namespace}/{name}"
    match_spec, affinity_spec = getattr(routing, "match", None), getattr(routing, "affinity", None)
    uses = match_spec is not None or affinity_spec is not None
    if not active:
        return Owned(owner, uses=uses)
    match = None
    role = target_role(kind, routing)
    backend = next((a.backend for a in weights if a.role == role), None)
    if match_spec is not None and backend is not None:
        conds = [
            (h.name.lower(), "regex" if h.type == "RegularExpression" else "exact", h.value)
            for h in match_spec.headers
        ]
        conds += [("cookie", "regex", cookie_regex(c.name, c.value)) for c in match_spec.cookies]
        match = (tuple(conds), backend)
    arms = tuple(dict.fromkeys(a.backend for a in weights if a.role != RETIRED))
    live = tuple(dict.fromkeys(a.backend for a, w in weights.items() if a.role != RETIRED and w > 0))
    if affinity_spec is None or len(live) < 2:
        return Owned(owner, match, uses=uses)
    aff = (
        ("cookie", affinity_spec.cookie) if affinity_spec.cookie else ("header", affinity_spec.header.lower())
    )
    return Owned(owner, match, aff, arms, live, uses)


def _pointer(*parts: str | int) -> str:
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def _reorder(
    current: list[tuple[int, dict[str, Any]]],
    want: list[dict[str, Any]],
    base: tuple[str, ...],
    at: int | None,
) -> list[dict[str, Any]]:
    """Ops that remove this owner's rules (``current``: (index, rule), tested by name first) and add
    ``want`` (at index ``at`` in order, or appended when None); none if they are already so."""
    if [r for _, r in current] == want and (
        at is None or [i for i, _ in current] == list(range(at - len(current), at))
    ):
        return []
    ops: list[dict[str, Any]] = []
    for i, rule in sorted(current, key=lambda c: -c[0]):
        ops.append({"op": "test", "path": _pointer(*base, i, "name"), "value": rule["name"]})
        ops.append({"op": "remove", "path": _pointer(*base, i)})
    if at is not None:
        at -= sum(1 for i, _ in current if i < at)
    for k, rule in enumerate(want):
        ops.append({"op": "add", "path": _pointer(*base, "-" if at is None else at + k), "value": rule})
    return ops


# -- Gateway API HTTPRoute -------------------------------------------------------------------------------


def _gw_ours(f: Any) -> bool:
    mod = f.get("responseHeaderModifier") if isinstance(f, Mapping) else None
    return (
        isinstance(mod, Mapping)
        and f.get("type") == "ResponseHeaderModifier"
        and any(
            isinstance(h, Mapping) and str(h.get("name", "")).lower() == MARKER for h in mod.get("add") or []
        )
    )


def _gw_filter(owned: Owned, backend: str) -> dict[str, Any]:
    return {
        "type": "ResponseHeaderModifier",
        "responseHeaderModifier": {
            "add": [
                {"name": owned.response_header(), "value": owned.value(backend)},
                {"name": MARKER, "value": backend},
            ]
        },
    }


def _gw_headers(conds: tuple[tuple[str, str, str], ...]) -> list[dict[str, Any]]:
    return [
        {
            "name": "Cookie" if n == "cookie" else n,
            "type": "RegularExpression" if k == "regex" else "Exact",
            "value": v,
        }
        for n, k, v in conds
    ]


def _gw_rule(
    managed: Mapping[str, Any],
    name: str,
    conds: tuple[tuple[str, str, str], ...],
    ref: Mapping[str, Any],
    extra: dict[str, Any] | None,
) -> dict[str, Any]:
    """A copy of the managed rule (its matches with ``conds`` added, its filters but a mirror) sending
    everything to one backendRef (``ref`` without the operator's filter, plus ``extra`` if given)."""
    added = _gw_headers(conds)
    keys = {h["name"].lower() for h in added}
    matches = []
    for m in managed.get("matches") or [{}]:
        m2 = copy.deepcopy(dict(m))
        m2["headers"] = [
            h for h in m2.get("headers") or [] if str(h.get("name", "")).lower() not in keys
        ] + added
        matches.append(m2)
    ref2 = copy.deepcopy(dict(ref))
    filters = [f for f in ref2.get("filters") or [] if not _gw_ours(f)] + ([extra] if extra else [])
    ref2.pop("filters", None)
    if filters:
        ref2["filters"] = filters
    ref2["weight"] = 1
    rule: dict[str, Any] = {"name": name, "matches": matches}
    rule_filters = [f for f in managed.get("filters") or [] if f.get("type") != "RequestMirror"]
    if rule_filters:
        rule["filters"] = copy.deepcopy(rule_filters)
    rule["backendRefs"] = [ref2]
    for key in ("timeouts", "retry"):
        if key in managed:
            rule[key] = copy.deepcopy(managed[key])
    return rule


def gateway_ops(route: Mapping[str, Any], rule_index: int, owned: Owned) -> list[dict[str, Any]]:
    """JSON-patch ops that make an HTTPRoute carry exactly ``owned`` (apply after the weight ops)."""
    rules = (route.get("spec") or {}).get("rules") or []
    managed = rules[rule_index]
    refs = {str(r.get("name")): r for r in managed.get("backendRefs") or []}
    ops: list[dict[str, Any]] = []
    for j, ref in enumerate(managed.get("backendRefs") or []):
        backend = str(ref.get("name"))
        filters = list(ref.get("filters") or [])
        mine = [k for k, f in enumerate(filters) if _gw_ours(f)]
        want = _gw_filter(owned, backend) if owned.affinity and backend in owned.arms else None
        if want is not None and any(
            f.get("type") == "ResponseHeaderModifier" for k, f in enumerate(filters) if k not in mine
        ):
            raise RouterError(
                AFFINITY_FIELD,
                f"backendRef {backend} of rule {rule_index} has a ResponseHeaderModifier of its own; "
                "Gateway API allows one per backendRef",
            )
        if [filters[k] for k in mine] == ([want] if want else []):
            continue
        at = ("spec", "rules", rule_index, "backendRefs", j)
        ops.append({"op": "test", "path": _pointer(*at, "name"), "value": backend})
        if "filters" in ref:  # the list is rewritten whole: only if it is still the one read
            ops.append({"op": "test", "path": _pointer(*at, "filters"), "value": ref["filters"]})
        kept = [f for k, f in enumerate(filters) if k not in mine] + ([want] if want else [])
        if kept:
            ops.append({"op": "add", "path": _pointer(*at, "filters"), "value": kept})
        else:
            ops.append({"op": "remove", "path": _pointer(*at, "filters")})
    want_rules = []
    if owned.match is not None and owned.match[1] in refs:
        want_rules.append(_gw_rule(managed, owned.name("match"), owned.match[0], refs[owned.match[1]], None))
    for backend in owned.sticky:
        if backend in refs:
            want_rules.append(
                _gw_rule(
                    managed,
                    owned.name("sticky", backend),
                    (owned.sticky_condition(backend),),
                    refs[backend],
                    _gw_filter(owned, backend),
                )
            )
    current = [(i, r) for i, r in enumerate(rules) if str(r.get("name") or "").startswith(owned.prefix)]
    return ops + _reorder(current, want_rules, ("spec", "rules"), None)


# -- Istio VirtualService --------------------------------------------------------------------------------

_NOT_COPIED = (
    "name",
    "match",
    "route",
    "mirror",
    "mirrors",
    "mirrorPercentage",
    "mirror_percent",
    "redirect",
    "directResponse",
    "delegate",
)


def _istio_ours(d: Mapping[str, Any]) -> bool:
    add = ((d.get("headers") or {}).get("response") or {}).get("add") or {}
    return isinstance(add, Mapping) and MARKER in add


def _istio_headers(owned: Owned, backend: str) -> dict[str, Any]:
    return {"response": {"add": {owned.response_header().lower(): owned.value(backend), MARKER: backend}}}


def _istio_conds(conds: tuple[tuple[str, str, str], ...]) -> dict[str, Any]:
    return {n: {k: v} for n, k, v in conds}


def _istio_route(
    managed: Mapping[str, Any],
    name: str,
    conds: tuple[tuple[str, str, str], ...],
    dest: Mapping[str, Any],
    extra: dict[str, Any] | None,
) -> dict[str, Any]:
    added = _istio_conds(conds)
    matches = []
    for m in managed.get("match") or [{}]:
        m2 = copy.deepcopy(dict(m))
        m2["headers"] = {**(m2.get("headers") or {}), **added}
        matches.append(m2)
    d2 = copy.deepcopy(dict(dest))
    if _istio_ours(d2):
        d2.pop("headers", None)
    if extra:
        d2["headers"] = extra
    d2["weight"] = 100
    out: dict[str, Any] = {"name": name, "match": matches, "route": [d2]}
    out.update({k: copy.deepcopy(v) for k, v in managed.items() if k not in _NOT_COPIED})
    return out


def istio_ops(vs: Mapping[str, Any], index: int, owned: Owned, destination_name: Any) -> list[dict[str, Any]]:
    """JSON-patch ops that make a VirtualService carry exactly ``owned`` (apply after the weight ops).
    ``index`` is the managed route's; ``destination_name(destination)`` names a destination's backend."""
    routes = (vs.get("spec") or {}).get("http") or []
    managed = routes[index]
    dests = {destination_name(d.get("destination") or {}): d for d in managed.get("route") or []}
    ops: list[dict[str, Any]] = []
    for j, d in enumerate(managed.get("route") or []):
        backend = destination_name(d.get("destination") or {})
        want = _istio_headers(owned, backend) if owned.affinity and backend in owned.arms else None
        at = ("spec", "http", index, "route", j)
        if want is not None and "headers" in d and not _istio_ours(d):
            raise RouterError(
                AFFINITY_FIELD, f"destination {backend} has headers of its own; affinity needs them unset"
            )
        if (d.get("headers") if _istio_ours(d) else None) == want:
            continue
        dest = d.get("destination") or {}
        ops += [
            {"op": "test", "path": _pointer(*at, "destination", k), "value": dest[k]}
            for k in ("host", "subset")
            if k in dest
        ]
        if "headers" in d:
            ops.append({"op": "test", "path": _pointer(*at, "headers"), "value": d["headers"]})
        if want is None:
            ops.append({"op": "remove", "path": _pointer(*at, "headers")})
        else:
            ops.append({"op": "add", "path": _pointer(*at, "headers"), "value": want})
    want_routes = []
    if owned.match is not None and owned.match[1] in dests:
        want_routes.append(
            _istio_route(managed, owned.name("match"), owned.match[0], dests[owned.match[1]], None)
        )
    for backend in owned.sticky:
        if backend in dests:
            want_routes.append(
                _istio_route(
                    managed,
                    owned.name("sticky", backend),
                    (owned.sticky_condition(backend),),
                    dests[backend],
                    _istio_headers(owned, backend),
                )
            )
    current = [(i, r) for i, r in enumerate(routes) if str(r.get("name") or "").startswith(owned.prefix)]
    return ops + _reorder(current, want_routes, ("spec", "http"), index)


def involved(obj: Mapping[str, Any], owned: Owned, key: str) -> bool:
    """Whether a write must look at the operator's rules: it wants some, or the route has some."""
    if owned.uses or owned.match is not None or owned.affinity is not None:
        return True
    items = (obj.get("spec") or {}).get(key) or []
    return any(str(r.get("name") or "").startswith(owned.prefix) for r in items if isinstance(r, Mapping))


def list_guard(ops: list[dict[str, Any]], obj: Mapping[str, Any], key: str) -> list[dict[str, Any]]:
    """A test of the whole rule list as read, to go before every other op, when ``ops`` add or remove
    a rule: a list that changed since the read (a stale copy, a concurrent edit) fails the patch."""
    base = f"/spec/{key}/"
    if not any(
        op["op"] in ("add", "remove") and op["path"].startswith(base) and op["path"].count("/") == 3
        for op in ops
    ):
        return []
    return [{"op": "test", "path": f"/spec/{key}", "value": (obj.get("spec") or {}).get(key) or []}]


def owned_name(name: Any) -> bool:
    """Whether a rule or route name is one the operator gives its own rules (any owner)."""
    return isinstance(name, str) and name.startswith(PREFIX)
