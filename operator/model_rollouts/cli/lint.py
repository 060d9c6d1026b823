"""``kubectl mlrollouts lint``: manifests checked offline, as the API server and the operator would.

Each document is checked, in order, against
1. the CRD's structural schema (types, enums, patterns, bounds, required fields), with
   ``jsonschema`` (OpenAPI v3.0 is JSON Schema draft 4 plus extensions);
2. the CRD's CEL rules (``x-kubernetes-validations``) with ``cel-python``, after the schema's
   defaults are applied (the API server defaults before it runs CEL);
3. the operator's own models (pydantic: unknown fields, durations, windows, timeouts);
4. the checks the operator's handlers make before they act (``Controller.problem`` of the kind,
   ``check_queries`` on the PromQL placeholders, routers that do not exist, credentials in an
   inline address, a ClusterMetricTemplate whose workload selectors do not bind the namespace).
   What needs the cluster (templates, providers, routes) is not checked.

The CRDs are generated in-process from the same models as ``crds/`` (a test keeps those files
equal to them), so the installed plugin always checks against its own operator version; ``--crd``
checks against other CRD files instead.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft4Validator
from pydantic import BaseModel, ValidationError

from model_rollouts.api import crdgen, experiment, provider, rollout, template
from model_rollouts.api.common import GROUP, VERSION

#: The operator's own model of each kind's spec (kinds not listed get the CRD checks only).
SPEC_MODELS: dict[str, type[BaseModel]] = {
    rollout.KIND: rollout.ModelRolloutSpec,
    experiment.KIND: experiment.ModelExperimentSpec,
    provider.PROVIDER_KIND: provider.ClusterMetricProviderSpec,
    template.TEMPLATE_KIND: template.MetricTemplateSpec,
    template.CLUSTER_TEMPLATE_KIND: template.MetricTemplateSpec,
}
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


@dataclass
class Finding:
    source: str  # file name, or "-" for stdin
    document: int  # 0-based index in the file
    kind: str
    name: str
    field: str
    message: str
    check: str  # yaml, schema, cel, model, operator
    severity: str = "error"

    def text(self) -> str:
        what = f"{self.kind}/{self.name}" if self.kind else "document"
        return f"{self.source}[{self.document}] {what}: {self.field}: {self.message} ({self.check})"

    def dict(self) -> dict[str, Any]:
        return asdict(self)


def load_crds(files: Iterable[Path] | None = None) -> dict[str, dict[str, Any]]:
    """kind -> CRD: from ``files`` if given, else generated from the operator's models."""
    docs: list[dict[str, Any]]
    if files:
        docs = [d for f in files for d in yaml.safe_load_all(Path(f).read_text()) if d]
    else:
        docs = list(crdgen.all_crds().values())
    return {d["spec"]["names"]["kind"]: d for d in docs if d.get("kind") == "CustomResourceDefinition"}


def path_text(parts: Iterable[Any]) -> str:
    """("spec", "steps", 0, "setWeight") -> ``spec.steps[0].setWeight``."""
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out or "(root)"


def apply_defaults(value: Any, schema: dict[str, Any]) -> Any:
    """The value with the schema's defaults filled in, as the API server does before CEL."""
    if isinstance(value, dict):
        out = dict(value)
        for key, sub in (schema.get("properties") or {}).items():
            if key not in out and "default" in sub:
                out[key] = copy.deepcopy(sub["default"])
            if key in out:
                out[key] = apply_defaults(out[key], sub)
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [apply_defaults(v, schema["items"]) for v in value]
    return value


def _cel_sum(values: Any) -> Any:
    """Kubernetes' list library ``sum()`` (not in standard CEL)."""
    total = None
    for v in values:
        total = v if total is None else total + v
    return total if total is not None else 0


def cel_findings(value: Any, schema: dict[str, Any], path: list[Any]) -> list[tuple[str, str]]:
    """(field, message) of every CEL rule in the schema that the value breaks, and of every duplicate
    key in a list the schema declares a map (``x-kubernetes-list-type: map``)."""
    import celpy

    out: list[tuple[str, str]] = []
    rules = schema.get("x-kubernetes-validations") or []
    if rules and value is not None:
        env = celpy.Environment()
        for r in rules:
            try:
                program = env.program(env.compile(r["rule"]), functions={"sum": _cel_sum})
                ok = program.evaluate({"self": celpy.json_to_cel(value)})
            except Exception as e:  # a rule the offline evaluator cannot run: say so, do not guess
                out.append((path_text(path), f"rule {r['rule']!r} not checked offline ({type(e).__name__})"))
                continue
            if isinstance(ok, Exception) or not bool(ok):
                field = path_text(path) + (r.get("fieldPath") or "")
                out.append((field, str(r.get("message") or r["rule"])))
    keys = schema.get("x-kubernetes-list-map-keys") or []
    if isinstance(value, list) and schema.get("x-kubernetes-list-type") == "map" and keys:
        seen: set[tuple[Any, ...]] = set()
        for i, item in enumerate(value):
            key = (
                tuple(json.dumps(item.get(k), sort_keys=True) for k in keys) if isinstance(item, dict) else ()
            )
            if key and key in seen:
                shown = ", ".join(f"{k}={item.get(k)!r}" for k in keys)
                out.append(
                    (path_text([*path, i]), f"duplicate entry ({shown}): entries must be unique by {keys}")
                )
            seen.add(key)
    if isinstance(value, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key in value:
                out += cel_findings(value[key], sub, [*path, key])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            out += cel_findings(item, schema["items"], [*path, i])
    return out


def operator_problems(kind: str, spec: BaseModel) -> list[tuple[str, str]]:
    """What the handlers check before acting that needs no cluster (each names its field)."""
    from model_rollouts.api.errors import SpecError  # RouterError, ProviderError
    from model_rollouts.engine import experiment as experiment_engine
    from model_rollouts.handlers import common
    from model_rollouts.handlers import experiment as experiment_handler
    from model_rollouts.handlers import rollout as rollout_handler
    from model_rollouts.traffic import registry

    out: list[tuple[str, str]] = []

    def split(message: str) -> tuple[str, str]:
        field, _, rest = message.partition(": ")
        return (field, rest) if field.startswith("spec") and rest else ("spec", message)

    if kind == template.CLUSTER_TEMPLATE_KIND and isinstance(spec, template.MetricTemplateSpec):
        from model_rollouts.metrics.templates import check_platform_template

        try:  # a platform template must bind the namespace wherever it picks a workload
            check_platform_template(spec, "spec")
        except SpecError as e:
            field, _, rest = e.message.partition(": ")
            out.append((f"spec.{field}", rest))

    if isinstance(spec, experiment.ModelExperimentSpec):
        problem = experiment_engine.validate(spec)
        if problem:
            out.append(split(problem))
    if isinstance(spec, rollout.ModelRolloutSpec | experiment.ModelExperimentSpec):
        # Template-backed metrics are resolved by the operator against the cluster; the queries
        # written inline are checked here with the handler's own list of query fields.
        try:
            if isinstance(spec, rollout.ModelRolloutSpec):
                a = spec.analysis
                inline = spec.model_copy(update={"analysis": a.model_copy(update={
                    "guardrails": [g.model_copy(update={"templateRef": None}) for g in a.guardrails],
                    "comparisons": [c.model_copy(update={"templateRef": None}) for c in a.comparisons],
                })})  # fmt: skip
                common.check_queries(rollout_handler._queries(inline))
            else:
                inline_e = spec.model_copy(update={
                    "guardrails": [g.model_copy(update={"templateRef": None}) for g in spec.guardrails],
                    "primaryMetric": spec.primaryMetric.model_copy(update={"templateRef": None}),
                })  # fmt: skip
                common.check_queries(experiment_handler._queries(inline_e))
        except SpecError as e:
            out.append(split(str(e)))
        try:  # the router registry's answer (a router the CRD offers but this version lacks)
            registry.selected(spec.trafficRouting)
        except SpecError as e:
            out.append(split(str(e)))
        prom = spec.analysis.prometheus
        if prom is not None and prom.bearerTokenSecret is not None:  # refused before any API call
            try:
                common.provider_for(spec.analysis, "default")
            except SpecError as e:
                out.append(split(str(e)))
    return out


def lint_document(doc: Any, crds: dict[str, dict[str, Any]], source: str, index: int) -> list[Finding]:
    def finding(
        kind: str, name: str, field: str, message: str, check: str, severity: str = "error"
    ) -> Finding:
        return Finding(source, index, kind, name, field, message, check, severity)

    if not isinstance(doc, dict):
        return [finding("", "", "(root)", "a manifest must be a mapping", "schema")]
    kind = str(doc.get("kind") or "")
    name = str((doc.get("metadata") or {}).get("name") or "")
    if kind == "List" and isinstance(doc.get("items"), list):
        return [f for item in doc["items"] for f in lint_document(item, crds, source, index)]
    if kind not in crds:
        if str(doc.get("apiVersion", "")).startswith(GROUP + "/"):
            return [finding(kind, name, "kind", f"unknown kind {kind!r} in {GROUP}", "schema")]
        return [finding(kind, name, "kind", "not a Model Rollouts kind: skipped", "schema", "info")]
    out: list[Finding] = []
    if doc.get("apiVersion") != f"{GROUP}/{VERSION}":
        out.append(finding(kind, name, "apiVersion", f"must be {GROUP}/{VERSION}", "schema"))
    if not name:
        out.append(finding(kind, name, "metadata.name", "required", "schema"))
    elif not _NAME.match(name) or len(name) > 253:
        out.append(finding(kind, name, "metadata.name", "must be a DNS-1123 subdomain", "schema"))
    version = next(v for v in crds[kind]["spec"]["versions"] if v.get("storage"))
    schema = version["schema"]["openAPIV3Schema"]
    body = {k: v for k, v in doc.items() if k != "status"}
    errors = sorted(Draft4Validator(schema).iter_errors(body), key=lambda e: list(e.absolute_path))
    for e in errors:
        out.append(finding(kind, name, path_text(e.absolute_path), e.message, "schema"))
    for field, message in cel_findings(apply_defaults(body, schema), schema, []):
        unchecked = "not checked offline" in message
        if unchecked and errors:
            continue  # a rule over a value of the wrong type: the schema error says it
        out.append(finding(kind, name, field, message, "cel", "warning" if unchecked else "error"))
    if any(f.severity == "error" for f in out):
        return out  # the API server would refuse it; the operator's checks would repeat these
    model = SPEC_MODELS.get(kind)
    if model is None:
        return out
    try:
        spec = model.model_validate(doc.get("spec") or {})
    except ValidationError as e:
        for err in e.errors():
            out.append(finding(kind, name, path_text(["spec", *err["loc"]]), err["msg"], "model"))
        return out
    for field, message in operator_problems(kind, spec):
        out.append(finding(kind, name, field, message, "operator"))
    return out


def lint_text(text: str, source: str, crds: dict[str, dict[str, Any]]) -> list[Finding]:
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(yaml)"
        return [Finding(source, 0, "", "", where, f"not valid YAML: {getattr(e, 'problem', e)}", "yaml")]
    out: list[Finding] = []
    for i, doc in enumerate(docs):
        if doc is None:
            continue
        out += lint_document(doc, crds, source, i)
    return out
