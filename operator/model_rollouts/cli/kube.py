"""Cluster access for the plugin: the usual kubeconfig (``--kubeconfig``, ``KUBECONFIG``, ``--context``,
``-n``), lookup of both kinds by name, and the documented ways to act on them."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

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
TIMEOUT = 15


class CliError(Exception):
    """A user-facing error: printed without a traceback, exit code 1 (3 for ``status``)."""


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

    @classmethod
    def connect(cls, kubeconfig: str | None, context: str | None, namespace: str | None) -> Kube:
        from kubernetes import client, config

        try:
            api = config.new_client_from_config(config_file=kubeconfig, context=context)
        except (config.ConfigException, FileNotFoundError, OSError) as e:
            try:
                config.load_incluster_config()
                api = client.ApiClient()
            except config.ConfigException:
                where = kubeconfig or "~/.kube/config"
                raise CliError(f"cannot load the kubeconfig {where}: {e}") from None
        if namespace is None:
            namespace = "default"
            try:
                contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)
                chosen = next((c for c in contexts if c["name"] == context), active) if context else active
                namespace = (chosen or {}).get("context", {}).get("namespace") or "default"
            except (config.ConfigException, OSError, KeyError):
                pass
        return cls(api, namespace)

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
                    GROUP, VERSION, self.namespace, PLURALS[kind], name, _request_timeout=TIMEOUT
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
                        GROUP, VERSION, plural, _request_timeout=TIMEOUT
                    )
                else:
                    items = self.co.list_namespaced_custom_object(
                        GROUP, VERSION, self.namespace, plural, _request_timeout=TIMEOUT
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
                _content_type="application/merge-patch+json", _request_timeout=TIMEOUT,
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
                _request_timeout=TIMEOUT,
            )  # fmt: skip
        except ApiException as e:
            raise CliError(
                f"applying spec.paused={str(paused).lower()} to {obj['kind']} {meta['name']}: "
                f"HTTP {e.status} {e.reason}"
            ) from None


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
