"""Prometheus metric provider, through prometheus-api-client."""

from __future__ import annotations

import math

import requests
from prometheus_api_client import PrometheusApiClientException, PrometheusConnect
from urllib3.util.retry import Retry

from model_rollouts.metrics.provider import Result


class PrometheusProvider:
    def __init__(
        self, address: str, *, timeout_s: int = 5, token: str | None = None, verify_tls: bool = True
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else None
        self._client = PrometheusConnect(
            url=address.rstrip("/"),
            headers=headers,
            disable_ssl=not verify_tls,
            retry=Retry(total=0),
            timeout=timeout_s,
        )
        self.address = address

    def query(self, promql: str) -> Result:
        try:
            data = self._client.custom_query(promql)
        except (requests.RequestException, PrometheusApiClientException, ValueError) as e:
            # A fixed description only: a remote body or a header never reaches status or logs.
            return Result("error", message=f"query failed: {type(e).__name__}")
        except Exception as e:
            return Result("error", message=f"query failed: {type(e).__name__}")
        return interpret(data)


def interpret(data: object) -> Result:
    """Turn a Prometheus instant-query result into one of the four outcomes."""
    if not isinstance(data, list):
        return Result("error", message=f"unexpected result type {type(data).__name__}")
    if not data:
        return Result("noData", message="the query returned no series")
    if isinstance(data[0], dict):  # instant vector
        if len(data) > 1:
            return Result(
                "error", message=f"the query returned {len(data)} series; aggregate it to one (sum)"
            )
        sample = data[0].get("value")
    elif len(data) == 2:  # scalar: [timestamp, "value"]
        sample = data
    else:
        return Result("error", message=f"unexpected result type {type(data).__name__}")
    if not sample or len(sample) != 2:
        return Result("error", message="malformed sample")
    try:
        value = float(sample[1])
    except (TypeError, ValueError):
        return Result("error", message=f"non-numeric value {sample[1]!r}")
    if not math.isfinite(value):
        return Result("nan", value=None, message=f"the query returned {sample[1]}")
    return Result("value", value=value)
