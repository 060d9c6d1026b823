"""A real data plane for the harness: Debian's nginx, configured from an HTTPRoute or a VirtualService.

On a real cluster a gateway or mesh splits traffic by the weights the operator writes. Here
:class:`Gateway` plays that part with a real proxy: it watches one route object on the API server
(an HTTPRoute, or an Istio VirtualService with ``kind="VirtualService"``), renders an nginx
configuration from it (:func:`render_nginx`, a pure function of the route object and
:class:`NginxSettings`, through :func:`plan_route`), and reloads nginx (SIGHUP to its master) on
every change. nginx runs as a plain child process (``daemon off``, one worker, a temporary prefix
directory), listening only on 127.0.0.1.

What the rendered configuration does:

- ``/__gateway_version`` answers with the resourceVersion of the route it was rendered from;
  every proxied response carries it in ``X-Gateway-Version`` and the backend name that served
  it in ``X-Gateway-Backend``.
- Rules are tried in order (an HTTPRoute's by Gateway API precedence: more header matches first;
  a VirtualService's ``http`` routes as listed): the first whose header conditions all hold (exact,
  prefix or regex; a cookie is matched as the ``cookie`` header) takes the request; a rule without
  conditions takes everything left; no rule: 404. Path matches are not looked at.
- Within a rule, requests go to its destinations by weight. Without a user key this is one
  upstream with ``weight=`` per backend (nginx's smooth weighted round robin, one worker): the
  proportions are exact, not sampled. With a user key (e.g. ``$http_x_user_id`` or
  ``$cookie_uid``) requests that carry one are split by ``split_clients`` on it, so one user
  always reaches the same backend; requests without one keep the exact round robin.
- A mirror (HTTPRoute ``RequestMirror`` with ``percent`` or ``fraction``; VirtualService ``mirror``
  with ``mirrorPercentage``) sends a copy of that share of the rule's requests, picked at random
  by ``$request_id``, to the mirror backend with nginx's ``mirror``; its answers are dropped.
- Response headers of a backend (HTTPRoute ``ResponseHeaderModifier``, VirtualService
  ``headers.response``) are added to the answers it serves through that rule: a ``Set-Cookie``
  there plus a cookie match rule per arm is sticky affinity, as on a real mesh.
- Weight 0 gets no request; a rule whose weights are all 0 (or no route at all) answers 503.
  A backend the test gave no model server for answers 500 for its share (a Gateway API
  gateway answers 500 for an unresolvable backend).
- A failed request is never retried on another backend (``proxy_next_upstream off``) and no
  backend is ever marked down (``max_fails=0``): the model server's own counters see exactly
  the split.

Backend names: an HTTPRoute's backendRef ``name``; a VirtualService destination's ``subset``, else
its ``host`` in short form (as the Istio router names them).

:attr:`Gateway.changes` records, for each route change seen, the watch event time, the reload
time and the time nginx first served the new version; :meth:`Gateway.wait_version` waits for a
given resourceVersion to be served.
"""

from __future__ import annotations

import contextlib
import http.client
import math
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tests.harness.cluster import MissingComponent
from tests.harness.loadgen import GATEWAY_GROUP, GATEWAY_VERSION, HTTPROUTE_PLURAL, parse_weights
from tests.harness.procs import LOOPBACK, free_port, spawn, stop_proc, tail

ISTIO_GROUP, ISTIO_VERSION, ISTIO_PLURAL = "networking.istio.io", "v1", "virtualservices"

VERSION_PATH = "/__gateway_version"
BACKEND_HEADER = "X-Gateway-Backend"
VERSION_HEADER = "X-Gateway-Version"
NO_ROUTE_VERSION = "none"
#: split_clients takes percentages with at most two decimals.
_SPLIT_SCALE = 10_000

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_VERSION = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_USER_KEY = re.compile(r"^\$(http|cookie|arg)_[A-Za-z0-9_]{1,64}$")


def find_nginx() -> Path:
    """The nginx binary (``MODEL_ROLLOUTS_NGINX``, PATH, or Debian's /usr/sbin/nginx)."""
    env = os.environ.get("MODEL_ROLLOUTS_NGINX")
    if env:
        if not Path(env).is_file():
            raise MissingComponent(f"MODEL_ROLLOUTS_NGINX={env} is not a file")
        return Path(env)
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if not found:
        raise MissingComponent(
            "nginx not found on PATH or in /usr/sbin: `apt-get install nginx` (Debian package)"
        )
    return Path(found)


def prepare_prefix(prefix: Path) -> None:
    """Create the directories a rendered configuration names under its prefix."""
    for sub in ("tmp/body", "tmp/proxy", "tmp/fastcgi", "tmp/uwsgi", "tmp/scgi", "logs"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)


# ---- pure: route -> plan -> nginx configuration -------------------------------------------------------

#: Kinds the gateway follows: kind -> (group, version, plural).
ROUTE_KINDS: dict[str, tuple[str, str, str]] = {
    "HTTPRoute": (GATEWAY_GROUP, GATEWAY_VERSION, HTTPROUTE_PLURAL),
    "VirtualService": (ISTIO_GROUP, ISTIO_VERSION, ISTIO_PLURAL),
}
_HEADER_NAME = re.compile(r"^[A-Za-z0-9-]{1,64}$")
_MATCH_KINDS = ("exact", "prefix", "regex")


@dataclass(frozen=True)
class Condition:
    """A request header (lower-case name) must equal / start with / fully match ``value``."""

    header: str
    kind: str
    value: str

    def pattern(self) -> str:
        """The PCRE nginx matches the header's value against."""
        if self.kind == "exact":
            return f"^{re.escape(self.value)}$"
        if self.kind == "prefix":
            return f"^{re.escape(self.value)}"
        return f"^(?:{self.value})$"


@dataclass(frozen=True)
class RulePlan:
    """One rule (HTTPRoute ``spec.rules[i]``, VirtualService ``spec.http[i]``) as the proxy runs it."""

    #: backend name -> weight, every destination of the rule (weight 0 included), in route order.
    weights: dict[str, int]
    #: (backend, percent of this rule's requests copied to it); its answers never reach the client.
    mirror: tuple[str, float] | None = None
    #: backend -> ((header, value), ...) added to the responses it serves through this rule.
    response_headers: dict[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    name: str = ""

    @property
    def active(self) -> dict[str, int]:
        return {name: w for name, w in self.weights.items() if w > 0}


@dataclass(frozen=True)
class RoutePlan:
    """What the data plane must do, read from a route object (``version``: its resourceVersion)."""

    version: str
    #: backend name -> weight of the rule the operator weights (``rule_index``), in route order.
    weights: dict[str, int]
    rules: tuple[RulePlan, ...] = ()
    #: (conditions, rule index) in evaluation order; the first whose conditions all hold wins.
    #: An entry without conditions matches every request (nothing after it is reachable).
    matches: tuple[tuple[tuple[Condition, ...], int], ...] = ()

    @property
    def active(self) -> dict[str, int]:
        return {name: w for name, w in self.weights.items() if w > 0}

    @property
    def default_rule(self) -> int | None:
        """The rule a request that meets no header condition goes to (None: 404)."""
        for conditions, rule in self.matches:
            if not conditions:
                return rule
        return None

    @property
    def conditional(self) -> tuple[tuple[tuple[Condition, ...], int], ...]:
        """The entries with conditions that come before the default one."""
        out = []
        for conditions, rule in self.matches:
            if not conditions:
                break
            out.append((conditions, rule))
        return tuple(out)

    @property
    def backends(self) -> list[str]:
        """Every backend a rule names (weighted or mirrored), in order of first appearance."""
        seen: dict[str, None] = {}
        for rule in self.rules:
            seen.update(dict.fromkeys(rule.weights))
            if rule.mirror is not None:
                seen[rule.mirror[0]] = None
        return list(seen)


def _condition(header: Any, kind: str, value: Any, where: str) -> Condition:
    if not isinstance(header, str) or not _HEADER_NAME.match(header):
        raise ValueError(f"{where}: header name {header!r} is not a plain header name")
    if kind not in _MATCH_KINDS or not isinstance(value, str) or "\n" in value or len(value) > 512:
        raise ValueError(f"{where}: header {header} needs an exact, prefix or regex string value")
    if kind == "regex":
        try:
            re.compile(value)
        except re.error as e:
            raise ValueError(f"{where}: header {header} regex {value!r}: {e}") from e
    return Condition(header.lower(), kind, value)


def _response_headers(pairs: list[tuple[Any, Any]], where: str) -> tuple[tuple[str, str], ...]:
    out = []
    for name, value in pairs:
        if not isinstance(name, str) or not _HEADER_NAME.match(name):
            raise ValueError(f"{where}: response header name {name!r} is not a plain header name")
        if not isinstance(value, str) or any(c in value for c in '"\\$\n\r') or len(value) > 512:
            raise ValueError(f"{where}: response header {name} value {value!r} is not a plain string")
        out.append((name, value))
    return tuple(out)


def _gateway_header_filters(filters: Any, where: str) -> list[tuple[Any, Any]]:
    pairs: list[tuple[Any, Any]] = []
    for f in filters or []:
        if isinstance(f, Mapping) and f.get("type") == "ResponseHeaderModifier":
            mod = f.get("responseHeaderModifier") or {}
            for op in ("set", "add"):
                pairs += [(h.get("name"), h.get("value")) for h in mod.get(op) or []]
    return pairs


def _percent(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 100:
        raise ValueError(f"{where}: mirror percentage must be a number in [0, 100], got {value!r}")
    return float(value)


def _plan_httproute(
    route: Mapping[str, Any],
) -> tuple[list[RulePlan], list[tuple[tuple[Condition, ...], int]]]:
    rules = (route.get("spec") or {}).get("rules") or []
    plans: list[RulePlan] = []
    entries: list[tuple[tuple[Condition, ...], int]] = []
    for i, rule in enumerate(rules):
        where = f"spec.rules[{i}]"
        weights = parse_weights(route, i)
        rule_headers = _gateway_header_filters(rule.get("filters"), where)
        headers = {}
        for j, ref in enumerate(rule.get("backendRefs") or []):
            pairs = rule_headers + _gateway_header_filters(ref.get("filters"), f"{where}.backendRefs[{j}]")
            if pairs:
                headers[ref["name"]] = _response_headers(pairs, f"{where}.backendRefs[{j}]")
        if rule_headers:
            for name in weights:
                headers.setdefault(name, _response_headers(rule_headers, where))
        mirror = None
        for f in rule.get("filters") or []:
            if isinstance(f, Mapping) and f.get("type") == "RequestMirror":
                m = f.get("requestMirror") or {}
                name = (m.get("backendRef") or {}).get("name")
                if not isinstance(name, str) or not _NAME.match(name):
                    raise ValueError(f"{where}: RequestMirror backendRef name {name!r}")
                pct = 100.0
                if "percent" in m:
                    pct = _percent(m["percent"], where)
                elif "fraction" in m:
                    frac = m["fraction"] or {}
                    pct = _percent(100.0 * frac.get("numerator", 0) / (frac.get("denominator") or 100), where)
                mirror = (name, pct)
        plans.append(RulePlan(weights, mirror, headers, str(rule.get("name") or "")))
        for k, match in enumerate(rule.get("matches") or [{}]):
            conds = tuple(
                _condition(
                    h.get("name"),
                    "regex" if h.get("type") == "RegularExpression" else "exact",
                    h.get("value"),
                    f"{where}.matches[{k}]",
                )
                for h in match.get("headers") or []
            )
            entries.append((conds, i))
    # Gateway API precedence: more header matches first; otherwise rule order.
    entries.sort(key=lambda e: -len(e[0]))
    return plans, entries


def _plan_virtualservice(
    vs: Mapping[str, Any],
) -> tuple[list[RulePlan], list[tuple[tuple[Condition, ...], int]]]:
    from model_rollouts.traffic.istio import destination_name, route_weights

    namespace = str((vs.get("metadata") or {}).get("namespace") or "")
    routes = (vs.get("spec") or {}).get("http") or []
    plans: list[RulePlan] = []
    entries: list[tuple[tuple[Condition, ...], int]] = []
    for i, entry in enumerate(routes):
        where = f"spec.http[{i}]"
        weights = route_weights(entry, namespace)
        if any(w < 0 for w in weights.values()):
            raise ValueError(f"{where}: a destination weight is negative")
        resp = (entry.get("headers") or {}).get("response") or {}
        rule_pairs = [p for op in ("set", "add") for p in (resp.get(op) or {}).items()]
        headers = {}
        for j, d in enumerate(entry.get("route") or []):
            dresp = (d.get("headers") or {}).get("response") or {}
            pairs = rule_pairs + [p for op in ("set", "add") for p in (dresp.get(op) or {}).items()]
            if pairs:
                name = destination_name(d.get("destination") or {}, namespace)
                headers[name] = _response_headers(pairs, f"{where}.route[{j}]")
        mirror = None
        if entry.get("mirror"):
            pct = _percent((entry.get("mirrorPercentage") or {}).get("value", 100.0), where)
            mirror = (destination_name(entry["mirror"], namespace), pct)
        plans.append(RulePlan(weights, mirror, headers, str(entry.get("name") or "")))
        for k, match in enumerate(entry.get("match") or [{}]):
            conds = []
            for header, spec in (match.get("headers") or {}).items():
                kinds = [k2 for k2 in _MATCH_KINDS if k2 in (spec or {})]
                if len(kinds) != 1:
                    raise ValueError(f"{where}.match[{k}]: header {header} needs one of exact, prefix, regex")
                conds.append(_condition(header, kinds[0], spec[kinds[0]], f"{where}.match[{k}]"))
            entries.append((tuple(conds), i))
    return plans, entries


def plan_route(route: Mapping[str, Any] | None, rule_index: int | str = 0) -> RoutePlan:
    """The plan for ``route`` (an HTTPRoute or a VirtualService); None (no route) sends nothing anywhere.

    ``rule_index`` picks the rule whose weights :attr:`RoutePlan.weights` reports: an index, or for
    a VirtualService the name of an ``http`` route.
    """
    if route is None:
        return RoutePlan(NO_ROUTE_VERSION, {})
    meta = route.get("metadata") or {}
    version = str(meta.get("resourceVersion") or "0")
    if not _VERSION.match(version):
        raise ValueError(f"resourceVersion {version!r} is not a plain token")
    if route.get("kind") == "VirtualService":
        rules, entries = _plan_virtualservice(route)
    else:
        parse_weights(route, rule_index if isinstance(rule_index, int) else 0)  # the rule must exist
        rules, entries = _plan_httproute(route)
    if isinstance(rule_index, str):
        found = [i for i, r in enumerate(rules) if r.name == rule_index]
        if not found:
            raise ValueError(f"no rule named {rule_index!r}")
        rule_index = found[0]
    if not 0 <= rule_index < len(rules):
        raise ValueError(f"the route has {len(rules)} rule(s); rule_index {rule_index} is out of range")
    plan = RoutePlan(version, dict(rules[rule_index].weights), tuple(rules), tuple(entries))
    for name in plan.backends:
        if not _NAME.match(name):
            raise ValueError(f"backend name {name!r} is not a DNS name")
    return plan


@dataclass(frozen=True)
class NginxSettings:
    """Everything besides the route that the configuration depends on."""

    listen_port: int
    #: nginx's prefix directory (temp files, unix sockets of unresolved backends).
    prefix: Path
    #: backendRef (Service) name -> model server URL (http://127.0.0.1:PORT).
    backends: Mapping[str, str]
    #: nginx variable holding a user id (``$http_x_user_id``, ``$cookie_uid``); None: no stickiness.
    user_key: str | None = None
    access_log: bool = False

    def address(self, name: str) -> str:
        """``host:port`` of a backend's server, or a unix socket answering 500 when it has none."""
        url = self.backends.get(name)
        if url is None:
            return f"unix:{self.prefix / f'unresolved-{name}.sock'}"
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/"):
            raise ValueError(f"backend {name!r}: URL must be http://host:port, got {url!r}")
        return f"{parts.hostname}:{parts.port or 80}"


def _reduced(weights: Mapping[str, int]) -> dict[str, int]:
    g = 0
    for w in weights.values():
        g = math.gcd(g, w)
    return {name: w // g for name, w in weights.items()} if g else dict(weights)


def split_percentages(weights: Mapping[str, int]) -> list[tuple[str, str]]:
    """``split_clients`` entries (name, "P%" or "*") for positive weights; the last takes the rest.

    Percentages are floored to 0.01 %, so a share is off by less than 0.01 point.
    """
    active = [(n, w) for n, w in weights.items() if w > 0]
    total = sum(w for _, w in active)
    out: list[tuple[str, str]] = []
    for i, (name, w) in enumerate(active):
        if i == len(active) - 1:
            out.append((name, "*"))
            break
        units = w * _SPLIT_SCALE // total
        if units:
            out.append((name, f"{units // 100}.{units % 100:02d}%"))
    return out


def _upstream_id(index: int) -> str:
    return f"gw_backend_{index}"


def _quote(text: str) -> str:
    """``text`` as an nginx double-quoted string (nginx unescapes \\\\ and \\")."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _header_var(header: str) -> str:
    return "$http_" + header.lower().replace("-", "_")


def _is_simple(plan: RoutePlan) -> bool:
    """One catch-all rule, no mirror, no response headers: the plain weighted configuration."""
    return (
        not plan.conditional
        and all(r.mirror is None and not r.response_headers for r in plan.rules)
        and plan.default_rule is not None
    )


def _percent_entry(pct: float) -> str | None:
    """A ``split_clients`` share for ``pct`` percent (floored to 0.01), ``*`` for all, None for none."""
    units = int(pct * 100 + 1e-9)
    if units <= 0:
        return None
    if units >= _SPLIT_SCALE:
        return "*"
    return f"{units // 100}.{units % 100:02d}%"


def _target(plan: RoutePlan, rule: int | None, settings: NginxSettings) -> str:
    """The upstream (or variable naming one) that serves a rule's requests."""
    if rule is None:
        return "gw_nomatch"
    if not plan.rules[rule].active:
        return "gw_empty"
    if rule == plan.default_rule:
        return "$gw_target" if settings.user_key is not None else "gw_weighted"
    return f"gw_rule_{rule}"


def _match_blocks(plan: RoutePlan, settings: NginxSettings, addresses: Mapping[str, str]) -> list[str]:
    """Header matches -> ``$gw_rule`` (the rule index) -> ``$gw_route`` (its upstream)."""
    lines = [
        "",
        "    # Header and cookie matches, in evaluation order: the first whose conditions hold wins.",
    ]
    selector = "x"
    for e, (conds, _) in enumerate(plan.conditional):
        for j, c in enumerate(conds):
            lines += [
                f"    map {_header_var(c.header)} $gw_c{e}_{j} {{",
                f"        {_quote('~' + c.pattern())} 1;",
                "        default 0;",
                "    }",
            ]
        joined = "".join(f"$gw_c{e}_{j}" for j in range(len(conds)))
        lines += [
            f'    map "{joined}" $gw_m{e} {{',
            f'        "{"1" * len(conds)}" 1;',
            "        default 0;",
            "    }",
        ]
        selector += f"$gw_m{e}"
    default = plan.default_rule
    lines += [f'    map "{selector}" $gw_rule {{']
    lines += [f'        "~^x{"0" * e}1" {rule};' for e, (_, rule) in enumerate(plan.conditional)]
    lines += [f"        default {'none' if default is None else default};", "    }"]
    lines += ["    map $gw_rule $gw_route {", f"        default {_target(plan, default, settings)};"]
    for rule in sorted({r for _, r in plan.conditional} - {default}):
        lines.append(f'        "{rule}" {_target(plan, rule, settings)};')
    lines.append("    }")
    for rule in sorted({r for _, r in plan.conditional} - {default}):
        active = _reduced(plan.rules[rule].active)
        if active:
            lines.append(f"    upstream gw_rule_{rule} {{")
            lines += [f"        server {addresses[n]} weight={w} max_fails=0;" for n, w in active.items()]
            lines += ["        keepalive 8;", "    }"]
    return lines


def _mirror_blocks(plan: RoutePlan, addresses: Mapping[str, str]) -> list[str]:
    """Per rule with a mirror: a random ``pct`` % of its requests (by $request_id) -> ``$gw_mirror_to``."""
    lines = ["", "    # Mirrors: a copy of a share of a rule's requests; the answers are dropped."]
    chosen = []
    for r, rule in enumerate(plan.rules):
        entry = _percent_entry(rule.mirror[1]) if rule.mirror is not None else None
        if rule.mirror is None or entry is None:
            continue
        chosen.append(r)
        lines += [
            f"    upstream gw_mirror_{r} {{",
            f"        server {addresses[rule.mirror[0]]} max_fails=0;",
            "        keepalive 8;",
            "    }",
            f'    split_clients "$request_id" $gw_mroll_{r} {{',
            f"        {entry} gw_mirror_{r};",
        ]
        if entry != "*":
            lines.append('        * "";')
        lines.append("    }")
    lines += ["    map $gw_rule $gw_mirror_to {", '        default "";']
    lines += [f'        "{r}" $gw_mroll_{r};' for r in chosen]
    lines.append("    }")
    return lines


def _response_header_blocks(plan: RoutePlan, addresses: Mapping[str, str]) -> tuple[list[str], list[str]]:
    """(http-level maps, location-level add_header lines) for the rules' response headers."""
    values: dict[str, dict[str, str]] = {}
    for r, rule in enumerate(plan.rules):
        for backend, pairs in rule.response_headers.items():
            for name, value in pairs:
                values.setdefault(name.lower(), {})[f"{r}|{addresses[backend]}"] = value
    lines: list[str] = []
    adds: list[str] = []
    for k, (name, by_key) in enumerate(sorted(values.items())):
        lines += ["", f'    map "$gw_rule|$upstream_addr" $gw_rh{k} {{', '        default "";']
        lines += [f"        {_quote(key)} {_quote(v)};" for key, v in by_key.items()]
        lines.append("    }")
        adds.append(f"            add_header {name} $gw_rh{k} always;")
    return lines, adds


def render_nginx(route: Mapping[str, Any] | None, settings: NginxSettings, rule_index: int | str = 0) -> str:
    """nginx.conf text for ``route`` (an HTTPRoute or VirtualService as a dict, or None when absent).

    One catch-all rule without mirror or response headers renders the plain weighted
    configuration; anything more adds the match, mirror and response-header blocks.
    """
    plan = plan_route(route, rule_index)
    if settings.user_key is not None and not _USER_KEY.match(settings.user_key):
        raise ValueError(f"user_key {settings.user_key!r} must be an nginx $http_/$cookie_/$arg_ variable")
    prefix = settings.prefix
    names = plan.backends
    addresses = {name: settings.address(name) for name in names}
    seen: dict[str, str] = {}
    for name, addr in addresses.items():
        if addr in seen:
            raise ValueError(f"backends {seen[addr]!r} and {name!r} share the address {addr}")
        seen[addr] = name
    default = plan.default_rule
    active = _reduced(plan.rules[default].active) if default is not None else {}
    simple = _is_simple(plan) or not plan.rules
    v = plan.version

    lines = [
        "# Rendered by tests/harness/gateway.py; do not edit.",
        f"# {(route or {}).get('kind') or 'HTTPRoute'} resourceVersion {v}",
        "worker_processes 1;",
        "events { worker_connections 1024; }",
        "http {",
        f"    access_log {prefix / 'access.log' if settings.access_log else 'off'};",
        f"    client_body_temp_path {prefix / 'tmp' / 'body'};",
        f"    proxy_temp_path {prefix / 'tmp' / 'proxy'};",
        f"    fastcgi_temp_path {prefix / 'tmp' / 'fastcgi'};",
        f"    uwsgi_temp_path {prefix / 'tmp' / 'uwsgi'};",
        f"    scgi_temp_path {prefix / 'tmp' / 'scgi'};",
        "    server_tokens off;",
        "    keepalive_requests 100000;",
        "    map_hash_bucket_size 256;",
        "",
        "    # Which backend served a response (by the upstream address nginx used).",
        "    map $upstream_addr $gw_backend {",
        '        default "";',
    ]
    lines += [f'        "{addr}" "{name}";' for name, addr in addresses.items()]
    lines.append("    }")
    lines += _weighted_blocks(active, names, addresses, settings)
    mirrors = any(r.mirror is not None and _percent_entry(r.mirror[1]) for r in plan.rules)
    adds: list[str] = []
    if not simple:
        lines += _match_blocks(plan, settings, addresses)
        if mirrors:
            lines += _mirror_blocks(plan, addresses)
        header_maps, adds = _response_header_blocks(plan, addresses)
        lines += header_maps

    lines += [
        "",
        "    server {",
        f"        listen {LOOPBACK}:{settings.listen_port};",
        f"        location = {VERSION_PATH} {{",
        "            default_type text/plain;",
        f'            return 200 "{v}";',
        "        }",
        "        location / {",
    ]
    proxy = [
        "            proxy_http_version 1.1;",
        '            proxy_set_header Connection "";',
        "            proxy_next_upstream off;",
    ]
    if not simple:
        lines += ["            mirror /__gw_mirror;"] if mirrors else []
        lines += ["            proxy_pass http://$gw_route;", *proxy]
        lines += [
            f"            add_header {BACKEND_HEADER} $gw_backend always;",
            f'            add_header {VERSION_HEADER} "{v}" always;',
            *adds,
        ]
    elif active:
        target = "$gw_target" if settings.user_key is not None else "gw_weighted"
        lines += [
            f"            proxy_pass http://{target};",
            *proxy,
            f"            add_header {BACKEND_HEADER} $gw_backend always;",
            f'            add_header {VERSION_HEADER} "{v}" always;',
        ]
    else:
        lines += [
            f'            add_header {VERSION_HEADER} "{v}" always;',
            "            default_type text/plain;",
            '            return 503 "no backend has a positive weight\\n";',
        ]
    lines.append("        }")
    if mirrors and not simple:
        lines += [
            "        location = /__gw_mirror {",
            "            internal;",
            '            if ($gw_mirror_to = "") {',
            "                return 204;",
            "            }",
            "            proxy_pass http://$gw_mirror_to$request_uri;",
            *proxy,
            "        }",
        ]
    lines.append("    }")
    for name in names:
        if name not in settings.backends:
            lines += _answer_server(addresses[name], 500, f"backend {name} has no server")
    if not simple:
        for upstream, status, text in (
            ("gw_empty", 503, "no backend has a positive weight"),
            ("gw_nomatch", 404, "no rule matches"),
        ):
            sock = f"unix:{prefix / f'{upstream}.sock'}"
            lines += [f"    upstream {upstream} {{", f"        server {sock} max_fails=0;", "    }"]
            lines += _answer_server(sock, status, text)
    lines += ["}", ""]
    return "\n".join(lines)


def _answer_server(address: str, status: int, text: str) -> list[str]:
    return [
        "    server {",
        f"        listen {address};",
        "        default_type text/plain;",
        f'        return {status} "{text}\\n";',
        "    }",
    ]


def _weighted_blocks(
    active: Mapping[str, int], names: list[str], addresses: Mapping[str, str], settings: NginxSettings
) -> list[str]:
    """The default rule's exact weighted round robin, and the sticky split by user key if set."""
    lines: list[str] = []
    if active:
        lines += [
            "",
            "    # Exact weighted round robin (one worker): the route's weights, reduced.",
            "    upstream gw_weighted {",
        ]
        lines += [f"        server {addresses[n]} weight={w} max_fails=0;" for n, w in active.items()]
        lines += ["        keepalive 32;", "    }"]
    if active and settings.user_key is not None:
        index = {name: i for i, name in enumerate(names)}
        for name in active:
            lines += [
                f"    upstream {_upstream_id(index[name])} {{",
                f"        server {addresses[name]} max_fails=0;",
                "        keepalive 8;",
                "    }",
            ]
        lines += ["", f'    split_clients "{settings.user_key}" $gw_sticky {{']
        lines += [f"        {pct} {_upstream_id(index[n])};" for n, pct in split_percentages(active)]
        lines += [
            "    }",
            f"    map {settings.user_key} $gw_target {{",
            "        default $gw_sticky;",
            '        "" gw_weighted;',
            "    }",
        ]
    return lines


# ---- the process and the watch ---------------------------------------------------------------------


@dataclass
class Change:
    """One route version seen by the gateway (times are ``time.monotonic()``)."""

    version: str
    weights: dict[str, int]
    event_at: float
    reloaded_at: float | None = None
    #: nginx first answered with this version (a new worker serves it).
    serving_at: float | None = None
    #: Every worker of the previous configuration has exited: nothing serves an older version.
    settled_at: float | None = None
    error: str = ""

    @property
    def event_to_serving_s(self) -> float | None:
        return None if self.serving_at is None else self.serving_at - self.event_at

    @property
    def event_to_settled_s(self) -> float | None:
        return None if self.settled_at is None else self.settled_at - self.event_at


@dataclass
class Gateway:
    """nginx in front of the model servers, following one route object. Use as a context manager.

    ``httproute`` names the object followed, of ``kind`` HTTPRoute (default) or VirtualService;
    ``rule_index`` picks the rule whose weights :attr:`changes` report (for a VirtualService an
    index or the name of an ``http`` route).
    """

    api: Any
    namespace: str
    httproute: str
    backends: Mapping[str, str]
    user_key: str | None = None
    rule_index: int | str = 0
    workdir: Path | None = None
    serve_timeout: float = 10.0
    access_log: bool = False
    port: int = 0
    kind: str = "HTTPRoute"
    changes: list[Change] = field(default_factory=list)
    _proc: subprocess.Popen[bytes] | None = None
    _thread: threading.Thread | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _version: str = ""
    _last_error: str = ""
    _own_workdir: bool = False

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def conf(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "nginx.conf"

    @property
    def log(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "error.log"

    def start(self) -> Gateway:
        nginx = find_nginx()
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="mr-gateway-"))
            self._own_workdir = True
        prepare_prefix(self.workdir)
        self.port = self.port or free_port()
        route = self._read_route()
        self._write(route)
        argv = [
            str(nginx),
            "-p",
            str(self.workdir),
            "-c",
            str(self.conf),
            "-e",
            str(self.log),
            "-g",
            f"daemon off; pid {self.workdir / 'nginx.pid'}; error_log {self.log} notice;"
            # As root nginx would run its worker as nobody, which cannot read the private prefix.
            + (" user root;" if os.geteuid() == 0 else ""),
        ]
        try:
            self._proc = spawn(argv, self.workdir / "nginx.out")
            version = plan_route(route, self.rule_index).version
            now = time.monotonic()
            change = Change(version, self._weights(route), now, reloaded_at=now)
            self._await_serving(change)
            change.settled_at = change.serving_at
            if change.serving_at is None:
                raise RuntimeError(f"nginx did not serve its first configuration: {change.error}")
            self.changes.append(change)
            self._version = version
            self._thread = threading.Thread(target=self._watch_loop, name="gateway-watch", daemon=True)
            self._thread.start()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(3.0)
        stop_proc(self._proc, grace=5.0)
        self._proc = None
        if self._own_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Gateway:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- observation --
    def served_version(self, timeout: float = 1.0) -> str:
        """What nginx answers on /__gateway_version now (a new connection each time)."""
        conn = http.client.HTTPConnection(LOOPBACK, self.port, timeout=timeout)
        try:
            conn.request("GET", VERSION_PATH)
            resp = conn.getresponse()
            body = resp.read().decode(errors="replace")
            if resp.status != 200:
                raise RuntimeError(f"{VERSION_PATH} answered {resp.status}")
            return body.strip()
        finally:
            conn.close()

    def wait_version(self, version: str, timeout: float = 15.0) -> Change:
        """Wait until nginx serves only route ``version`` (or a later one); its :class:`Change`.

        Only: the workers of the previous configuration have exited too, so no request sent
        after this returns can be routed by older weights.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for change in self.changes:
                    if change.settled_at is not None and _rv_at_least(change.version, version):
                        return change
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"nginx did not serve {self.kind} version {version} in {timeout:.0f}s; "
                        f"serving {self._version!r}; last error {self._last_error!r}\n{tail(self.log)}"
                    )
                self._cond.wait(min(left, 0.2))

    # -- internals --
    @property
    def _gvp(self) -> tuple[str, str, str]:
        if self.kind not in ROUTE_KINDS:
            raise ValueError(f"kind must be one of {', '.join(ROUTE_KINDS)}, got {self.kind!r}")
        return ROUTE_KINDS[self.kind]

    def _custom(self) -> Any:
        from kubernetes import client

        return client.CustomObjectsApi(self.api)

    def _read_route(self) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            obj: dict[str, Any] = self._custom().get_namespaced_custom_object(
                *self._gvp[:2], self.namespace, self._gvp[2], self.httproute
            )
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        return obj

    def _weights(self, route: Mapping[str, Any] | None) -> dict[str, int]:
        return plan_route(route, self.rule_index).weights if route is not None else {}

    def _settings(self) -> NginxSettings:
        assert self.workdir is not None
        return NginxSettings(
            listen_port=self.port,
            prefix=self.workdir,
            backends=dict(self.backends),
            user_key=self.user_key,
            access_log=self.access_log,
        )

    def _write(self, route: Mapping[str, Any] | None) -> None:
        text = render_nginx(route, self._settings(), self.rule_index)
        tmp = self.conf.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.conf)

    def _await_serving(self, change: Change) -> None:
        deadline = time.monotonic() + self.serve_timeout
        while time.monotonic() < deadline and not self._stop.is_set():
            if self._proc is not None and self._proc.poll() is not None:
                change.error = f"nginx exited with {self._proc.returncode}: {tail(self.log)}"
                return
            try:
                if self.served_version(timeout=0.5) == change.version:
                    change.serving_at = time.monotonic()
                    return
            except (OSError, http.client.HTTPException, RuntimeError):
                pass
            time.sleep(0.005)
        change.error = (
            f"version {change.version} not served within {self.serve_timeout:.0f}s: {tail(self.log, 5)}"
        )

    def _await_exit(self, old_workers: set[int], change: Change) -> None:
        """Wait until the previous configuration's workers are gone (they finish in-flight requests)."""
        assert self._proc is not None
        deadline = time.monotonic() + self.serve_timeout
        while time.monotonic() < deadline and not self._stop.is_set():
            if not old_workers & _children(self._proc.pid):
                change.settled_at = time.monotonic()
                return
            time.sleep(0.005)
        change.error = (
            f"old nginx workers {sorted(old_workers)} still running after {self.serve_timeout:.0f}s"
        )

    def _apply(self, route: Mapping[str, Any] | None, event_at: float) -> None:
        version = plan_route(route, self.rule_index).version if route is not None else NO_ROUTE_VERSION
        if version == self._version:
            return
        change = Change(version, {}, event_at)
        try:
            change.weights = self._weights(route)
            self._write(route)
            assert self._proc is not None
            old_workers = _children(self._proc.pid)
            self._proc.send_signal(signal.SIGHUP)
            change.reloaded_at = time.monotonic()
            self._await_serving(change)
            if change.serving_at is not None:
                self._await_exit(old_workers, change)
        except Exception as exc:  # a bad route: keep serving the last good config, say why
            change.error = f"{type(exc).__name__}: {exc}"[:500]
        with self._cond:
            self.changes.append(change)
            if change.settled_at is not None:
                self._version = version
            else:
                self._last_error = change.error
            self._cond.notify_all()

    def _watch_loop(self) -> None:
        from kubernetes import watch

        resource_version = ""
        while not self._stop.is_set():
            try:
                if not resource_version:  # (re-)list: pick up what happened while not watching
                    # The route and the version to watch from come from one LIST: a GET and then a
                    # LIST would miss a write that lands between them (watched from after it).
                    route, resource_version = self._list()
                    self._apply(route, time.monotonic())
                w = watch.Watch()
                for event in w.stream(
                    self._custom().list_namespaced_custom_object,
                    *self._gvp[:2],
                    self.namespace,
                    self._gvp[2],
                    field_selector=f"metadata.name={self.httproute}",
                    resource_version=resource_version,
                    timeout_seconds=2,
                    _request_timeout=5,
                ):
                    at = time.monotonic()
                    if self._stop.is_set():
                        w.stop()
                        break
                    kind, obj = event.get("type"), event.get("object")
                    if kind == "ERROR" or not isinstance(obj, dict):
                        resource_version = ""  # 410 Gone and friends: list again
                        w.stop()
                        break
                    resource_version = str(obj.get("metadata", {}).get("resourceVersion") or resource_version)
                    if kind == "BOOKMARK":
                        continue
                    self._apply(None if kind == "DELETED" else obj, at)
            except Exception as exc:  # the API server went away for a moment: list again
                self._last_error = f"watch: {type(exc).__name__}: {exc}"[:300]
                resource_version = ""
                self._stop.wait(0.2)

    def _list(self) -> tuple[dict[str, Any] | None, str]:
        """The route (None: absent) and the list's resourceVersion, read in one request."""
        lst = self._custom().list_namespaced_custom_object(
            *self._gvp[:2],
            self.namespace,
            self._gvp[2],
            field_selector=f"metadata.name={self.httproute}",
        )
        items = lst.get("items") or []
        route = items[0] if items else None
        if route is not None:  # list items carry no kind; the plan tells the kinds apart by it
            route.setdefault("kind", self.kind)
        return route, str(lst.get("metadata", {}).get("resourceVersion") or "")


def _children(pid: int) -> set[int]:
    """PIDs of ``pid``'s child processes (nginx's workers)."""
    try:
        return {int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    except OSError:
        pass
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # The command name may hold spaces and parentheses; the ppid follows the last ')'.
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.add(int(stat.parent.name))
    return out


def _rv_at_least(have: str, want: str) -> bool:
    """resourceVersions are opaque; etcd's are integers, compared as such when both are."""
    if have == want:
        return True
    if have.isdigit() and want.isdigit():
        return int(have) >= int(want)
    return False


# ---- command line ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run a gateway by hand: ``--kubeconfig K --namespace ml --httproute model --backend SVC=URL``."""
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m tests.harness.gateway", description="nginx following an HTTPRoute or VirtualService"
    )
    p.add_argument("--kind", choices=sorted(ROUTE_KINDS), default="HTTPRoute")
    p.add_argument("--kubeconfig", required=True)
    p.add_argument("--namespace", required=True)
    p.add_argument("--httproute", required=True, help="name of the route object (of --kind) to follow")
    p.add_argument("--backend", action="append", required=True, metavar="SERVICE=URL", help="repeatable")
    p.add_argument("--user-key", default=None, help="nginx variable with a user id, e.g. '$http_x_user_id'")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--max-seconds", type=float, default=3600.0)
    args = p.parse_args(argv)
    backends = {}
    for pair in args.backend:
        name, sep, url = pair.partition("=")
        if not sep or not name or not url:
            p.error(f"--backend must look like SERVICE=URL, got {pair!r}")
        backends[name] = url

    from kubernetes import config

    api = config.new_client_from_config(config_file=args.kubeconfig)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with Gateway(
        api, args.namespace, args.httproute, backends, user_key=args.user_key, port=args.port, kind=args.kind
    ) as gw:
        print(f"listening {gw.url} (nginx prefix {gw.workdir})", flush=True)
        shown = 0
        deadline = time.monotonic() + args.max_seconds
        while not stop.wait(0.2) and time.monotonic() < deadline:
            for change in gw.changes[shown:]:
                took = change.event_to_settled_s
                print(
                    f"version {change.version} weights {change.weights} "
                    + (
                        f"served {took * 1000:.0f} ms after the event"
                        if took is not None
                        else f"NOT served: {change.error}"
                    ),
                    flush=True,
                )
            shown = len(gw.changes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
