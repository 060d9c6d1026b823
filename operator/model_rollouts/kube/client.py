"""The operator's one Kubernetes API client (in-cluster config, else kubeconfig) and object reads."""

from __future__ import annotations

import datetime as dt
import threading
from typing import Any, cast

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from model_rollouts.api.common import GROUP, VERSION

#: Seconds any single Kubernetes API call may take.
REQUEST_TIMEOUT = 10
_api: client.ApiClient | None = None
_lock = threading.Lock()


def api() -> client.ApiClient:
    global _api
    with _lock:
        if _api is None:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            _api = client.ApiClient()
        return _api


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def get_object(plural: str, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        obj = cast(
            dict[str, Any],
            client.CustomObjectsApi(api()).get_namespaced_custom_object(
                GROUP, VERSION, namespace, plural, name, _request_timeout=REQUEST_TIMEOUT
            ),
        )
        return obj
    except ApiException as e:
        if e.status == 404:
            return None
        raise
