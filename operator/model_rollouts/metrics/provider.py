"""The metric-provider interface, and the query template every provider shares.

A measurement has exactly one of four outcomes; none of them crashes the caller and only
``value`` can ever pass a check: ``value`` (a finite number), ``noData`` (the query matched
no series), ``nan`` (the series exists but is NaN or infinite, e.g. 0/0 with no traffic) and
``error`` (the provider could not be asked: timeout, connection refused, bad query).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Protocol

Outcome = Literal["value", "noData", "nan", "error"]

PLACEHOLDERS = ("variant", "service", "namespace", "deployment", "window")
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_]+)\s*\}\}")
# Values substituted into PromQL: Kubernetes names and Go durations only, so no quote,
# brace or operator can be injected through them.
_SAFE_VALUE = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$|^[0-9]+(ms|s|m|h)$")


@dataclass(frozen=True)
class Result:
    outcome: Outcome
    value: float | None = None
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome == "value"


class TemplateError(ValueError):
    """A query template names an unknown placeholder or is given an unsafe value."""


def render(template: str, values: dict[str, str]) -> str:
    """Fill ``{{ name }}`` placeholders; unknown names and unsafe values are refused."""

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in PLACEHOLDERS:
            raise TemplateError(f"unknown placeholder {{{{ {name} }}}}; allowed: {', '.join(PLACEHOLDERS)}")
        value = values.get(name)
        if value is None:
            raise TemplateError(f"placeholder {{{{ {name} }}}} has no value here")
        if not _SAFE_VALUE.match(value):
            raise TemplateError(f"unsafe value {value!r} for {{{{ {name} }}}}")
        return value

    return _PLACEHOLDER.sub(sub, template)


def check_template(template: str) -> None:
    """Raise TemplateError if the template uses a placeholder outside the fixed set."""
    for m in _PLACEHOLDER.finditer(template):
        if m.group(1) not in PLACEHOLDERS:
            raise TemplateError(
                f"unknown placeholder {{{{ {m.group(1)} }}}}; allowed: {', '.join(PLACEHOLDERS)}"
            )


class MetricProvider(Protocol):
    """One small interface; one file per implementation."""

    def query(self, promql: str) -> Result:
        """Evaluate an instant query that should return a single scalar-like value."""
        ...
