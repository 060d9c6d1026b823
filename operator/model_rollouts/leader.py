"""One active replica: leader election on a coordination.k8s.io Lease.

Every replica runs the same handlers; only the holder of the Lease acts. The holder renews the
Lease every ``retry`` seconds; a standby takes it over once ``renewTime + leaseDurationSeconds``
has passed without a renewal (the holder was SIGKILLed, partitioned or stopped). A holder that
cannot renew stops acting as soon as its own lease would have expired, before anyone else may
take over, so two replicas never act at once while their clocks agree to within the margin.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
import time
import uuid

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from model_rollouts import telemetry

logger = logging.getLogger("model_rollouts.leader")
REQUEST_TIMEOUT = 5


class Elector:
    def __init__(
        self,
        api: client.ApiClient | None,
        namespace: str,
        name: str,
        *,
        lease_seconds: float = 15.0,
        retry_seconds: float = 2.0,
        identity: str | None = None,
    ) -> None:
        self.api, self.namespace, self.name = api, namespace, name
        self.lease_seconds, self.retry_seconds = lease_seconds, retry_seconds
        self.identity = identity or f"{socket.gethostname()}_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        self._valid_until = 0.0  # monotonic time until which this replica may act
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._was_leader = False  # what the last round exported (mlrollouts_leader)
        self._last_contact: float | None = None  # monotonic time of the last round that reached the Lease
        self.enabled = api is not None

    def is_leader(self) -> bool:
        return not self.enabled or time.monotonic() < self._valid_until

    def alive(self) -> bool:
        """False only when election is on and its thread has died (the liveness probe's concern)."""
        return not self.enabled or self._thread is None or self._thread.is_alive() or self._stop.is_set()

    def contact_problem(self) -> str | None:
        """Why this replica cannot count on the API server, or None: with election on, the last
        round trip to the Lease (a renewal, or a standby's read) must be younger than the lease."""
        if not self.enabled:
            return None
        if self._last_contact is None:
            return f"leader election: the Lease {self.namespace}/{self.name} has not been read yet"
        age = time.monotonic() - self._last_contact
        if age > self.lease_seconds:
            return (
                f"leader election: no answer from the API server about the Lease "
                f"{self.namespace}/{self.name} for {age:.0f}s (lease {self.lease_seconds:.0f}s)"
            )
        return None

    def start(self) -> None:
        if not self.enabled:
            # Without election this replica always acts: it is the leader as far as alerts can tell.
            telemetry.LEADER.set(1)
            return
        self._thread = threading.Thread(target=self._run, name="leader-election", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop renewing and hand the Lease back at once, so a standby need not wait for it to expire."""
        self._stop.set()
        was_leader = self.enabled and self.is_leader()
        self._valid_until = 0.0
        if self.enabled:
            self._leading(False)
        if not was_leader or self.api is None:
            return
        co = client.CoordinationV1Api(self.api)
        try:
            lease = co.read_namespaced_lease(self.name, self.namespace, _request_timeout=REQUEST_TIMEOUT)
            if lease.spec and lease.spec.holder_identity == self.identity:
                lease.spec.holder_identity = None
                lease.spec.renew_time = None
                co.replace_namespaced_lease(
                    self.name, self.namespace, lease, _request_timeout=REQUEST_TIMEOUT
                )
        except Exception as e:  # best effort: the lease expires anyway
            logger.info("leader election: release failed: %s", type(e).__name__)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._step()
            self._stop.wait(self.retry_seconds)

    def _step(self) -> None:
        """One election round: acquire or renew, then export what this replica now is."""
        started = time.monotonic()
        try:
            acquired = self._try_acquire_or_renew()
            self._last_contact = started
            if acquired:
                # Act only until our own lease could expire, counted from before the request.
                self._valid_until = started + self.lease_seconds - self.retry_seconds
        except Exception as e:
            status = getattr(e, "status", None)
            logger.warning("leader election: %s%s", type(e).__name__, f" {status}" if status else "")
        self._leading(self.is_leader())

    def _leading(self, now_leader: bool) -> None:
        """Export leadership; a replica that is not the leader exports no per-object series.

        A standby clears them at every round, not only when it loses the Lease: a handler that
        started just before the loss may still set a gauge afterwards.
        """
        if now_leader != self._was_leader:
            logger.info(
                "leader election: %s %s lease %s/%s",
                self.identity,
                "acquired" if now_leader else "lost",
                self.namespace,
                self.name,
            )
            telemetry.LEADER.set(1 if now_leader else 0)
            self._was_leader = now_leader
        if not now_leader:
            telemetry.forget_all()

    def _try_acquire_or_renew(self) -> bool:
        assert self.api is not None
        co = client.CoordinationV1Api(self.api)
        now = dt.datetime.now(dt.UTC)
        try:
            lease = co.read_namespaced_lease(self.name, self.namespace, _request_timeout=REQUEST_TIMEOUT)
        except ApiException as e:
            if e.status != 404:
                raise
            body = client.V1Lease(
                metadata=client.V1ObjectMeta(name=self.name, namespace=self.namespace),
                spec=client.V1LeaseSpec(
                    holder_identity=self.identity,
                    lease_duration_seconds=int(self.lease_seconds),
                    acquire_time=now,
                    renew_time=now,
                    lease_transitions=0,
                ),
            )
            try:
                co.create_namespaced_lease(self.namespace, body, _request_timeout=REQUEST_TIMEOUT)
            except ApiException as e2:
                if e2.status == 409:
                    return False
                raise
            return True
        spec = lease.spec or client.V1LeaseSpec()
        holder = spec.holder_identity
        renew = spec.renew_time or spec.acquire_time
        duration = spec.lease_duration_seconds or int(self.lease_seconds)
        expired = renew is None or (now - renew).total_seconds() > duration
        if holder != self.identity and holder and not expired:
            return False
        if holder != self.identity:
            spec.acquire_time = now
            spec.lease_transitions = (spec.lease_transitions or 0) + 1
            spec.holder_identity = self.identity
        spec.renew_time = now
        spec.lease_duration_seconds = int(self.lease_seconds)
        lease.spec = spec
        try:  # replace carries resourceVersion: a concurrent taker gets 409 and stays standby
            co.replace_namespaced_lease(self.name, self.namespace, lease, _request_timeout=REQUEST_TIMEOUT)
        except ApiException as e:
            if e.status == 409:
                return False
            raise
        return True


#: The process-wide elector; disabled (always leader) until main() configures one.
ELECTOR = Elector(None, "", "")
