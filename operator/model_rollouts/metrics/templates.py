"""Filling a metric template's args (pure; the handlers fetch the template)."""

from __future__ import annotations

import re

from model_rollouts.api.common import TemplateRef, check_window
from model_rollouts.api.template import ARG_PATTERNS, MetricTemplateSpec
from model_rollouts.metrics.provider import _PLACEHOLDER, TemplateError, check_template, redact


def fill(template: MetricTemplateSpec, ref: TemplateRef, names: tuple[str, ...]) -> dict[str, str]:
    """The template's queries ``names`` with ``{{ args.X }}`` replaced by the reference's typed values.

    The other placeholders stay for the caller's :func:`render`. Raises TemplateError (a message
    without the field) for an unknown or missing arg, a value that is not of its arg's type, a
    query the template does not have, or a malformed template.
    """
    declared = {a.name: a for a in template.args}
    unknown = sorted(set(ref.args) - set(declared))
    if unknown:
        raise TemplateError(f"unknown arg {redact(unknown[0])}; the template declares: {', '.join(declared)}")
    values: dict[str, str] = {}
    for a in template.args:
        v = ref.args.get(a.name, a.default)
        if v is None:
            raise TemplateError(f"arg {a.name} is required")
        if not ARG_PATTERNS[a.type].fullmatch(v):
            raise TemplateError(f"arg {a.name}: {redact(v)} is not a valid {a.type}")
        if a.type == "duration":  # a range selector: bounded like analysis.window
            try:
                check_window(v)
            except ValueError as e:
                raise TemplateError(f"arg {a.name}: {redact(v)} {e}") from None
        values[a.name] = v
    extra = tuple(f"args.{n}" for n in declared)
    out: dict[str, str] = {}
    for n in names:
        q = getattr(template, n)
        if q is None:
            raise TemplateError(f"{ref.kind} {ref.name} does not define {n}")
        check_template(q, extra)

        def sub(m: re.Match[str]) -> str:
            name = m.group(1)
            return values[name[5:]] if name.startswith("args.") else m.group(0)

        out[n] = _PLACEHOLDER.sub(sub, q)
    return out
