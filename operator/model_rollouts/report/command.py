"""The ``report`` command (Click), registered in the ``kubectl mlrollouts`` plugin."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
import yaml

from model_rollouts.cli.kube import connection_options
from model_rollouts.report.data import ReportError


def _from_file(path: str, ref: tuple[str, ...]) -> tuple[dict[str, Any], list[dict[str, Any]] | None]:
    """The object in a saved YAML/JSON file (one object, a List, or several documents; NAME picks one),
    and the points of the series ConfigMaps saved beside it, if any (None when there are none)."""
    try:
        with open(path, encoding="utf-8") as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
    except (OSError, yaml.YAMLError) as e:
        raise click.BadParameter(str(e), param_hint="--from-file") from None
    objs: list[dict[str, Any]] = []
    for d in docs:
        objs += d.get("items") or [] if isinstance(d, dict) and d.get("kind") == "List" else [d]
    maps = [o for o in objs if isinstance(o, dict) and o.get("kind") == "ConfigMap"]
    objs = [o for o in objs if not (isinstance(o, dict) and o.get("kind") == "ConfigMap")]
    want = ref[-1].split("/")[-1] if ref else None
    if want is not None:
        objs = [o for o in objs if isinstance(o, dict) and (o.get("metadata") or {}).get("name") == want]
    if len(objs) != 1:
        what = f"named {want!r}" if want else "(give NAME to choose)"
        msg = f"{path}: expected one object {what}, found {len(objs)}"
        raise click.BadParameter(msg, param_hint="--from-file")
    from model_rollouts.kube.series_store import points_of

    points = points_of(objs[0], maps)
    return objs[0], points or None


def _archived(kube: Any, obj: dict[str, Any]) -> tuple[list[dict[str, Any]] | None, str]:
    """The object's archived analyses from the cluster (None and why when they cannot be read)."""
    import urllib3
    from kubernetes.client.exceptions import ApiException

    from model_rollouts.kube.series_store import read

    try:
        return read(kube.api, obj, kube.timeout), ""
    except ApiException as e:
        return None, f"listing ConfigMaps answered HTTP {e.status}"
    except urllib3.exceptions.HTTPError:
        return None, "listing ConfigMaps failed"


def _from_cluster(
    ref: tuple[str, ...], connection: dict[str, Any]
) -> tuple[dict[str, Any], list[dict[str, Any]] | None, str]:
    import urllib3  # with the kubernetes client: loaded only for a report from the cluster

    from model_rollouts.cli.kube import CliError, Kube, parse_ref

    try:
        kind, name = parse_ref(ref)
        kube = Kube.connect(**connection)
        obj = kube.find(kind, name)
        return (obj, *_archived(kube, obj))
    except CliError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    except urllib3.exceptions.HTTPError as e:  # refused, timed out, TLS: no answer at all
        click.echo(
            f"error: cannot reach the Kubernetes API server: {getattr(e, 'reason', None) or e}", err=True
        )
        sys.exit(1)


@click.command()
@click.argument("ref", nargs=-1, metavar="[KIND] NAME")
@click.option(
    "-o",
    "--output",
    "fmt",
    type=click.Choice(["html", "png", "md"]),
    default="html",
    show_default=True,
    help="html (self-contained, figures embedded), png (all panels in one image), "
    "md (Markdown with PNG files beside it).",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=True, path_type=Path),
    default=None,
    help="File (or directory) to write; default NAME-report.EXT in the current directory.",
)
@click.option(
    "--from-file",
    "from_file",
    default=None,
    metavar="FILE",
    help="Render from a saved object (kubectl get mro NAME -o yaml > FILE) instead of the cluster.",
)
@connection_options
def report(
    ref: tuple[str, ...], fmt: str, out: Path | None, from_file: str | None, **connection: Any
) -> None:
    """Write a decision report of a rollout or an experiment: weights, each comparison's estimate with its
    confidence sequence, guardrails against thresholds, the decisions and who or what triggered them;
    for experiments per-variant estimates, Holm-adjusted p-values, SRM and the allocation over time."""
    try:
        from model_rollouts.report.document import write
    except ImportError as e:  # matplotlib is the `report` extra
        click.echo(f"error: {e}", err=True)
        sys.exit(1)

    if not ref and not from_file:
        raise click.UsageError("give NAME (or --from-file FILE)")
    if from_file:
        obj, archived = _from_file(from_file, ref)
        note = "" if archived is not None else "none saved in the file"
    else:
        obj, archived, note = _from_cluster(ref, connection)
    try:
        w = write(obj, fmt, out, archived, note)
    except ReportError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    click.echo(str(w.path))
    for img in w.images:
        if img != w.path:
            click.echo(str(img))


def main() -> None:
    report(prog_name="python -m model_rollouts.report")
