"""The metric-provider interface, and the query template every provider shares.

A measurement has exactly one of four outcomes; none of them crashes the caller and only
``value`` can ever pass a check: ``value`` (a finite number), ``noData`` (the query matched
no series), ``nan`` (the series exists but is NaN or infinite, e.g. 0/0 with no traffic) and
``error`` (the provider could not be asked: timeout, connection refused, bad query).

A vector query (:meth:`MetricProvider.query_vector`, for judges that read one series per label value,
such as histogram buckets by ``le``) has the same four outcomes for the answer as a whole: ``value``
(every series has each named label, no two share their values, every value is finite), ``noData`` (no
series), ``nan`` (a series is NaN or infinite: nothing of that answer is used) and ``error`` (the
provider failed, a scalar came back, a series lacks a named label or repeats another's, more than
:data:`MAX_SERIES` series).
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from model_rollouts.analysis.vocabulary import Outcome as Outcome
from model_rollouts.analysis.vocabulary import Result as Result

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
#: Most series a vector query may return (a histogram has tens of buckets).
MAX_SERIES = 500


@dataclass(frozen=True)
class Vector:
    """One vector query's answer: each series' value keyed by its values of the asked labels."""

    outcome: Outcome
    series: Mapping[tuple[str, ...], float] = field(default_factory=dict)
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome == "value"

    def problem(self) -> Result:
        """The answer as a scalar-style Result (for a measurement that could not be made)."""
        return Result(self.outcome, message=self.message or self.outcome)


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


@dataclass(frozen=True)
class Slot:
    """Where a placeholder stands in a PromQL template.

    ``context``: ``label`` (a quoted value after ``=`` or ``!=``), ``regex`` (a quoted value after
    ``=~`` or ``!~``), ``string`` (another quoted string), ``range`` (inside ``[...]``) or ``bare``
    (anywhere else: a metric name, a number, an operand). ``selector``: the ``{...}`` it is in, if any.
    """

    match: re.Match[str]
    context: Literal["label", "regex", "string", "range", "bare"]
    quote: str = ""
    selector: tuple[int, int] | None = None

    @property
    def name(self) -> str:
        return self.match.group(1)


def slots(template: str) -> list[Slot]:
    """Every placeholder of a (checked) template with its context, by a small PromQL scan: strings
    (with escapes), comments, range brackets and selector braces; placeholders are text anywhere."""
    out: list[tuple[re.Match[str], str, str, int | None]] = []
    selectors: list[tuple[int, int]] = []
    quote, qctx, sel, depth, i, n = "", "", None, 0, 0, len(template)
    while i < n:
        m = _PLACEHOLDER.match(template, i)
        if m:
            ctx = qctx if quote else ("range" if depth else "bare")
            out.append((m, ctx, quote, sel))
            i = m.end()
            continue
        c = template[i]
        if quote:
            if c == "\\" and quote != "`":
                i += 2
                continue
            if c == quote:
                quote = ""
        elif c in "\"'`":
            before = template[:i].rstrip()
            quote = c
            qctx = (
                "regex"
                if before.endswith(("=~", "!~"))
                else "label"
                if before.endswith("=") and not before.endswith(("==", "<=", ">="))
                else "string"
            )
        elif c == "#":
            end = template.find("\n", i)
            i = n if end < 0 else end
            continue
        elif c == "[":
            depth += 1
        elif c == "]":
            depth = max(0, depth - 1)
        elif c == "{":
            sel = i
        elif c == "}" and sel is not None:
            selectors.append((sel, i + 1))
            sel = None
        i += 1
    spans = {start: (start, end) for start, end in selectors}
    return [
        Slot(m, ctx, q, spans.get(start) if start is not None else None)  # type: ignore[arg-type]
        for m, ctx, q, start in out
    ]


def escape_regex(value: str, quote: str) -> str:
    """``value`` as a literal inside a quoted regular-expression matcher (RE2): ``.`` matches a dot."""
    return value.replace(".", "\\." if quote == "`" else "\\\\.")


def render(template: str, values: dict[str, str], extra: tuple[str, ...] = ()) -> str:
    """Fill ``{{ name }}`` placeholders; malformed templates, unknown names and unsafe values are refused.

    Inside a regular-expression matcher (``=~``, ``!~``) a value is escaped so that it matches only
    itself (a ``.`` in a name is not a wildcard)."""
    check_template(template, extra)
    out, last = [], 0
    for slot in slots(template):
        m = slot.match
        value = values.get(slot.name)
        if value is None:
            raise TemplateError(f"placeholder {{{{ {slot.name} }}}} has no value here")
        if not _SAFE_VALUE.match(value):
            raise TemplateError(f"unsafe value {redact(value)} for {{{{ {slot.name} }}}}")
        if slot.context == "regex":
            value = escape_regex(value, slot.quote)
        out += [template[last : m.start()], value]
        last = m.end()
    return "".join([*out, template[last:]])


def redact(text: str, limit: int = SNIPPET_MAX) -> str:
    """A length-limited, printable-only quote of ``text`` for a message (never a header or body)."""
    clean = "".join(c if c.isprintable() and c not in "\"'`" else "?" for c in text[:limit])
    return repr(clean + ("..." if len(text) > limit else ""))


class MetricProvider(Protocol):
    """One small interface; one file per implementation."""

    def query(self, promql: str) -> Result:
        """Evaluate an instant query that should return a single scalar-like value."""
        ...

    def query_vector(self, promql: str, labels: tuple[str, ...]) -> Vector:
        """Evaluate an instant query that returns one series per combination of ``labels``."""
        ...

    def query_many(self, promqls: Sequence[str]) -> list[Result]:
        """Each query's :meth:`query` outcome, in order; a provider that can asks them in one request
        (metrics/batch.py). Call it through :func:`ask_many`, which loops over :meth:`query` for a
        provider without it."""
        ...


def ask_many(provider: MetricProvider, promqls: Sequence[str]) -> list[Result]:
    """``provider.query_many(promqls)``, or each query in turn where the provider has no query_many."""
    many = getattr(provider, "query_many", None)
    if many is None:
        return [provider.query(q) for q in promqls]
    return list(many(promqls))


class Budgeted:
    """One object's analysis: queries after ``seconds`` have passed fail at once, so a provider that
    answers slowly cannot keep one object's measurement (and its handler thread) for long."""

    def __init__(self, inner: MetricProvider, seconds: float) -> None:
        self.inner, self.seconds = inner, seconds
        self.deadline = time.monotonic() + seconds

    def query(self, promql: str) -> Result:
        if time.monotonic() >= self.deadline:
            return self._skipped()
        return self.inner.query(promql)

    def query_many(self, promqls: Sequence[str]) -> list[Result]:
        if time.monotonic() >= self.deadline:
            return [self._skipped()] * len(promqls)
        return ask_many(self.inner, promqls)

    def _skipped(self) -> Result:
        return Result("error", message=f"query skipped: this analysis used its {self.seconds:.0f}s budget")

    def query_vector(self, promql: str, labels: tuple[str, ...]) -> Vector:
        if time.monotonic() >= self.deadline:
            return Vector(
                "error", message=f"query skipped: this analysis used its {self.seconds:.0f}s budget"
            )
        return self.inner.query_vector(promql, labels)
