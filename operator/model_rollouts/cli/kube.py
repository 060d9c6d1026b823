"""Cluster access for the plugin: the usual kubeconfig (``--kubeconfig``, ``KUBECONFIG``, ``--context``,
``-n``) and kubectl's connection and auth flags (``--server``, ``--token``, ``--as``, ...), lookup of
both kinds by name, and the documented ways to act on them."""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, cast

import click

if TYPE_CHECKING:
    from kubernetes import client
# The kubernetes client and the API package (pydantic) are imported by the methods that talk to the
# API server, not here: a command that never connects (`--help`, `lint`) starts without them.

ROLLOUT, EXPERIMENT = "ModelRollout", "ModelExperiment"
PLURALS = {ROLLOUT: "modelrollouts", EXPERIMENT: "modelexperiments"}
#: Words accepted for a kind on the command line (``get rollout NAME``, ``get mexp/NAME``, ...).
KIND_WORDS = {
    **dict.fromkeys(("rollout", "rollouts", "mro", "modelrollout", "modelrollouts"), ROLLOUT),
    **dict.fromkeys(("experiment", "experiments", "mexp", "modelexperiment", "modelexperiments"), EXPERIMENT),
}
#: The field manager the plugin applies ``spec.paused`` with (server-side apply).
FIELD_MANAGER = "kubectl-mlrollouts"
#: Seconds before one request to the API server gives up (``--request-timeout``; 0 = never).
TIMEOUT = 15.0
F = TypeVar("F", bound=Callable[..., Any])


class CliError(Exception):
    """A user-facing error: printed without a traceback, exit code 1 (3 for ``status``)."""


_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_request_timeout(text: str) -> float | None:
    """kubectl's ``--request-timeout``: ``0`` = no timeout, a plain number = seconds, else a Go
    duration (``500ms``, ``30s``, ``1m30s``). None means no timeout."""
    text = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        seconds = float(text)
    else:
        parts = re.findall(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)", text)
        if not parts or "".join(n + u for n, u in parts) != text:
            raise CliError(f"--request-timeout: invalid duration {text!r} (e.g. 0, 30, 30s, 1m)")
        seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    return None if seconds == 0 else seconds


def connection_options(f: F) -> F:
    """kubectl's connection and auth flags: the kubeconfig and context, the namespace, and overrides
    of the server, its CA, the credential and the identity (impersonation)."""
    options = [
        click.option("--kubeconfig", default=None, envvar="KUBECONFIG", show_envvar=True,
                     help="Path to the kubeconfig."),
        click.option("--context", default=None, help="kubeconfig context (default: the current one)."),
        click.option("-n", "--namespace", default=None, help="Namespace (default: the context's)."),
        click.option("-s", "--server", default=None, metavar="URL",
                     help="The API server's address, instead of the kubeconfig's."),
        click.option("--token", default=None, help="Bearer token, instead of the kubeconfig's credential."),
        click.option("--certificate-authority", default=None, metavar="FILE",
                     type=click.Path(exists=True, dir_okay=False), help="CA file for the API server."),
        click.option("--insecure-skip-tls-verify", is_flag=True, default=False,
                     help="Do not check the server's certificate (insecure)."),
        click.option("--as", "as_user", default=None, metavar="USER",
                     help="Act as this user (impersonation; needs `impersonate` RBAC)."),
        click.option("--as-group", "as_group", multiple=True, metavar="GROUP",
                     help="Act as a member of this group (repeatable; with --as)."),
        click.option("--request-timeout", default="15s", show_default=True, metavar="DURATION",
                     help="Give up on one API request after this long (0: never)."),
    ]  # fmt: skip
    for option in reversed(options):
        f = option(f)
    return f


def parse_ref(args: tuple[str, ...]) -> tuple[str | None, str]:
    """``NAME``, ``KIND NAME`` or ``KIND/NAME`` -> (kind or None, name)."""
    if len(args) == 1 and "/" in args[0]:
        args = tuple(args[0].split("/", 1))
    if len(args) == 1:
        return None, args[0]
    if len(args) == 2:
        kind = KIND_WORDS.get(args[0].lower())
        if kind is None:
            raise CliError(f"unknown kind {args[0]!r}: use rollout (mro) or experiment (mexp)")
        return kind, args[1]
    raise CliError("expected NAME, KIND NAME or KIND/NAME")


@dataclass
class Kube:
    api: client.ApiClient
    namespace: str
    timeout: float | None = field(default=TIMEOUT)

    @classmethod
    def connect(
        cls,
        kubeconfig: str | None = None,
        context: str | None = None,
        namespace: str | None = None,
        *,
        server: str | None = None,
        token: str | None = None,
        certificate_authority: str | None = None,
        insecure_skip_tls_verify: bool = False,
        as_user: str | None = None,
        as_group: tuple[str, ...] = (),
        request_timeout: str | None = None,
    ) -> Kube:
        """The kubeconfig (or the in-cluster config), then kubectl's overrides on top of it."""
        from kubernetes import client, config

        timeout = parse_request_timeout(request_timeout) if request_timeout is not None else TIMEOUT
        if as_group and not as_user:
            raise CliError("--as-group needs --as (kubectl's rule: groups are impersonated with a user)")
        cfg = client.Configuration()
        try:
            config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=cfg)
        except (config.ConfigException, FileNotFoundError, OSError) as e:
            try:
                config.load_incluster_config(client_configuration=cfg)
            except config.ConfigException:
                if server is None:
                    where = kubeconfig or "~/.kube/config"
                    raise CliError(f"cannot load the kubeconfig {where}: {e}") from None

        def override(c: client.Configuration) -> None:
            if server:
                c.host = server.rstrip("/")
            if certificate_authority:
                c.ssl_ca_cert = certificate_authority
            if insecure_skip_tls_verify:
                c.verify_ssl = False
                c.ssl_ca_cert = None
            if token:
                c.api_key = {"BearerToken": f"Bearer {token}"}
                c.api_key_prefix = {}
                c.username = c.password = None

        override(cfg)
        # The kubeconfig loader reloads the kubeconfig into the configuration before each request
        # (to refresh an exec or OIDC credential): the flags must win again after it.
        reload = None if token else cfg.refresh_api_key_hook
        if reload is not None:

            def refresh(c: client.Configuration) -> None:
                reload(c)  # which also puts its own hook back
                override(c)
                c.refresh_api_key_hook = refresh

            cfg.refresh_api_key_hook = refresh
        else:
            cfg.refresh_api_key_hook = None
        api = client.ApiClient(cfg)
        if as_user:
            api.set_default_header("Impersonate-User", as_user)
        if as_group:
            _impersonate_groups(api, as_group)
        if namespace is None:
            namespace = "default"
            try:
                contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)
                chosen = next((c for c in contexts if c["name"] == context), active) if context else active
                namespace = (chosen or {}).get("context", {}).get("namespace") or "default"
            except (config.ConfigException, OSError, KeyError, TypeError, StopIteration):
                pass
        return cls(api, namespace, timeout)

    @property
    def co(self) -> client.CustomObjectsApi:
        from kubernetes import client

        return client.CustomObjectsApi(self.api)

    # -- reading ----------------------------------------------------------------------------------
    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        from model_rollouts.api.common import GROUP, VERSION

        try:
            return cast(
                dict[str, Any],
                self.co.get_namespaced_custom_object(
                    GROUP, VERSION, self.namespace, PLURALS[kind], name, _request_timeout=self.timeout
                ),
            )
        except ApiException as e:
            if e.status == 404:
                return None
            raise CliError(f"reading {kind} {self.namespace}/{name}: HTTP {e.status} {e.reason}") from None

    def find(self, kind: str | None, name: str) -> dict[str, Any]:
        """The object by name; without a kind, whichever kind has it (an error if both do)."""
        kinds = [kind] if kind else [ROLLOUT, EXPERIMENT]
        found = [o for o in (self.get(k, name) for k in kinds) if o is not None]
        if not found:
            what = kind or "ModelRollout or ModelExperiment"
            raise CliError(f"{what} {name!r} not found in namespace {self.namespace}")
        if len(found) > 1:
            raise CliError(
                f"both a ModelRollout and a ModelExperiment are named {name!r}: "
                f"say which, e.g. `get rollout {name}` or `get experiment {name}`"
            )
        return found[0]

    def list(self, all_namespaces: bool) -> list[dict[str, Any]]:
        from kubernetes.client.exceptions import ApiException

        from model_rollouts.api.common import GROUP, VERSION

        out: list[dict[str, Any]] = []
        for kind, plural in PLURALS.items():
            try:
                if all_namespaces:
                    items = self.co.list_cluster_custom_object(
                        GROUP, VERSION, plural, _request_timeout=self.timeout
                    )
                else:
                    items = self.co.list_namespaced_custom_object(
                        GROUP, VERSION, self.namespace, plural, _request_timeout=self.timeout
                    )
            except ApiException as e:
                raise CliError(f"listing {plural}: HTTP {e.status} {e.reason}") from None
            for item in cast(dict[str, Any], items)["items"]:
                item.setdefault("kind", kind)
                out.append(item)
        return sorted(
            out, key=lambda o: (o["metadata"].get("namespace", ""), o["kind"], o["metadata"]["name"])
        )

    # -- acting -----------------------------------------------------------------------------------
    def annotate(self, obj: dict[str, Any], key: str) -> str:
        """Set an action annotation to a fresh token (each new value acts once); returns the token."""
        from kubernetes.client.exceptions import ApiException

        from model_rollouts.api.common import GROUP, VERSION

        token = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        meta = obj["metadata"]
        try:
            self.co.patch_namespaced_custom_object(
                GROUP, VERSION, meta["namespace"], PLURALS[obj["kind"]], meta["name"],
                {"metadata": {"annotations": {key: token}}},
                _content_type="application/merge-patch+json", _request_timeout=self.timeout,
            )  # fmt: skip
        except ApiException as e:
            raise CliError(f"annotating {obj['kind']} {meta['name']}: HTTP {e.status} {e.reason}") from None
        return token

    def set_paused(self, obj: dict[str, Any], paused: bool) -> None:
        """``spec.paused`` by server-side apply as field manager ``kubectl-mlrollouts``.

        Refused when the field comes from a manifest: an apply (server-side: Argo CD, Flux,
        ``kubectl apply --server-side``) by another manager owns it, or the client-side
        ``kubectl apply`` record (last-applied-configuration) has it. Otherwise the plugin takes
        the field (force: a create or an edit that merely defaulted or set it is no declaration);
        unpausing stops applying it, so it returns to its default, false.
        """
        from kubernetes.client.exceptions import ApiException

        from model_rollouts.api.common import GROUP, VERSION

        meta = obj["metadata"]
        owner = manifest_owner(obj)
        if owner is not None:
            raise CliError(
                f"spec.paused of {obj['kind']} {meta['name']} is set by {owner}: change it there (e.g. in "
                "Git); the plugin never edits spec fields a manifest owns"
            )
        body: dict[str, Any] = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": obj["kind"],
            "metadata": {"name": meta["name"], "namespace": meta["namespace"]},
        }
        if paused:
            body["spec"] = {"paused": True}
        elif FIELD_MANAGER not in [m for m, _ in paused_owners(obj)]:
            body["spec"] = {"paused": False}  # set by an edit, not by us: clear it explicitly
        try:
            self.co.patch_namespaced_custom_object(
                GROUP, VERSION, meta["namespace"], PLURALS[obj["kind"]], meta["name"], body,
                field_manager=FIELD_MANAGER, force=True, _content_type="application/apply-patch+yaml",
                _request_timeout=self.timeout,
            )  # fmt: skip
        except ApiException as e:
            raise CliError(
                f"applying spec.paused={str(paused).lower()} to {obj['kind']} {meta['name']}: "
                f"HTTP {e.status} {e.reason}"
            ) from None


def _impersonate_groups(api: client.ApiClient, groups: tuple[str, ...]) -> None:
    """One ``Impersonate-Group`` header per group, as kubectl sends them (the client's default headers
    are a plain dict, which holds one value per name)."""
    import urllib3

    pool = api.rest_client.pool_manager
    send = pool.request

    def request(method: str, url: str, **kwargs: Any) -> Any:
        h = urllib3.HTTPHeaderDict(kwargs.pop("headers", None) or {})
        h.discard("Impersonate-Group")
        for g in groups:
            h.add("Impersonate-Group", g)
        return send(method, url, headers=h, **kwargs)

    pool.request = request  # type: ignore[method-assign,assignment]


def paused_owners(obj: dict[str, Any]) -> list[tuple[str, str]]:
    """(field manager, operation) of each managedFields entry that includes ``spec.paused``."""
    out = []
    for entry in (obj.get("metadata") or {}).get("managedFields") or []:
        fields = (entry.get("fieldsV1") or {}).get("f:spec") or {}
        if "f:paused" in fields:
            out.append((str(entry.get("manager") or "?"), str(entry.get("operation") or "")))
    return out


LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


def manifest_owner(obj: dict[str, Any]) -> str | None:
    """Who declares ``spec.paused`` in a manifest, if anyone (a text naming them), else None."""
    appliers = [m for m, op in paused_owners(obj) if op == "Apply" and m != FIELD_MANAGER]
    if appliers:
        return "field manager " + ", ".join(repr(m) for m in appliers) + " (server-side apply)"
    last = ((obj.get("metadata") or {}).get("annotations") or {}).get(LAST_APPLIED)
    if last:
        try:
            applied = json.loads(last)
        except ValueError:
            applied = {}
        if isinstance(applied, dict) and "paused" in (applied.get("spec") or {}):
            return f"`kubectl apply` (annotation {LAST_APPLIED})"
    return None
