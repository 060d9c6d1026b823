"""The operator's modules import downward only, and never in a circle (issue 17's layout).

Every module under ``operator/model_rollouts`` is parsed with :mod:`ast` (nothing is imported), and
every ``import`` of a ``model_rollouts`` module is an edge, wherever it is written: at the top, in a
function (a lazy import still ties the two modules) or under ``TYPE_CHECKING``. ``from pkg import x``
is an edge to ``pkg.x`` when that is a module, else to ``pkg`` (its ``__init__``). That running
``pkg.x`` first runs ``pkg/__init__`` is Python's mechanics, not a dependency, and is not an edge.

The layers, lowest first (a module imports its own package, or a lower layer):

1. ``api/`` and the package face (``model_rollouts/__init__.py``: the version).
2. ``analysis/``: pure measurement vocabulary and judges.
3. ``engine/``: pure state machines.
4. Process infrastructure every adapter may use: ``kube/`` (the API client, status writes, Events),
   ``telemetry`` (the Prometheus metrics the operator exports: adapters and handlers count into it),
   ``leader`` (the Lease: handlers ask it whether to act; it counts into telemetry) and ``policy``
   (the tenancy policy from the flags: allowed provider addresses, the namespace Secrets are read
   from; metrics/ and notify/ both read it). These may import each other (no cycle).
5. Adapters: ``metrics/``, ``traffic/``, ``notify/``. Each is independent of the others: an adapter
   imports only layers 1-4.
6. ``handlers/``: Kopf handlers and the per-object controller.
7. Entry points: ``main``, ``cli/``, ``report/``, and ``health`` (the probes ``main`` serves; it asks
   ``leader``). These may import each other (no cycle).

A new top-level module or package fails the test until it is placed in :data:`LAYERS`.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "operator" / "model_rollouts"
PACKAGE = "model_rollouts"

#: (units, whether units of the same layer may import each other), lowest layer first. A unit is the
#: first name below model_rollouts (a package or a top-level module); "" is the package's __init__.
LAYERS: list[tuple[frozenset[str], bool]] = [
    (frozenset({"", "api"}), True),
    (frozenset({"analysis"}), False),
    (frozenset({"engine"}), False),
    (frozenset({"kube", "telemetry", "leader", "policy", "sharding"}), True),
    (frozenset({"metrics", "traffic", "notify"}), False),
    (frozenset({"handlers"}), False),
    (frozenset({"main", "cli", "report", "health"}), True),
]


@dataclass(frozen=True)
class Edge:
    source: str  # importing module (dotted)
    target: str  # imported module (dotted)
    path: str  # the importing file, relative to the package's parent
    line: int

    def __str__(self) -> str:
        return f"{self.source} -> {self.target} ({self.path}:{self.line})"


def modules(root: Path) -> dict[str, Path]:
    """Dotted name of every module under ``root`` (a package directory) -> its file."""
    found: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join([root.name, *parts])] = path
    return found


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The longest known module that ``name`` is or lies in (``a.b.C`` -> ``a.b``); None if outside."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in known:
            return candidate
        parts.pop()
    return None


def _imports(tree: ast.AST, module: str, is_package: bool) -> Iterator[tuple[str, int]]:
    """(imported dotted name, line) of every import in a module's tree, relative ones made absolute."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = module.split(".") if is_package else module.split(".")[:-1]
                up = here[: len(here) - (node.level - 1)]
                base = ".".join([*up, base] if base else up)
            for alias in node.names:
                yield f"{base}.{alias.name}", node.lineno


def import_graph(root: Path) -> list[Edge]:
    """Every edge between two distinct modules of the package at ``root``."""
    known = modules(root)
    edges: set[Edge] = set()
    for module, path in known.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for name, line in _imports(tree, module, path.name == "__init__.py"):
            if name.split(".")[0] != root.name:
                continue
            target = _resolve(name, known)
            if target is not None and target != module:
                edges.add(Edge(module, target, str(path.relative_to(root.parent)), line))
    return sorted(edges, key=lambda e: (e.source, e.target, e.line))


def cycles(edges: list[Edge]) -> list[list[Edge]]:
    """One circle of edges through each strongly connected group of modules (Tarjan's algorithm)."""
    graph: dict[str, list[Edge]] = {}
    for e in edges:
        graph.setdefault(e.source, []).append(e)
        graph.setdefault(e.target, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(v: str) -> None:  # modules are few (under 100): recursion depth is bounded by them
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for e in graph[v]:
            if e.target not in index:
                visit(e.target)
                low[v] = min(low[v], low[e.target])
            elif e.target in on_stack:
                low[v] = min(low[v], index[e.target])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_circle(group, graph) for group in groups]


def _circle(group: set[str], graph: dict[str, list[Edge]]) -> list[Edge]:
    """A shortest circle of edges through the group's first module, staying inside the group."""
    start = min(group)
    paths: dict[str, list[Edge]] = {start: []}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for e in graph[v]:
                if e.target == start:
                    return [*paths[v], e]
                if e.target in group and e.target not in paths:
                    paths[e.target] = [*paths[v], e]
                    nxt.append(e.target)
        frontier = nxt
    raise AssertionError(f"no circle through {start} in {sorted(group)}")


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def layer_of(u: str, layers: list[tuple[frozenset[str], bool]]) -> int | None:
    for i, (units, _) in enumerate(layers):
        if u in units:
            return i
    return None


def upward(edges: list[Edge], layers: list[tuple[frozenset[str], bool]]) -> list[str]:
    """A line per edge that breaks the layering, naming both layers; and per unit not in any layer."""
    problems: list[str] = []
    for e in edges:
        src, dst = unit(e.source), unit(e.target)
        if src == dst:
            continue
        ls, ld = layer_of(src, layers), layer_of(dst, layers)
        if ls is None or ld is None:
            continue  # reported once below
        if ld > ls:
            problems.append(f"upward: {e} (layer {ls + 1} imports layer {ld + 1})")
        elif ld == ls and not layers[ls][1]:
            problems.append(f"sideways: {e} ({src} and {dst} are independent siblings in layer {ls + 1})")
    for u in sorted({unit(m) for e in edges for m in (e.source, e.target)}):
        if layer_of(u, layers) is None:
            problems.append(
                f"unplaced: {PACKAGE}.{u} is in no layer; add it to LAYERS in {Path(__file__).name}"
            )
    return problems


def _pending(edges: list[Edge]) -> set[Edge]:
    """Edges allowed only until issue 17's analysis/ exists: the engines read the measurement
    ``Result`` from metrics/provider.py, which the analysis part moves into analysis/. Once
    analysis/ is on the branch, these are violations like any other."""
    if (ROOT / "analysis").is_dir():
        return set()
    return {e for e in edges if unit(e.source) == "engine" and e.target == f"{PACKAGE}.metrics.provider"}


# -- the operator -----------------------------------------------------------------------------------
def test_the_operator_has_no_import_cycle() -> None:
    found = cycles(import_graph(ROOT))
    assert not found, "import cycles (each: the edges around it):\n" + "\n".join(
        "  " + "  =>  ".join(str(e) for e in circle) for circle in found
    )


def test_the_operator_imports_only_downward() -> None:
    edges = import_graph(ROOT)
    assert len(edges) > 50, f"only {len(edges)} imports found under {ROOT}: is the tree where it was?"
    pending = _pending(edges)
    problems = upward([e for e in edges if e not in pending], LAYERS)
    assert not problems, "imports against the layers (see this test's docstring):\n" + "\n".join(
        "  " + p for p in problems
    )


def test_kube_is_below_every_adapter_and_the_handlers() -> None:
    """The cycle issue 17 names: notify/ read the API client from handlers/; now both read kube/."""
    edges = import_graph(ROOT)
    into = {(unit(e.source), unit(e.target)) for e in edges}
    assert ("notify", "kube") in into and ("handlers", "kube") in into
    # The client is infrastructure: it knows no engine, analysis, adapter or handler.
    forbidden = {"analysis", "engine", "metrics", "traffic", "notify", "handlers"}
    wrong = [str(e) for e in edges if unit(e.source) == "kube" and unit(e.target) in forbidden]
    assert not wrong, "kube/ imports what it must not:\n" + "\n".join(wrong)


# -- the checker itself, on a made-up package ---------------------------------------------------------
def _tree(root: Path, files: dict[str, str]) -> Path:
    pkg = root / PACKAGE
    for name, text in {"__init__.py": "", **files}.items():
        path = pkg / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return pkg


def test_the_checker_finds_a_lazy_cycle_and_prints_its_edges(tmp_path: Path) -> None:
    pkg = _tree(
        tmp_path,
        {
            "handlers/__init__.py": "",
            "handlers/common.py": "from model_rollouts.notify import sender\n",
            "notify/__init__.py": "",
            "notify/sender.py": "def api():\n    from model_rollouts.handlers.common import api\n",
            "api/__init__.py": "",
            "api/common.py": "from . import other\n",
            "api/other.py": "from .common import X\n",
        },
    )
    found = cycles(import_graph(pkg))
    text = sorted(" => ".join(str(e) for e in c) for c in found)
    assert text == [
        "model_rollouts.api.common -> model_rollouts.api.other (model_rollouts/api/common.py:1) => "
        "model_rollouts.api.other -> model_rollouts.api.common (model_rollouts/api/other.py:1)",
        "model_rollouts.handlers.common -> model_rollouts.notify.sender "
        "(model_rollouts/handlers/common.py:1) => "
        "model_rollouts.notify.sender -> model_rollouts.handlers.common (model_rollouts/notify/sender.py:2)",
    ]


def test_the_checker_finds_upward_sideways_and_unplaced_imports(tmp_path: Path) -> None:
    pkg = _tree(
        tmp_path,
        {
            "engine/__init__.py": "",
            "engine/rollout.py": "from model_rollouts.metrics.provider import Result\n"
            "from model_rollouts.api import common\n",
            "metrics/__init__.py": "",
            "metrics/provider.py": "import model_rollouts.kube.client\n",
            "metrics/templates.py": "from model_rollouts.traffic.router import RouterError\n",
            "traffic/__init__.py": "",
            "traffic/router.py": "from model_rollouts.api.errors import SpecError\n",
            "kube/__init__.py": "",
            "kube/client.py": "import model_rollouts.telemetry\n",
            "telemetry.py": "",
            "api/__init__.py": "",
            "api/common.py": "",
            "api/errors.py": "",
            "gadget.py": "from model_rollouts import telemetry\n",
        },
    )
    problems = upward(import_graph(pkg), LAYERS)
    assert problems == [
        "upward: model_rollouts.engine.rollout -> model_rollouts.metrics.provider "
        "(model_rollouts/engine/rollout.py:1) (layer 3 imports layer 5)",
        "sideways: model_rollouts.metrics.templates -> model_rollouts.traffic.router "
        "(model_rollouts/metrics/templates.py:1) (metrics and traffic are independent siblings in layer 5)",
        f"unplaced: model_rollouts.gadget is in no layer; add it to LAYERS in {Path(__file__).name}",
    ]
