"""The operator's one Kubernetes API client (in-cluster config, else kubeconfig) and object reads."""

from __future__ import annotations

import contextlib
import datetime as dt
import threading
from typing import Any, cast

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from model_rollouts.api.common import GROUP, VERSION

#: Seconds any single Kubernetes API call may take.
REQUEST_TIMEOUT = 10
#: Pooled connections to the API server.
CONNECTIONS = 32
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
            cfg = client.Configuration.get_default_copy()
            # As many pooled connections as threads that call the API server at once (the scheduler's
            # workers, the measurement pools, notifications): a smaller pool drops connections under
            # load and pays a TLS handshake for each new one, on both sides.
            cfg.connection_pool_maxsize = CONNECTIONS
            _api = client.ApiClient(cfg)
        return _api


def sent(response: Any) -> None:
    """Read and release the answer of a write whose body the operator does not use (made with
    ``_preload_content=False``: the kubernetes client then skips building models from the body, a
    twentieth of the operator's CPU at a thousand objects). Errors were already raised as ApiException."""
    with contextlib.suppress(Exception):
        response.read()
        response.release_conn()


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
