"""Peak memory of one query whose answer is about 80 MB (``{__name__=~".+"}`` on a big Prometheus).

A separate process serves a valid Prometheus instant-query answer of ``--mb`` megabytes of series,
streamed without a Content-Length (so the size is only known by reading it). Each mode runs in a
fresh process and reports its peak RSS (``ru_maxrss``) before and after one query:

- ``bounded``: the operator's PrometheusProvider (the body read as a stream, refused beyond
  ``MAX_RESPONSE_BYTES``);
- ``unbounded``: the same client without the limit (how it was before: read whole, parsed, then
  "more than one series" refused).

    python -m tests.bench.bench_query_memory [--mb 80]

Prints one line per mode and a JSON summary last.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SERIES = (
    b'{"metric":{"__name__":"model_requests_total","service":"fraud-v2","pod":"p-%08d"},"value":[1,"1"]},'
)


def serve(mb: int) -> None:
    """Serve the answer on a free port; print the port; run until killed."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            try:
                self.wfile.write(b'{"status":"success","data":{"resultType":"vector","result":[')
                total, i, target = 0, 0, mb * 1_000_000
                while total < target:
                    block = b"".join(SERIES % (i + k) for k in range(1000))
                    self.wfile.write(block)
                    total += len(block)
                    i += 1000
                self.wfile.write(b'{"metric":{},"value":[1,"1"]}]}}')
            except OSError:
                pass  # refused part-way: the client closed the connection

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def measure(mode: str, url: str) -> None:
    from model_rollouts.metrics import prometheus
    from model_rollouts.metrics.prometheus import PrometheusProvider, interpret

    p = PrometheusProvider(url, timeout_s=60)
    if mode == "unbounded":
        p._client._session.hooks["response"] = []
    before = rss_mb()
    t0 = time.monotonic()
    if mode == "bounded":
        result = p.query('{__name__=~".+"}')
    else:
        result = interpret(p._client.custom_query('{__name__=~".+"}'))
    took = time.monotonic() - t0
    print(
        json.dumps(
            {
                "mode": mode,
                "limit_bytes": prometheus.MAX_RESPONSE_BYTES if mode == "bounded" else None,
                "rss_before_mb": round(before, 1),
                "peak_rss_mb": round(rss_mb(), 1),
                "seconds": round(took, 2),
                "outcome": result.outcome,
                "message": result.message,
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=80)
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--measure", default="", help=argparse.SUPPRESS)
    ap.add_argument("--url", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        return serve(args.mb)
    if args.measure:
        return measure(args.measure, args.url)
    server = subprocess.Popen(
        [sys.executable, "-m", "tests.bench.bench_query_memory", "--serve", "--mb", str(args.mb)],
        stdout=subprocess.PIPE,
    )
    try:
        assert server.stdout is not None
        url = f"http://127.0.0.1:{int(server.stdout.readline())}"
        out = []
        for mode in ("bounded", "unbounded"):
            line = subprocess.run(
                [sys.executable, "-m", "tests.bench.bench_query_memory", "--measure", mode, "--url", url],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.strip()
            print(line)
            out.append(json.loads(line))
        print(json.dumps({"answer_mb": args.mb, "peak_rss_mb": {o["mode"]: o["peak_rss_mb"] for o in out}}))
    finally:
        server.kill()
        server.wait()


if __name__ == "__main__":
    main()
