"""Status writes through the status subresource, guarded by resourceVersion."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from model_rollouts.api.common import GROUP, VERSION
from model_rollouts.kube.client import REQUEST_TIMEOUT, api, get_object


def write_status(plural: str, obj: dict[str, Any], status: dict[str, Any]) -> bool:
    """Replace status via the status subresource, guarded by resourceVersion. False on a real conflict.

    A 409 whose fresh object carries the very status, spec and annotations this decision was made
    from (someone touched only other metadata, or a proxy answered 409) is retried with the fresh
    resourceVersion, and so is a transient 5xx or dropped connection (twice): the analysis that led
    here is recorded rather than thrown away and repeated.
    """
    kopf_state = (obj.get("status") or {}).get("kopf")
    if kopf_state is not None:
        status = {**status, "kopf": kopf_state}
    meta = obj["metadata"]
    rv = meta["resourceVersion"]
    for attempt in range(3):
        body = {
            "apiVersion": obj["apiVersion"],
            "kind": obj["kind"],
            "metadata": {"name": meta["name"], "namespace": meta["namespace"], "resourceVersion": rv},
            "status": status,
        }
        try:
            client.CustomObjectsApi(api()).replace_namespaced_custom_object_status(
                GROUP,
                VERSION,
                meta["namespace"],
                plural,
                meta["name"],
                body,
                _request_timeout=REQUEST_TIMEOUT,
            )
            return True
        except ApiException as e:
            if e.status == 404:
                return False
            if e.status == 409:
                fresh = get_object(plural, meta["namespace"], meta["name"])
                if fresh is None or not _same_inputs(obj, fresh):
                    return False
                rv = fresh["metadata"]["resourceVersion"]
                continue
            if e.status is None or e.status < 500 or attempt == 2:
                raise
        except urllib3.exceptions.HTTPError:
            if attempt == 2:
                raise
        time.sleep(0.2 * (attempt + 1))
    return False


def _same_inputs(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two versions of an object carry the same spec, annotations and status (minus Kopf's)."""

    def strip(o: Mapping[str, Any]) -> tuple[Any, ...]:
        st = {k: v for k, v in (o.get("status") or {}).items() if k != "kopf"}
        return (o.get("spec"), (o["metadata"].get("annotations") or {}), st, o["metadata"].get("generation"))

    return strip(a) == strip(b)
