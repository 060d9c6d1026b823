#!/usr/bin/env python3
"""Write charts/model-rollouts/README.md from values.schema.json (descriptions, types) and values.yaml
(defaults). A test fails when the README is stale.

    python3 hack/gen-chart-readme.py [--check]

A row per key of the schema that has a description; its children are listed only when they have
their own. Each key of values.yaml must be described by itself or by an ancestor, and where
values.yaml carries a `# -- ` comment for a key it must say what the schema says (both are checked
by tests/install/test_chart.py through ``problems()``).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "model-rollouts"
OUT = CHART / "README.md"

HEAD = """\
<!-- Generated from values.schema.json and values.yaml by hack/gen-chart-readme.py. Do not edit. -->
# model-rollouts Helm chart

{description}

Chart version {version}, app version {app_version}, Kubernetes {kube}.

```bash
helm install model-rollouts charts/model-rollouts -n model-rollouts --create-namespace \\
  --set image.repository=registry.example.com/platform/model-rollouts --set image.tag={app_version}
kubectl -n model-rollouts rollout status deploy/model-rollouts   # waits for /readyz
```

`values.schema.json` makes `helm lint`, `helm install` and `helm upgrade` reject unknown keys and
bad values. The project README's "Install" section explains the install modes and the RBAC of
each; its "Runbooks" section is what the alerts link to.

## Values

| Key | Type | Default | Description |
| --- | --- | --- | --- |
"""


def schema() -> dict[str, Any]:
    return dict(json.loads((CHART / "values.schema.json").read_text()))


def values() -> dict[str, Any]:
    return dict(yaml.safe_load((CHART / "values.yaml").read_text()))


def described(
    node: dict[str, Any], path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], dict[str, Any]]]:
    for key, child in (node.get("properties") or {}).items():
        if "description" in child:
            yield (*path, key), child
        yield from described(child, (*path, key))


def type_of(node: dict[str, Any]) -> str:
    t = node.get("type")
    text = " or ".join(t) if isinstance(t, list) else t or "any"
    if "enum" in node:
        text += " (" + ", ".join(json.dumps(v) for v in node["enum"]) + ")"
    return text


def default_at(vals: dict[str, Any], path: tuple[str, ...]) -> Any:
    cur: Any = vals
    for key in path:
        if not isinstance(cur, dict) or key not in cur:
            return None
        cur = cur[key]
    return cur


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render() -> str:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    out = HEAD.format(
        description=" ".join(chart["description"].split()),
        version=chart["version"],
        app_version=chart["appVersion"],
        kube=chart.get("kubeVersion", "any"),
    )
    vals = values()
    for path, node in described(schema()):
        default = json.dumps(default_at(vals, path), separators=(", ", ": "))
        out += (
            f"| `{'.'.join(path)}` | {cell(type_of(node))} | `{cell(default)}` | "
            f"{cell(' '.join(node['description'].split()))} |\n"
        )
    return out


def _comments() -> dict[tuple[str, ...], str]:
    """values.yaml's `# -- ` comments by key path."""
    stack: list[tuple[int, str]] = []
    pending: list[str] | None = None
    out: dict[tuple[str, ...], str] = {}
    for line in (CHART / "values.yaml").read_text().splitlines():
        if m := re.match(r"^\s*# -- (.*)$", line):
            pending = [m.group(1)]
        elif (m := re.match(r"^\s*# ?(.*)$", line)) and pending is not None:
            pending.append(m.group(1))
        elif m := re.match(r"^(\s*)([A-Za-z]\w*):", line):
            indent = len(m.group(1))
            while stack and stack[-1][0] >= indent:
                stack.pop()
            stack.append((indent, m.group(2)))
            if pending:
                out[tuple(k for _, k in stack)] = " ".join(pending)
            pending = None
        elif not line.strip():
            pending = None
    return out


def problems() -> list[str]:
    """Keys of values.yaml that the schema does not describe, and comments that disagree with it."""
    found = []
    paths = {p: n for p, n in described(schema())}

    def leaves(value: Any, path: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
        if isinstance(value, dict) and value and not any(path[: i + 1] in paths for i in range(len(path))):
            for k, v in value.items():
                yield from leaves(v, (*path, k))
        else:
            yield path

    for path in leaves(values(), ()):
        if not any(path[: i + 1] in paths for i in range(len(path))):
            found.append(f"{'.'.join(path)}: no description in values.schema.json")
    for path, text in _comments().items():
        node = paths.get(path)
        if node is not None and " ".join(node["description"].split()) != " ".join(text.split()):
            found.append(f"{'.'.join(path)}: values.yaml says {text!r}, the schema {node['description']!r}")
    return found


def main() -> int:
    issues = problems()
    if issues:
        print("\n".join(issues), file=sys.stderr)
        return 1
    text = render()
    if "--check" in sys.argv:
        if not OUT.exists() or OUT.read_text() != text:
            print(
                f"{OUT.relative_to(ROOT)} is stale: run `python3 hack/gen-chart-readme.py`", file=sys.stderr
            )
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
