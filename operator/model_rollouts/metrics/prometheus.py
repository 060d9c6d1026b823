"""Prometheus metric provider, through prometheus-api-client."""

from __future__ import annotations

import itertools
import math
import os
import re
import threading
import time
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from typing import Any
from urllib.parse import quote_plus, urlsplit

import requests
from prometheus_api_client import PrometheusApiClientException, PrometheusConnect
from urllib3.util.retry import Retry

from model_rollouts.metrics.provider import MAX_SERIES, Result, Vector, redact

#: Largest query response (after decompression) that is read; a longer one is refused while it is
#: being read, never held or parsed whole (``--max-query-response-bytes``). One series is a few
#: hundred bytes; 1 MiB leaves room for any single-series answer.
MAX_RESPONSE_BYTES = 1 << 20
#: Longest error body kept (only its HTTP status is ever shown).
_ERROR_BODY_BYTES = 4096

#: Subqueries sent in one batched request at most (see :meth:`PrometheusProvider.query_many`).
MAX_BATCH = 16
#: Longest batched query, URL-encoded: the library sends it in the URL (prometheus-api-client 0.7 has no
#: form body), and a proxy in front of Prometheus may refuse a request line over 8 KiB.
MAX_BATCH_URL = 6000
#: Longest a batched request may wait for its answer, however many subqueries it carries (the
#: shortest analysis budget, metrics/resolve.py ANALYSIS_BUDGET; a per-query timeout is at most 30 s).
MAX_BATCH_SECONDS = 30.0
#: The label a batched query gives each subquery's series (its index); dropped from the answer.
BATCH_LABEL = "mlrollouts_q"
#: Answers to a batched request after which each subquery is asked alone, as without batching: the
#: request as a whole was refused (400 bad_data: a subquery is a scalar, a string or a range vector,
#: which label_replace refuses; 422 execution: the sample limit, two series made equal; 413, 414 and
#: 431: too long for a proxy) or its answer was too large. A timeout, a connection error or any other
#: answer (503: Prometheus overloaded or its query timeout) is every subquery's failure: one by one
#: would only multiply the wait.
REFUSED = frozenset({400, 413, 414, 422, 431})


class ResponseTooLarge(Exception):
    """The response exceeded its limit (MAX_RESPONSE_BYTES per query); its text is fixed."""


#: (read timeout, size limit) of the request being sent from this context, when not the provider's
#: per-query ones (a batched request: both times its number of subqueries).
_LIMITS: ContextVar[tuple[float, int] | None] = ContextVar("prometheus_limits", default=None)


def _bounded_body(timeout_s: float) -> Any:
    """A requests response hook that reads the body as a stream, at most MAX_RESPONSE_BYTES (decoded),
    within ``timeout_s`` in total (the client's own timeout is per socket read), and stores it as the
    response's content, so the Prometheus client parses only what was allowed in. A batched request
    sets both limits for itself (``_LIMITS``)."""

    def hook(r: requests.Response, *args: object, **kwargs: object) -> requests.Response:
        seconds, most = _LIMITS.get() or (timeout_s, MAX_RESPONSE_BYTES)
        limit = most if r.status_code == 200 else _ERROR_BODY_BYTES
        length = r.headers.get("Content-Length", "")
        if r.status_code == 200 and length.isdigit() and int(length) > limit:
            r.close()
            raise ResponseTooLarge()
        deadline = time.monotonic() + seconds
        buf = bytearray()
        try:
            # read1: what has arrived, never waiting for a whole chunk (the deadline is checked often)
            while chunk := r.raw.read1(65536, decode_content=True):
                buf += chunk
                if len(buf) > limit:
                    if r.status_code != 200:
                        del buf[limit:]  # an error page: its status is all that is kept
                        break
                    raise ResponseTooLarge()
                if time.monotonic() > deadline:
                    raise requests.Timeout()
        finally:
            r.close()
        r._content = bytes(buf)  # what .json() and .content read from now on
        return r

    return hook


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
        self.address, self.timeout_s = address, timeout_s
        session = requests.Session()
        session.verify = verify_tls  # False, True or the path of a CA bundle
        session.max_redirects = 0  # an allowed address may not send the query (or a token) elsewhere
        session.hooks["response"] = [_bounded_body(timeout_s)]
        # The environment (HTTP(S)_PROXY, NO_PROXY, REQUESTS_CA_BUNDLE, ~/.netrc) is read once
        # here, not on every query: requests would otherwise stat ~/.netrc per request, which at a
        # thousand objects was a tenth of the operator's query CPU.
        session.proxies = requests.utils.get_environ_proxies(address)
        if verify_tls is True:
            session.verify = os.environ.get("REQUESTS_CA_BUNDLE") or True
        session.trust_env = False
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

    def query(self, promql: str, budget: str | None = None) -> Result:
        """One instant query, within the ``budget`` (a tenant's key, e.g. provider and namespace; default:
        the address): a key that timed out or was refused is not waited on again (see _Gate), and that
        cool-down, concurrency and "slow" mark are the key's alone, never another tenant's."""
        data, failed, _ = self._ask(promql, budget)
        return failed if failed is not None else interpret(data)

    def query_many(self, promqls: Sequence[str], budget: str | None = None) -> list[Result]:
        """Each query's :meth:`query` outcome, asked in one HTTP request (per MAX_BATCH subqueries and
        MAX_BATCH_URL characters): see :func:`batched_query` and :func:`split_batch`.

        Every subquery is evaluated at the same instant. A repeated query is asked once. A request
        refused as a whole (REFUSED, or too large an answer) asks each query alone, as without
        batching; any other failure (timeout, connection, open gate) is every query's outcome."""
        unique = list(dict.fromkeys(promqls))
        answers: dict[str, Result] = {}
        for chunk in _chunks(unique):
            answers.update(zip(chunk, self._query_chunk(chunk, budget), strict=True))
        return [answers[q] for q in promqls]

    def _query_chunk(self, chunk: list[str], budget: str | None) -> list[Result]:
        if len(chunk) == 1:  # no rewrite: exactly the single query
            return [self.query(chunk[0], budget)]
        data, failed, refused = self._ask(batched_query(chunk), budget, len(chunk))
        if failed is None:
            return split_batch(data, len(chunk))
        if refused:
            return [self.query(q, budget) for q in chunk]
        return [failed] * len(chunk)

    def query_vector(self, promql: str, labels: tuple[str, ...], budget: str | None = None) -> Vector:
        """One instant query answered by one series per combination of ``labels`` (see
        :func:`interpret_vector`), within the ``budget`` as :meth:`query`."""
        data, failed, _ = self._ask(promql, budget)
        if failed is not None:
            return Vector(failed.outcome, message=failed.message)
        return interpret_vector(data, labels)

    def _ask(self, promql: str, budget: str | None, n: int = 1) -> tuple[object, Result | None, bool]:
        """The parsed answer, or the failure as an ``error`` Result with a fixed text, and whether the
        request was refused as a whole (see REFUSED). ``n``: the subqueries it carries (a batched
        request): its timeout, response-size limit and "slow" mark are ``n`` times one query's
        (the timeout and mark at most MAX_BATCH_SECONDS)."""
        if self.unusable:
            return None, Result("error", message=self.unusable), False
        gate = _gate(budget or _address_key(self.address))
        seconds = min(self.timeout_s * n, max(self.timeout_s, MAX_BATCH_SECONDS))
        ticket, why = _enter(gate, min(SLOW_SECONDS * n, max(SLOW_SECONDS, MAX_BATCH_SECONDS)))
        if ticket is None:
            return None, Result("error", message=f"query failed: {why}"), False
        failure = None
        limits = _LIMITS.set(None if n == 1 else (seconds, MAX_RESPONSE_BYTES * n))
        try:
            return self._client.custom_query(promql, timeout=seconds), None, False
        except ResponseTooLarge:
            return (
                None,
                Result(
                    "error",
                    message=f"query failed: the response is larger than {MAX_RESPONSE_BYTES} bytes; "
                    "aggregate the query to one series (sum; a judge's query: sum by the labels it needs)",
                ),
                True,
            )
        except PrometheusApiClientException as e:
            # The exception text quotes the response body: only the HTTP status is kept.
            code = _code(str(e))
            shown = f" (HTTP {code})" if code else ""
            return None, Result("error", message=f"query failed: {type(e).__name__}{shown}"), code in REFUSED
        except requests.exceptions.SSLError as e:  # this provider's TLS settings, not the address's health
            return None, Result("error", message=f"query failed: {type(e).__name__}"), False
        except (requests.Timeout, requests.ConnectionError) as e:
            failure = type(e).__name__
            return None, Result("error", message=f"query failed: {failure}"), False
        except Exception as e:
            # A fixed description only: a remote body or a header never reaches status or logs.
            return None, Result("error", message=f"query failed: {type(e).__name__}"), False
        finally:
            _LIMITS.reset(limits)
            _leave(gate, ticket, failure)

    def close(self) -> None:
        self._client.close()


#: A provider address whose query timed out or could not connect is not asked again for this long:
#: every object's query to it fails at once (``provider unavailable``) instead of waiting.
COOLDOWN_SECONDS = 5.0
#: Once a query to an address has been pending this long, no other query joins it (``provider slow``).
SLOW_SECONDS = 5.0
#: Queries in flight at once to an address; after a failure, one (a probe) until it answers again.
MAX_INFLIGHT = 4


class _Gate:
    """Per budget key (a tenant's use of a provider): queries in flight, whether it has answered, and
    any cool-down."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.inflight: dict[int, float] = {}  # ticket -> when that request counts as slow
        self.answered = True  # until a query to it times out or cannot connect
        self.down_until = 0.0
        self.reason = ""


_gates: dict[str, _Gate] = {}
_gates_lock = threading.Lock()
_tickets = itertools.count()


#: Budget keys kept; beyond this, idle keys (nothing in flight, no cool-down) are forgotten.
MAX_GATES = 1024


def _address_key(address: str) -> str:
    parts = urlsplit(address)
    return f"{parts.scheme}://{parts.netloc}"


def _gate(key: str) -> _Gate:
    with _gates_lock:
        gate = _gates.get(key)
        if gate is None:
            if len(_gates) >= MAX_GATES:
                now = time.monotonic()
                for k in [k for k, g in _gates.items() if not g.inflight and g.down_until <= now]:
                    del _gates[k]
            gate = _gates[key] = _Gate()
        return gate


def _enter(gate: _Gate, patience: float = SLOW_SECONDS) -> tuple[int | None, str]:
    """A ticket to send a query, or a fixed reason not to (never waiting longer than SLOW_SECONDS).

    A request counts as slow ``patience`` seconds after it was sent (a batched one: its subqueries'
    SLOW_SECONDS together, see :meth:`PrometheusProvider._ask`)."""
    with gate.cond:
        while True:
            now = time.monotonic()
            if now < gate.down_until:
                return (
                    None,
                    f"provider unavailable ({gate.reason}); not asked for {COOLDOWN_SECONDS:.0f}s after that",
                )
            slow_at = min(gate.inflight.values(), default=None)
            if slow_at is not None and now >= slow_at:
                return None, f"provider slow: a query to it has been pending for over {SLOW_SECONDS:.0f}s"
            if len(gate.inflight) < (MAX_INFLIGHT if gate.answered else 1):
                ticket = next(_tickets)
                gate.inflight[ticket] = now + patience
                return ticket, ""
            if not gate.answered or slow_at is None:
                return None, f"provider not answering ({gate.reason}); one probe at a time is pending"
            gate.cond.wait(max(0.01, slow_at - now))


def _leave(gate: _Gate, ticket: int, failure: str | None) -> None:
    with gate.cond:
        gate.inflight.pop(ticket, None)
        if failure is None:
            gate.answered, gate.down_until = True, 0.0
        else:
            gate.answered, gate.down_until, gate.reason = False, time.monotonic() + COOLDOWN_SECONDS, failure
        gate.cond.notify_all()


def _code(text: str) -> int | None:
    """The HTTP status of a PrometheusApiClientException's text (the only part of it kept)."""
    m = re.match(r"HTTP Status Code (\d{3})", text)
    return int(m.group(1)) if m else None


def batched_query(promqls: Sequence[str]) -> str:
    """One instant query that answers every one of ``promqls`` at the same instant: each subquery's
    series get its index as label BATCH_LABEL (``label_replace``), and ``or`` keeps them all, since
    that label differs. Each subquery stands on its own lines, so a ``#`` comment in it ends there."""
    return " or ".join(
        f'label_replace((\n{q}\n), "{BATCH_LABEL}", "{i}", "", "")' for i, q in enumerate(promqls)
    )


def split_batch(data: object, n: int) -> list[Result]:
    """Each subquery's outcome from the answer to :func:`batched_query` of ``n`` queries: its series
    (BATCH_LABEL dropped) read by :func:`interpret`, as its own query's answer would be (none: noData)."""
    malformed = [Result("error", message="malformed answer to a batched query")] * n
    if not isinstance(data, list):
        return malformed
    parts: list[list[object]] = [[] for _ in range(n)]
    for item in data:
        metric = item.get("metric") if isinstance(item, dict) else None
        if not isinstance(item, dict) or not isinstance(metric, dict):
            return malformed
        index = metric.get(BATCH_LABEL)
        if not isinstance(index, str) or not index.isdigit() or int(index) >= n:
            return malformed
        rest = {k: v for k, v in metric.items() if k != BATCH_LABEL}
        parts[int(index)].append({**item, "metric": rest})
    return [interpret(p) for p in parts]


def _chunks(promqls: list[str]) -> Iterator[list[str]]:
    """``promqls`` in order, in batches of at most MAX_BATCH and MAX_BATCH_URL encoded characters (a
    query longer than that alone goes alone)."""
    chunk: list[str] = []
    size = 0
    for q in promqls:
        more = len(quote_plus(batched_query([q]))) + len(" or ")
        if chunk and (len(chunk) >= MAX_BATCH or size + more > MAX_BATCH_URL):
            yield chunk
            chunk, size = [], 0
        chunk.append(q)
        size += more
    if chunk:
        yield chunk


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


def interpret_vector(data: object, labels: tuple[str, ...]) -> Vector:
    """Turn an instant-vector answer into one of the four outcomes, keyed by the values of ``labels``.

    ``error`` for a scalar, a series without one of ``labels``, two series with the same values of them
    (the query did not aggregate by them), a non-numeric value or more than MAX_SERIES series; ``nan``
    if any value is NaN or infinite; ``noData`` without series.
    """
    if not isinstance(data, list):
        return Vector("error", message=f"unexpected result type {type(data).__name__}")
    if not data:
        return Vector("noData", message="the query returned no series")
    by = ", ".join(labels)
    if not isinstance(data[0], dict):
        return Vector("error", message=f"the query returned a scalar; it must return one series per ({by})")
    if len(data) > MAX_SERIES:
        return Vector("error", message=f"the query returned {len(data)} series, more than {MAX_SERIES}")
    out: dict[tuple[str, ...], float] = {}
    for item in data:
        metric = item.get("metric") if isinstance(item, dict) else None
        sample = item.get("value") if isinstance(item, dict) else None
        if not isinstance(metric, dict) or not isinstance(sample, list) or len(sample) != 2:
            return Vector("error", message="malformed sample")
        values = [metric.get(name) for name in labels]
        missing = next((n for n, v in zip(labels, values, strict=True) if not isinstance(v, str)), None)
        if missing is not None:
            return Vector("error", message=f"a series has no label {missing}; aggregate with sum by ({by})")
        key = tuple(str(v) for v in values)
        if key in out:
            shown = redact(",".join(key))
            return Vector("error", message=f"two series share ({by}) = {shown}; aggregate with sum by ({by})")
        try:
            value = float(sample[1])
        except (TypeError, ValueError):
            return Vector("error", message="non-numeric value")
        if not math.isfinite(value):
            return Vector("nan", message=f"the series ({by}) = {redact(','.join(key))} is {value}")
        out[key] = value
    return Vector("value", series=out)
