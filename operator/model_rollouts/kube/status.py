"""Status writes through the status subresource: a JSON merge patch of what changed, guarded by
resourceVersion.

The patch carries only the fields of status that differ from the object the decision was made from
(a list that changed is sent whole, as merge patch has it; a field that is gone is sent as null), plus
``metadata.resourceVersion``: the API server applies it only to that very version (409 otherwise), so
the result is exactly the decided status, as a full replace would make it, for a fraction of the bytes.
Kopf's own ``status.kopf`` is never in the patch and so is left as it is.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from model_rollouts.api.common import GROUP, VERSION
from model_rollouts.kube import series_store
from model_rollouts.kube.client import REQUEST_TIMEOUT, api, get_object, sent

log = logging.getLogger("model_rollouts.status")

#: Keys of status that are not ours to write (Kopf's progress storage).
FOREIGN = ("kopf",)


def merge_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The RFC 7386 merge patch that turns ``old`` into ``new`` (mappings compared key by key, any
    other value, lists included, replaced whole; a key missing from ``new`` becomes null)."""
    patch: dict[str, Any] = {}
    for k, v in new.items():
        if k not in old:
            patch[k] = v
        elif isinstance(v, Mapping) and isinstance(old[k], Mapping):
            sub = merge_patch(old[k], v)
            if sub:
                patch[k] = sub
        elif v != old[k] or type(v) is not type(old[k]):
            patch[k] = v
    for k in old:
        if k not in new:
            patch[k] = None
    return patch


def status_patch(obj: Mapping[str, Any], status: Mapping[str, Any]) -> dict[str, Any]:
    """What to send to turn ``obj``'s status (minus Kopf's) into ``status``; {} when nothing changed."""
    old = {k: v for k, v in (obj.get("status") or {}).items() if k not in FOREIGN}
    return merge_patch(old, {k: v for k, v in status.items() if k not in FOREIGN})


def write_status(plural: str, obj: dict[str, Any], status: dict[str, Any]) -> bool:
    """Patch status to ``status`` via the status subresource, guarded by resourceVersion. False on a
    real conflict. Nothing is sent when nothing changed.

    A 409 whose fresh object carries the very status, spec and annotations this decision was made
    from (someone touched only other metadata, or a proxy answered 409) is retried with the fresh
    resourceVersion (the same patch then applies to the same status), and so is a transient 5xx or
    dropped connection (twice): the analysis that led here is recorded rather than thrown away and
    repeated. After a successful write, the analyses it added to ``status.series`` are archived
    (:mod:`model_rollouts.kube.series_store`).
    """
    patch = status_patch(obj, status)
    if not patch:
        return True
    meta = obj["metadata"]
    rv = meta["resourceVersion"]
    for attempt in range(3):
        body = {"metadata": {"resourceVersion": rv}, "status": patch}
        try:
            resp = client.CustomObjectsApi(api()).patch_namespaced_custom_object_status(
                GROUP,
                VERSION,
                meta["namespace"],
                plural,
                meta["name"],
                body,
                _content_type="application/merge-patch+json",
                _request_timeout=REQUEST_TIMEOUT,
                _preload_content=False,
            )
            sent(resp)
            series_store.archive_written(obj, status)
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
        st = {k: v for k, v in (o.get("status") or {}).items() if k not in FOREIGN}
        return (o.get("spec"), (o["metadata"].get("annotations") or {}), st, o["metadata"].get("generation"))

    return strip(a) == strip(b)
