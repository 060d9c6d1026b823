"""The metric-provider interface, and the query template every provider shares.

A measurement has exactly one of four outcomes; none of them crashes the caller and only
``value`` can ever pass a check: ``value`` (a finite number), ``noData`` (the query matched
no series), ``nan`` (the series exists but is NaN or infinite, e.g. 0/0 with no traffic) and
``error`` (the provider could not be asked: timeout, connection refused, bad query).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Literal, Protocol

Outcome = Literal["value", "noData", "nan", "error"]

PLACEHOLDERS = ("variant", "service", "namespace", "deployment", "window")
# Exactly ``{{ name }}`` (spaces optional) with a plain identifier, or ``{{ args.name }}`` inside a
# metric template. Anything else with double braces, or a bare ``{name}``, is refused: no filters,
# attributes or format fields are ever interpreted.
_PLACEHOLDER = re.compile(r"\{\{\s*((?:args\.)?[A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_BARE_FIELD = re.compile(r"\{\s*[A-Za-z_][A-Za-z0-9_.]*\s*\}")
# Values substituted into PromQL: Kubernetes names and Go durations only, so no quote,
# brace or operator can be injected through them.
_SAFE_VALUE = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$|^[0-9]+(ms|s|m|h)$")
#: Longest snippet of anything from outside that a message may carry.
SNIPPET_MAX = 64


@dataclass(frozen=True)
class Result:
    outcome: Outcome
    value: float | None = None
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome == "value"


class TemplateError(ValueError):
    """A query template names an unknown placeholder, has a malformed one, or is given an unsafe value."""


def _allowed(name: str, extra: tuple[str, ...]) -> bool:
    return name in PLACEHOLDERS or name in extra


def check_template(template: str, extra: tuple[str, ...] = ()) -> None:
    """Raise TemplateError unless every ``{{``/``}}`` in the template is exactly a known placeholder.

    ``extra`` adds names (``args.x`` for a metric template's declared args). ``{{ service|upper }}``,
    ``{{ service.__class__ }}``, ``{{service}``, ``{service}`` and stray ``{{``/``}}`` are refused.
    """
    for m in _PLACEHOLDER.finditer(template):
        if not _allowed(m.group(1), extra):
            names = ", ".join((*PLACEHOLDERS, *extra))
            raise TemplateError(f"unknown placeholder {{{{ {m.group(1)} }}}}; allowed: {names}")
    rest = _PLACEHOLDER.sub("x", template)
    if "{{" in rest or "}}" in rest:
        raise TemplateError(
            "a {{ or }} that is not exactly a placeholder such as {{ service }} "
            "(no filters, attributes or spaces inside names)"
        )
    bare = _BARE_FIELD.search(rest)
    if bare:
        raise TemplateError(
            f"{redact(bare.group(0))} looks like a placeholder; write {{{{ name }}}} with double braces"
        )


def render(template: str, values: dict[str, str], extra: tuple[str, ...] = ()) -> str:
    """Fill ``{{ name }}`` placeholders; malformed templates, unknown names and unsafe values are refused."""
    check_template(template, extra)

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        value = values.get(name)
        if value is None:
            raise TemplateError(f"placeholder {{{{ {name} }}}} has no value here")
        if not _SAFE_VALUE.match(value):
            raise TemplateError(f"unsafe value {redact(value)} for {{{{ {name} }}}}")
        return value

    return _PLACEHOLDER.sub(sub, template)


def redact(text: str, limit: int = SNIPPET_MAX) -> str:
    """A length-limited, printable-only quote of ``text`` for a message (never a header or body)."""
    clean = "".join(c if c.isprintable() and c not in "\"'`" else "?" for c in text[:limit])
    return repr(clean + ("..." if len(text) > limit else ""))


class MetricProvider(Protocol):
    """One small interface; one file per implementation."""

    def query(self, promql: str) -> Result:
        """Evaluate an instant query that should return a single scalar-like value."""
        ...


class Budgeted:
    """One object's analysis: queries after ``seconds`` have passed fail at once, so a provider that
    answers slowly cannot keep one object's measurement (and its handler thread) for long."""

    def __init__(self, inner: MetricProvider, seconds: float) -> None:
        self.inner, self.seconds = inner, seconds
        self.deadline = time.monotonic() + seconds

    def query(self, promql: str) -> Result:
        if time.monotonic() >= self.deadline:
            return Result(
                "error", message=f"query skipped: this analysis used its {self.seconds:.0f}s budget"
            )
        return self.inner.query(promql)
