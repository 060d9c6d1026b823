"""Prometheus metric provider, through prometheus-api-client."""

from __future__ import annotations

import math
import re

import requests
from prometheus_api_client import PrometheusApiClientException, PrometheusConnect
from urllib3.util.retry import Retry

from model_rollouts.metrics.provider import Result


class PrometheusProvider:
    """One Prometheus HTTP API. Redirects are not followed, and nothing from an answer but the
    exception class (or the parsed number) ever leaves :meth:`query`."""

    def __init__(
        self,
        address: str,
        *,
        timeout_s: float = 5,
        token: str | None = None,
        verify_tls: bool | str = True,
    ) -> None:
        self.address = address
        session = requests.Session()
        session.verify = verify_tls  # False, True or the path of a CA bundle
        session.max_redirects = 0  # an allowed address may not send the query (or a token) elsewhere
        self.unusable: str | None = None
        headers = None
        if token is not None:
            token = token.strip()
            if not token or any(not c.isprintable() or c.isspace() for c in token):
                # A multi-line value (a key, a kubeconfig) cannot be a header; never try to send it,
                # since the HTTP library's error would quote it.
                self.unusable = "credential unusable: not a single line of printable characters"
            else:
                headers = {"Authorization": f"Bearer {token}"}
        self._client = PrometheusConnect(
            url=address.rstrip("/"),
            headers=headers,
            retry=Retry(total=0, redirect=0),
            session=session,
            timeout=timeout_s,
        )

    def query(self, promql: str) -> Result:
        if self.unusable:
            return Result("error", message=self.unusable)
        try:
            data = self._client.custom_query(promql)
        except PrometheusApiClientException as e:
            # The exception text quotes the response body: only the HTTP status is kept.
            return Result("error", message=f"query failed: {type(e).__name__}{_status(str(e))}")
        except Exception as e:
            # A fixed description only: a remote body or a header never reaches status or logs.
            return Result("error", message=f"query failed: {type(e).__name__}")
        return interpret(data)

    def close(self) -> None:
        self._client.close()


def _status(text: str) -> str:
    m = re.match(r"HTTP Status Code (\d{3})", text)
    return f" (HTTP {m.group(1)})" if m else ""


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
        return Result("error", message="non-numeric value")
    if not math.isfinite(value):
        return Result("nan", value=None, message=f"the query returned {value}")
    return Result("value", value=value)
