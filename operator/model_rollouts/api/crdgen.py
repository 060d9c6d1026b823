"""Generate the CRD YAML in crds/ from the pydantic models (``make crds``).

pydantic emits JSON Schema 2020-12; Kubernetes wants a structural OpenAPI v3.0 schema, so
refs are inlined, nullable unions collapsed, numeric exclusive bounds converted and the CEL
rules declared on the models kept as ``x-kubernetes-validations``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from model_rollouts.api import experiment, notification, provider, rollout, template
from model_rollouts.api.common import GROUP, VERSION

_DROP = {"title", "additionalProperties_false"}


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_resolve(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].split("/")[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _resolve(merged, defs)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP or key == "$defs":
            continue
        out[key] = _resolve(value, defs)
    # Optional[X] -> X (absence is how Kubernetes says "unset").
    if "anyOf" in out:
        options = [o for o in out["anyOf"] if o.get("type") != "null"]
        if len(options) == 1:
            rest = {k: v for k, v in out.items() if k != "anyOf"}
            out = {**options[0], **rest}
            if out.get("default", 0) is None:
                del out["default"]
    if out.get("additionalProperties") is False:
        del out["additionalProperties"]
    if "const" in out:
        out["enum"] = [out.pop("const")]
    for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if bound in out and not isinstance(out[bound], bool):
            out[plain] = out.pop(bound)
            out[bound] = True
    if out.get("format") == "date-time":
        out["type"] = "string"
    if out.get("default", 0) is None:
        del out["default"]
    return out


def openapi_schema(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(mode="validation")
    defs = raw.pop("$defs", {})
    schema: dict[str, Any] = _resolve(raw, defs)
    return schema


def _with_kopf_state(schema: dict[str, Any]) -> dict[str, Any]:
    """Kopf keeps its handler progress in status.kopf instead of annotations on the user's object."""
    schema.setdefault("properties", {})["kopf"] = {
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": True,
    }
    return schema


def crd(
    kind: str,
    plural: str,
    short: str,
    spec_model: type[BaseModel],
    status_model: type[BaseModel] | None,
    columns: list[dict[str, Any]],
    description: str,
    scope: str = "Namespaced",
) -> dict[str, Any]:
    properties: dict[str, Any] = {
        "apiVersion": {"type": "string"},
        "kind": {"type": "string"},
        "metadata": {"type": "object"},
        "spec": openapi_schema(spec_model),
    }
    if status_model is not None:
        properties["status"] = _with_kopf_state(openapi_schema(status_model))
    version: dict[str, Any] = {"name": VERSION, "served": True, "storage": True}
    if status_model is not None:
        version["subresources"] = {"status": {}}
    version["additionalPrinterColumns"] = columns
    version["schema"] = {
        "openAPIV3Schema": {
            "type": "object",
            "description": description,
            "required": ["spec"],
            "properties": properties,
        }
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": [short],
                "categories": ["mlrollouts"],
            },
            "scope": scope,
            "versions": [version],
        },
    }


def all_crds() -> dict[str, dict[str, Any]]:
    """Paths under crds/ and their CRDs; the tenancy kinds (issue 9) live in crds/tenancy/."""
    return {
        f"{rollout.PLURAL}.yaml": crd(
            rollout.KIND,
            rollout.PLURAL,
            "mro",
            rollout.ModelRolloutSpec,
            rollout.ModelRolloutStatus,
            rollout.PRINTER_COLUMNS,
            "A progressive canary of a new model version, promoted or rolled back "
            "by guardrails and always-valid statistical comparisons.",
        ),
        f"{experiment.PLURAL}.yaml": crd(
            experiment.KIND,
            experiment.PLURAL,
            "mexp",
            experiment.ModelExperimentSpec,
            experiment.ModelExperimentStatus,
            experiment.PRINTER_COLUMNS,
            "A controlled A/B/n or bandit experiment between model variants.",
        ),
        f"tenancy/{provider.PROVIDER_PLURAL}.yaml": crd(
            provider.PROVIDER_KIND,
            provider.PROVIDER_PLURAL,
            "cmp",
            provider.ClusterMetricProviderSpec,
            None,
            provider.PROVIDER_COLUMNS,
            "A metric provider owned by the platform: address, TLS and credentials (from the operator's "
            "namespace). Rollouts and experiments reference it by name as analysis.provider.",
            scope="Cluster",
        ),
        f"tenancy/{notification.NOTIFICATION_PROVIDER_PLURAL}.yaml": crd(
            notification.NOTIFICATION_PROVIDER_KIND,
            notification.NOTIFICATION_PROVIDER_PLURAL,
            "cnp",
            notification.ClusterNotificationProviderSpec,
            None,
            notification.NOTIFICATION_PROVIDER_COLUMNS,
            "Where notifications and gate requests go, owned by the platform: format (webhook, slack, "
            "teams) and URL (in a Secret of the operator's namespace, or an allowlisted address). "
            "Rollouts and experiments reference it by name in spec.notifications and spec.gates.",
            scope="Cluster",
        ),
        f"tenancy/{template.TEMPLATE_PLURAL}.yaml": crd(
            template.TEMPLATE_KIND,
            template.TEMPLATE_PLURAL,
            "mtpl",
            template.MetricTemplateSpec,
            None,
            template.TEMPLATE_COLUMNS,
            "Named PromQL with typed args for this namespace's rollouts and experiments (templateRef).",
        ),
        f"tenancy/{template.CLUSTER_TEMPLATE_PLURAL}.yaml": crd(
            template.CLUSTER_TEMPLATE_KIND,
            template.CLUSTER_TEMPLATE_PLURAL,
            "cmtpl",
            template.MetricTemplateSpec,
            None,
            template.TEMPLATE_COLUMNS,
            "Named PromQL with typed args, owned by the platform, for every namespace (templateRef).",
            scope="Cluster",
        ),
    }


HEADER = "# Generated from operator/model_rollouts/api by `make crds`. Do not edit.\n"


#: Strings YAML 1.1 readers (kubectl, Helm) would take for booleans: always written quoted.
_YAML11_BOOLS = {"y", "n", "yes", "no", "on", "off", "true", "false"}


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "'" if value.lower() in _YAML11_BOOLS else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render(doc: dict[str, Any]) -> str:
    return HEADER + yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="crds", type=Path)
    parser.add_argument("--check", action="store_true", help="fail if the files differ")
    args = parser.parse_args(argv)
    stale = []
    for name, doc in all_crds().items():
        path = args.out / name
        text = render(doc)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print(f"stale CRDs: {', '.join(stale)}; run `make crds`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
