"""Entry point: ``model-rollouts [--namespace NS ...] [--metrics-port 8080]``."""

from __future__ import annotations

import argparse
import logging
from typing import Any

import kopf
from prometheus_client import start_http_server


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Kopf's own bookkeeping goes to our status, never to the user's annotations.
    settings.persistence.progress_storage = kopf.StatusProgressStorage(field="status.kopf.progress")
    settings.persistence.diffbase_storage = kopf.StatusDiffBaseStorage(field="status.kopf.diffbase")
    settings.persistence.finalizer = "mlrollouts.io/finalizer"
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 60
    settings.networking.request_timeout = 30


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="model-rollouts", description="The Model Rollouts operator.")
    parser.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=[],
        help="namespace to watch (repeatable); default: all namespaces",
    )
    parser.add_argument("--metrics-port", type=int, default=8080, help="port of /metrics; 0 disables")
    parser.add_argument("--metrics-address", default="0.0.0.0")
    parser.add_argument(
        "--liveness", default="http://0.0.0.0:8081/healthz", help="Kopf liveness endpoint URL; empty disables"
    )
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Kopf reports every timer run at INFO; our own decisions are logged under model_rollouts.
    logging.getLogger("kopf.objects").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    if args.metrics_port:
        start_http_server(args.metrics_port, addr=args.metrics_address)
    from model_rollouts.handlers import experiment, rollout  # noqa: F401  (registers the handlers)

    kopf.run(
        standalone=True,
        namespaces=list(args.namespace),
        clusterwide=not args.namespace,
        liveness_endpoint=args.liveness or None,
    )


if __name__ == "__main__":
    main()
