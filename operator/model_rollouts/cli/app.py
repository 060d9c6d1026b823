"""The ``kubectl mlrollouts`` plugin (Click + rich).

Inspect: ``list``, ``get``, ``status``. Act: ``promote [--full]``, ``abort``, ``retry``, ``pause``,
``resume``.
Offline: ``lint``. Every command takes ``-o json|yaml``; cluster commands take ``--kubeconfig``,
``--context`` and ``-n/--namespace`` (default: the context's namespace).

To add a command (e.g. ``report``): define it with ``@click.command()``, decorate it with
``@kube_options`` and ``@output_option`` to get the usual flags (``Kube.connect(**kw)``), and add it
to :data:`cli` with ``cli.add_command(...)`` at the bottom of this module.
"""

from __future__ import annotations

import functools
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import yaml
from rich.console import Console
from rich.live import Live

from model_rollouts import __version__

# Heavy imports (the API models, the engines with scipy, the kubernetes client, lint's jsonschema,
# the report's matplotlib) happen inside the commands that need them: `--help` starts quickly.
from model_rollouts.cli import render
from model_rollouts.cli import view as view_
from model_rollouts.cli.kube import (
    EXPERIMENT,
    FIELD_MANAGER,
    ROLLOUT,
    CliError,
    Kube,
    connection_options,
    parse_ref,
)
from model_rollouts.report.command import report as report_command

F = TypeVar("F", bound=Callable[..., Any])
#: Exit codes of ``status`` (and of ``get -w`` when the object is deleted: 3).
EXIT_SUCCESS, EXIT_FAILED, EXIT_TIMEOUT, EXIT_ERROR = 0, 1, 2, 3


def kube_options(f: F) -> F:
    """kubectl's flags: --kubeconfig, --context, -n/--namespace, --server, --token,
    --certificate-authority, --insecure-skip-tls-verify, --as, --as-group, --request-timeout."""
    return connection_options(f)


def output_option(f: F) -> F:
    return click.option(
        "-o", "--output", type=click.Choice(["text", "json", "yaml"]), default="text", show_default=True,
        help="text (rich), or the same data as json or yaml.",
    )(f)  # fmt: skip


def emit(data: Any, output: str) -> None:
    """Print ``data`` as JSON or YAML (one document)."""
    if output == "json":
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        click.echo(yaml.safe_dump(data, sort_keys=False, default_flow_style=False).rstrip())


def connect(**connection: Any) -> Kube:
    return Kube.connect(**connection)


def _unreachable(e: Exception) -> bool:
    """No answer from the API server at all: refused, timed out, TLS (urllib3's errors)."""
    import urllib3  # with the kubernetes client, only once a command connects

    return isinstance(e, urllib3.exceptions.HTTPError)


def errors_exit(code: int = 1) -> Callable[[F], F]:
    """A :class:`CliError` prints ``error: ...`` on stderr and exits with ``code``."""

    def deco(f: F) -> F:
        @functools.wraps(f)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return f(*args, **kwargs)
            except CliError as e:
                click.echo(f"error: {e}", err=True)
                sys.exit(code)
            except Exception as e:
                if not _unreachable(e):
                    raise
                reason = getattr(e, "reason", None) or e
                click.echo(f"error: cannot reach the Kubernetes API server: {reason}", err=True)
                sys.exit(code)

        return wrapper  # type: ignore[return-value]

    return deco


def console() -> Console:
    """rich on a terminal; 160 columns without wrapping when piped (e.g. to a file or grep)."""
    c = Console(highlight=False)
    return c if c.is_terminal else Console(highlight=False, width=160, soft_wrap=False)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(
    __version__, "--version", prog_name="kubectl-mlrollouts", message="%(prog)s %(version)s"
)
def cli() -> None:
    """Inspect and act on ModelRollouts (mro) and ModelExperiments (mexp).

    NAME finds either kind; say which with `rollout NAME` / `experiment NAME` (or mro/NAME, mexp/NAME)
    when both kinds share the name.
    """


# -- inspect -----------------------------------------------------------------------------------------


@cli.command("list")
@click.option("-A", "--all-namespaces", is_flag=True, help="List across all namespaces.")
@click.option("-w", "--watch", is_flag=True, help="Redraw as things change (Ctrl-C to stop).")
@kube_options
@output_option
@errors_exit()
def list_(all_namespaces: bool, watch: bool, output: str, **kw: Any) -> None:
    """ModelRollouts and ModelExperiments: phase, step, weights, age, message."""
    kube = connect(**kw)

    def rows() -> list[dict[str, Any]]:
        return [view_.list_row(o) for o in kube.list(all_namespaces)]

    if output != "text":
        if not watch:
            return emit(rows(), output)
        last = None
        while True:  # a document per change
            r = rows()
            if r != last:
                emit(r, output)
                click.echo("---" if output == "yaml" else "", nl=output == "yaml")
                last = r
            time.sleep(1)
    if not watch:
        return console().print(render.listing(rows(), all_namespaces))
    with Live(render.listing(rows(), all_namespaces), console=console(), auto_refresh=False) as live:
        try:
            while True:
                time.sleep(1)
                live.update(render.listing(rows(), all_namespaces), refresh=True)
        except KeyboardInterrupt:
            pass


@cli.command()
@click.argument("ref", nargs=-1, required=True, metavar="[KIND] NAME")
@click.option("-w", "--watch", is_flag=True, help="Redraw live; exits when the object finishes.")
@click.option("--interval", default=1.0, show_default=True, help="Seconds between reads with -w.")
@kube_options
@output_option
@errors_exit()
def get(ref: tuple[str, ...], watch: bool, interval: float, output: str, **kw: Any) -> None:
    """Steps, weights, guardrails, comparisons with intervals, conditions and what it waits for."""
    kind, name = parse_ref(ref)
    kube = connect(**kw)
    obj = kube.find(kind, name)
    kind = obj["kind"]
    v = view_.view_of(obj)
    if output != "text":
        emit(v, output)
        last = v
        while watch and not v["finished"]:
            time.sleep(interval)
            obj = kube.find(kind, name)
            v = view_.view_of(obj)
            if {**v, "nextAnalysisIn": None, "waitingFor": None} != {
                **last,
                "nextAnalysisIn": None,
                "waitingFor": None,
            }:
                click.echo("---" if output == "yaml" else "")
                emit(v, output)
                last = v
        return
    if not watch:
        return console().print(render.view(v))
    with Live(render.view(v), console=console(), auto_refresh=False, vertical_overflow="visible") as live:
        try:
            while not v["finished"]:
                time.sleep(interval)
                found = kube.get(kind, name)
                if found is None:
                    raise CliError(f"{kind} {name} was deleted")
                v = view_.view_of(found)
                live.update(render.view(v), refresh=True)
        except KeyboardInterrupt:
            return
    click.echo(f"{kind} {kube.namespace}/{name} finished: {v['phase']}")


@cli.command()
@click.argument("ref", nargs=-1, required=True, metavar="[KIND] NAME")
@click.option(
    "--timeout", default=None, metavar="DURATION",
    help="Give up after this long (e.g. 90s, 10m, 1h30m) with exit code 2. Default: wait until it finishes.",
)  # fmt: skip
@click.option("--interval", default=1.0, show_default=True, help="Seconds between reads.")
@kube_options
@output_option
@errors_exit(EXIT_ERROR)
def status(ref: tuple[str, ...], timeout: str | None, interval: float, output: str, **kw: Any) -> None:
    """Wait until the object finishes. Exit code 0: Promoted (or Idle) / Concluded; 1: RolledBack or
    Aborted; 2: still running at --timeout; 3: an error (not found, no access)."""
    from model_rollouts.api.common import parse_duration

    try:
        limit = parse_duration(timeout) if timeout else None
    except ValueError as e:
        raise CliError(f"--timeout: {e}") from None  # exit 3: never mistaken for a timeout (2)
    kind, name = parse_ref(ref)
    kube = connect(**kw)
    start = time.monotonic()
    last = ""
    while True:
        obj = kube.get(kind, name) if kind else kube.find(None, name)
        if obj is None:
            raise CliError(f"{kind} {name!r} not found in namespace {kube.namespace}")
        kind = obj["kind"]
        st = obj.get("status") or {}
        code = view_.outcome(obj)
        if output == "text":
            if kind == ROLLOUT:
                where = f"step {st.get('currentStep', 0)}, weight {st.get('weight', 0)}"
            else:
                where = " ".join(f"{v.get('name')}:{v.get('weight', 0)}" for v in st.get("variants") or [])
            line = f"{st.get('phase') or 'Pending'} ({where}): {st.get('message') or ''}"
            if kind == ROLLOUT and (planned := view_.plan_line(obj)):
                line += f"\n  {planned}"
            key = re.sub(r"\d+s left", "", line)  # a countdown alone is not news
            if key != last:
                click.echo(line)
                last = key
        if code is not None or (limit is not None and time.monotonic() - start >= limit):
            break
        time.sleep(interval)
    if code is None:
        code = EXIT_TIMEOUT
        if output == "text":
            click.echo(f"timed out after {timeout}: still {st.get('phase') or 'Pending'}", err=True)
    if output != "text":
        emit({**view_.view_of(obj), "exitCode": code}, output)
    sys.exit(code)


# -- act ---------------------------------------------------------------------------------------------


def _report(obj: dict[str, Any], action: str, output: str, changed: dict[str, Any], note: str) -> None:
    meta = obj["metadata"]
    data = {
        "kind": obj["kind"],
        "namespace": meta["namespace"],
        "name": meta["name"],
        "action": action,
        **changed,
    }
    if output != "text":
        return emit(data, output)
    what = ", ".join(f"{k}={v}" for k, v in changed.items())
    click.echo(
        f"{obj['kind']} {meta['namespace']}/{meta['name']}: {action}: {what}" + (f" ({note})" if note else "")
    )


def _at_manual_gate(obj: dict[str, Any]) -> bool:
    st = obj.get("status") or {}
    steps = (obj.get("spec") or {}).get("steps") or []
    i = int(st.get("currentStep") or 0)
    return (
        obj["kind"] == ROLLOUT
        and st.get("phase") == "Paused"
        and i < len(steps)
        and "pause" in steps[i]
        and not (steps[i].get("pause") or {}).get("duration")
    )


def _unfinished(obj: dict[str, Any], action: str) -> None:
    if view_.finished(obj):
        phase = (obj.get("status") or {}).get("phase")
        raise CliError(f"{obj['kind']} {obj['metadata']['name']} has finished ({phase}): nothing to {action}")


def _target(ref: tuple[str, ...], kw: dict[str, Any]) -> tuple[Kube, dict[str, Any]]:
    kind, name = parse_ref(ref)
    kube = connect(**kw)
    return kube, kube.find(kind, name)


def _action(f: F) -> F:
    f = errors_exit()(f)
    f = output_option(f)
    f = kube_options(f)
    return click.argument("ref", nargs=-1, required=True, metavar="[KIND] NAME")(f)


def _step_to_promote(obj: dict[str, Any]) -> str | None:
    """The rollout's current pause or analysis step ("manual gate", "pause 5m", "analysis 10m"), or None."""
    st = obj.get("status") or {}
    steps = (obj.get("spec") or {}).get("steps") or []
    i = int(st.get("currentStep") or 0)
    if obj["kind"] != ROLLOUT or i >= len(steps):
        return None
    step = steps[i]
    if "pause" in step:
        duration = (step.get("pause") or {}).get("duration")
        return f"pause {duration}" if duration else "manual gate"
    if "analysis" in step:
        return f"analysis {(step.get('analysis') or {}).get('duration')}"
    return None


@cli.command()
@click.option(
    "--full",
    is_flag=True,
    help="Skip every remaining step, analysis and gate: 100% to the candidate now "
    "(mlrollouts.io/promote-full).",
)
@_action
def promote(ref: tuple[str, ...], full: bool, output: str, **kw: Any) -> None:
    """Move past the current pause or analysis step, a manual gate included (mlrollouts.io/promote);
    later steps are analysed as usual. With --full, skip to 100% now (mlrollouts.io/promote-full)."""
    from model_rollouts.api.rollout import ANNOTATION_PROMOTE, ANNOTATION_PROMOTE_FULL

    kube, obj = _target(ref, kw)
    if obj["kind"] != ROLLOUT:
        raise CliError(
            "a ModelExperiment is decided by its test and has no promote; `abort` ends it on the control"
        )
    _unfinished(obj, "promote")
    if full:
        token = kube.annotate(obj, ANNOTATION_PROMOTE_FULL)
        return _report(obj, "promote --full", output, {ANNOTATION_PROMOTE_FULL: token},
                       "the operator sets the candidate to 100% and Promoted")  # fmt: skip
    step = _step_to_promote(obj)
    if step is None:
        i = int((obj.get("status") or {}).get("currentStep") or 0)
        raise CliError(
            f"step {i} is not a pause or analysis step: there is no step to move past (the weight moves "
            "on by analysis); `promote --full` skips the remaining steps and analysis"
        )
    token = kube.annotate(obj, ANNOTATION_PROMOTE)
    i = int((obj.get("status") or {}).get("currentStep") or 0)
    _report(
        obj, "promote", output, {ANNOTATION_PROMOTE: token},
        f"step {i} ({step}) ends at the next analysis; the next weights still wait for passing analysis",
    )  # fmt: skip


@cli.command()
@_action
def abort(ref: tuple[str, ...], output: str, **kw: Any) -> None:
    """All traffic back to stable (the control), phase Aborted (mlrollouts.io/abort)."""
    from model_rollouts.api.rollout import ANNOTATION_ABORT

    kube, obj = _target(ref, kw)
    _unfinished(obj, "abort")
    token = kube.annotate(obj, ANNOTATION_ABORT)
    _report(obj, "abort", output, {ANNOTATION_ABORT: token}, "all traffic back to the baseline")


@cli.command()
@_action
def retry(ref: tuple[str, ...], output: str, **kw: Any) -> None:
    """Start a RolledBack or Aborted object over from weight 0 (mlrollouts.io/retry)."""
    from model_rollouts.api.rollout import ANNOTATION_RETRY

    kube, obj = _target(ref, kw)
    phase = (obj.get("status") or {}).get("phase")
    if phase not in view_.FAILURE_PHASES:
        raise CliError(f"retry acts only after RolledBack or Aborted; {obj['metadata']['name']} is {phase}")
    token = kube.annotate(obj, ANNOTATION_RETRY)
    _report(obj, "retry", output, {ANNOTATION_RETRY: token}, "starts over from weight 0")


@cli.command()
@_action
def pause(ref: tuple[str, ...], output: str, **kw: Any) -> None:
    """Hold the current weights: spec.paused=true by server-side apply (field manager kubectl-mlrollouts).

    Refused when spec.paused comes from a manifest (server-side applied by another manager, e.g. Argo
    CD, or in kubectl apply's last-applied-configuration): change it in Git. Guardrails still run while
    paused; `resume` gives the field back.
    """
    kube, obj = _target(ref, kw)
    _unfinished(obj, "pause")
    if (obj.get("spec") or {}).get("paused"):
        raise CliError(f"{obj['metadata']['name']} already has spec.paused=true")
    kube.set_paused(obj, True)
    _report(obj, "pause", output, {"spec.paused": True, "fieldManager": FIELD_MANAGER},
            "takes effect at the next analysis; guardrails still run")  # fmt: skip


@cli.command()
@_action
def resume(ref: tuple[str, ...], output: str, **kw: Any) -> None:
    """Release a manual gate or a sample-ratio-mismatch pause (mlrollouts.io/resume), and clear a
    spec.paused this plugin set."""
    from model_rollouts.api.rollout import ANNOTATION_RESUME

    kube, obj = _target(ref, kw)
    _unfinished(obj, "resume")
    changed: dict[str, Any] = {}
    if (obj.get("spec") or {}).get("paused"):
        kube.set_paused(obj, False)
        changed["spec.paused"] = False
    st = obj.get("status") or {}
    srm_pause = obj["kind"] == EXPERIMENT and st.get("phase") == "Paused" and not changed
    if _at_manual_gate(obj) or srm_pause:
        changed[ANNOTATION_RESUME] = kube.annotate(obj, ANNOTATION_RESUME)
    if not changed:
        raise CliError(
            f"{obj['metadata']['name']} is not paused and no manual gate is waiting: nothing to resume"
        )
    _report(obj, "resume", output, changed, "")


# -- offline -----------------------------------------------------------------------------------------


@cli.command()
@click.option(
    "-f",
    "--filename",
    "files",
    multiple=True,
    required=True,
    help="A YAML file (several documents allowed), a directory of them, or - for stdin. Repeatable.",
)
@click.option(
    "--crd",
    "crd_files",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Check against these CRD files instead of the operator's own (repeatable).",
)
@output_option  # fmt: skip
def lint(files: tuple[str, ...], crd_files: tuple[str, ...], output: str) -> None:
    """Check manifests without a cluster: CRD schema and CEL rules, the operator's models and the checks
    its handlers make before acting. Every finding names its field; exit code 1 on any error."""
    from model_rollouts.cli import lint as lint_  # jsonschema, the CRDs, the handlers' checks

    crds = lint_.load_crds([Path(p) for p in crd_files] or None)
    findings: list[lint_.Finding] = []
    for f in files:
        if f == "-":
            findings += lint_.lint_text(sys.stdin.read(), "-", crds)
            continue
        p = Path(f)
        paths = sorted([*p.glob("*.yaml"), *p.glob("*.yml")]) if p.is_dir() else [p]
        for path in paths:
            try:
                text = path.read_text()
            except OSError as e:
                findings.append(lint_.Finding(str(path), 0, "", "", "(file)", e.strerror or str(e), "yaml"))
                continue
            findings += lint_.lint_text(text, str(path), crds)
    errors = [x for x in findings if x.severity == "error"]
    if output != "text":
        emit({"errors": len(errors), "findings": [x.dict() for x in findings]}, output)
    else:
        con = Console(highlight=False, soft_wrap=True)
        for x in findings:
            style = {"error": "red", "warning": "yellow"}.get(x.severity, "dim")
            con.print(f"[{style}]{x.severity}[/]: ", end="")
            con.print(x.text(), markup=False)
        verdict = f"[red]{len(errors)} error(s)[/]" if errors else "[green]valid[/]"
        con.print(f"{verdict} ({len(findings) - len(errors)} other finding(s))")
    sys.exit(1 if errors else 0)


# -- version and shell completion ----------------------------------------------------------------------


@cli.command()
@output_option
def version(output: str) -> None:
    """The plugin's version (the model-rollouts package it comes with)."""
    if output == "text":
        return click.echo(f"kubectl-mlrollouts {__version__}")
    emit({"plugin": "kubectl-mlrollouts", "version": __version__}, output)


#: Shells with a completion script, and the variable Click reads to complete.
SHELLS = ("bash", "zsh")
COMPLETE_VAR = "_KUBECTL_MLROLLOUTS_COMPLETE"


@cli.command()
@click.argument("shell", type=click.Choice(SHELLS))
def completion(shell: str) -> None:
    """Print a completion script for SHELL (bash or zsh): commands, flags, kinds and choices.

    \b
    bash:  source <(kubectl-mlrollouts completion bash)
    zsh:   source <(kubectl-mlrollouts completion zsh)
    `kubectl mlrollouts <TAB>` (kubectl >= 1.26) also needs `kubectl_complete-mlrollouts` on PATH,
    which pip installs with the plugin.
    """
    from click.shell_completion import get_completion_class

    cls = get_completion_class(shell)
    assert cls is not None
    click.echo(cls(cli, {}, "kubectl-mlrollouts", COMPLETE_VAR).source())


def complete_for_kubectl() -> None:
    """``kubectl_complete-mlrollouts ARGS... INCOMPLETE``: kubectl's plugin completion protocol (the one
    of cobra's ``__complete``): one candidate per line, then ``:4`` (no file completion)."""
    from click.shell_completion import ShellComplete

    words = sys.argv[1:]
    incomplete = words.pop() if words else ""
    for item in ShellComplete(cli, {}, "kubectl mlrollouts", COMPLETE_VAR).get_completions(words, incomplete):
        click.echo(item.value if not item.help else f"{item.value}\t{item.help}")
    click.echo(":4")


# -- report (model_rollouts.report: matplotlib, the `report` extra) ------------------------------------
cli.add_command(report_command, "report")


def main() -> None:
    cli(prog_name="kubectl mlrollouts", complete_var=COMPLETE_VAR)
