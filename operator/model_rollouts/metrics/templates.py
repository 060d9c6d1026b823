"""Filling a metric template's args (pure; the handlers fetch the template)."""

from __future__ import annotations

import re

from model_rollouts.api.common import TemplateRef, check_window
from model_rollouts.api.template import ARG_PATTERNS, QUERY_FIELDS, MetricTemplateSpec
from model_rollouts.metrics.errors import ProviderError
from model_rollouts.metrics.provider import Slot, TemplateError, check_template, escape_regex, redact, slots


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
        parts, last = [], 0
        for slot in slots(q):
            if not slot.name.startswith("args."):
                continue
            arg = declared[slot.name[5:]]
            value = _place(arg.name, arg.type, values[arg.name], slot)
            parts += [q[last : slot.match.start()], value]
            last = slot.match.end()
        out[n] = "".join([*parts, q[last:]])
    return out


#: A string arg outside quotes is a name (a metric-name fragment), nothing that PromQL would read
#: as an operator, a number or a range.
_NAME_FRAGMENT = re.compile(r"^[A-Za-z_:][A-Za-z0-9_:]*$")


def _place(name: str, type_: str, value: str, slot: Slot) -> str:
    """An arg's value as it may stand where the template put it, or TemplateError.

    Quoted: as it is (no quote or backslash can be in it), escaped in a regular-expression matcher so
    ``.`` is not a wildcard. Inside ``[...]``: a duration arg only (a string could be a subquery
    ``9999h:1s``). Bare: a string arg only if it is a plain name (``/`` and ``-`` would be operators).
    """
    if slot.context == "regex":
        return escape_regex(value, slot.quote)
    if slot.context in ("label", "string"):
        return value
    if slot.context == "range":
        if type_ != "duration":
            raise TemplateError(f"arg {name} is a {type_}; inside [...] only a duration arg may stand")
        return value
    if type_ == "string" and not _NAME_FRAGMENT.fullmatch(value):
        raise TemplateError(
            f"arg {name}: {redact(value)} stands outside quotes, where only a name "
            "(letters, digits, _ and :) may; quote it in the template"
        )
    return value


#: Placeholders that pick a workload (besides string args): a selector using one must bind the namespace.
WORKLOAD = ("service", "deployment", "variant")
_NAMESPACE_MATCHER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\s*=\s*([\"'`])\{\{\s*namespace\s*\}\}\1")


def check_platform_template(template: MetricTemplateSpec, where: str) -> None:
    """A ClusterMetricTemplate serves every namespace: each selector ``{...}`` that picks a workload
    (``{{ service }}``, ``{{ deployment }}``, ``{{ variant }}`` or a string arg) must also match the
    object's own namespace exactly (``namespace="{{ namespace }}"``, any label name), so a tenant
    naming another team's Service reads nothing. Raises ProviderError naming ``where``."""
    strings = {f"args.{a.name}" for a in template.args if a.type == "string"}
    extra = tuple(f"args.{a.name}" for a in template.args)
    for field in QUERY_FIELDS:
        q = getattr(template, field)
        if q is None:
            continue
        try:
            check_template(q, extra)
        except TemplateError as e:
            raise ProviderError(where, f"{field}: {e}") from None
        for slot in slots(q):
            if slot.selector is None or not (slot.name in WORKLOAD or slot.name in strings):
                continue
            selector = q[slot.selector[0] : slot.selector[1]]
            if not _NAMESPACE_MATCHER.search(selector):
                raise ProviderError(
                    where,
                    f"{field}: the selector {redact(selector)} picks a workload ({{{{ {slot.name} }}}}) "
                    "but not its namespace; a ClusterMetricTemplate must also match "
                    'namespace="{{ namespace }}" there',
                )
