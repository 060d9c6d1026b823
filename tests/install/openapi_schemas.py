"""JSON schemas for kubeconform, generated from a live API server's OpenAPI v2 document.

No schema can be downloaded here, so, like openapi2jsonschema, each kind's definition becomes a
standalone JSON schema (with the definitions it references), laid out for kubeconform's
``-schema-location DIR/{{ .Group }}/{{ .ResourceAPIVersion }}/{{ .ResourceKind }}.json``
(the core group is named after its version there, as kubeconform splits apiVersion). In strict
mode objects that list their properties reject unknown ones, except where Kubernetes preserves
unknown fields; int-or-string fields take either.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

LOCATION = "{{ .Group }}/{{ .ResourceAPIVersion }}/{{ .ResourceKind }}.json"


def _refs(node: Any, out: set[str]) -> None:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/definitions/"):
            out.add(ref.removeprefix("#/definitions/"))
        for v in node.values():
            _refs(v, out)
    elif isinstance(node, list):
        for v in node:
            _refs(v, out)


def _closure(defs: dict[str, Any], name: str) -> dict[str, Any]:
    seen: set[str] = set()
    todo = [name]
    while todo:
        n = todo.pop()
        if n in seen or n not in defs:
            continue
        seen.add(n)
        found: set[str] = set()
        _refs(defs[n], found)
        todo.extend(found - seen)
    return {n: defs[n] for n in seen}


def _fix(node: Any, strict: bool) -> Any:
    """One schema, walked by structure (a property may be named ``properties`` or ``type``)."""
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if isinstance(node.get("properties"), dict):
        node["properties"] = {k: _fix(v, strict) for k, v in node["properties"].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(node.get(key), dict):
            node[key] = _fix(node[key], strict)
    for key in ("allOf", "anyOf", "oneOf"):
        if isinstance(node.get(key), list):
            node[key] = [_fix(v, strict) for v in node[key]]
    if node.get("format") == "int-or-string" or node.get("x-kubernetes-int-or-string"):
        node.pop("type", None)
        node.pop("format", None)
        node["oneOf"] = [{"type": "string"}, {"type": "integer"}]
    if (
        strict
        and "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        node["additionalProperties"] = False
    return node


def write_schemas(openapi: dict[str, Any], out: Path, strict: bool = True) -> int:
    """Write one schema per group/version/kind; returns how many."""
    defs = openapi["definitions"]
    n = 0
    for name, d in defs.items():
        for gvk in d.get("x-kubernetes-group-version-kind") or []:
            group, version, kind = gvk.get("group") or "", gvk["version"], gvk["kind"]
            schema = copy.deepcopy(d)
            schema["definitions"] = {k: _fix(v, strict) for k, v in _closure(defs, name).items()}
            schema = _fix(schema, strict)
            schema["$schema"] = "http://json-schema.org/draft-04/schema#"
            path = out / (group or version) / version / f"{kind.lower()}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(schema))
            n += 1
    return n
