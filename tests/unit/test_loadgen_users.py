"""loadgen's simulated users: an id header per user, a cookie jar per user, fixed headers."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.harness.loadgen import VIA_BACKEND_HEADER, LoadGenerator, build_arg_parser


class Recorder(ThreadingHTTPServer):
    """Answers /predict like a proxy with cookie affinity: the first answer to a user sets its arm."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.seen: list[dict[str, str]] = []
        self.turn = 0


class _Handler(BaseHTTPRequestHandler):
    server: Recorder
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {k.lower(): v for k, v in self.headers.items()}
        cookie = headers.get("cookie", "")
        with self.server.lock:
            self.server.seen.append(headers)
            self.server.turn += 1
            fresh = "arm=" not in cookie
            arm = ("a" if self.server.turn % 2 else "b") if fresh else cookie.split("arm=")[1].split(";")[0]
        payload = json.dumps({"request_id": "x"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header(VIA_BACKEND_HEADER, arm)
        if fresh:
            self.send_header("Set-Cookie", f"arm={arm}; Path=/; Max-Age=60")
            self.send_header("Set-Cookie", "other=1")
        self.end_headers()
        self.wfile.write(payload)


def test_users_send_their_id_and_their_cookies_back_and_stay_on_their_arm() -> None:
    server = Recorder()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        gen = LoadGenerator(
            None,
            "ml",
            "model",
            {"a": "http://127.0.0.1:1", "b": "http://127.0.0.1:2"},
            rps=40,
            max_seconds=20,
            max_requests=10 * 6,
            workers=4,
            feedback=False,
            via=f"http://127.0.0.1:{server.server_address[1]}",
            users=10,
            cookies=True,
            headers={"X-Tester": "yes"},
        )
        with gen:
            assert gen.wait(timeout=25), gen.stats()
    finally:
        server.shutdown()
        server.server_close()
    assert gen.stats()["total_sent"] == 60 and gen.stats()["dropped"] == 0
    ids = [h["x-user-id"] for h in server.seen]
    assert sorted(set(ids)) == sorted(f"user-{i}" for i in range(10))
    assert all(ids.count(u) == 6 for u in set(ids))
    assert all(h["x-tester"] == "yes" for h in server.seen)
    # After its first answer every user sends back both cookies it was given.
    later = [h for h in server.seen if "cookie" in h]
    assert len(later) == 50 and all("other=1" in h["cookie"] and "arm=" in h["cookie"] for h in later)
    per_user = gen.user_backends
    assert len(per_user) == 10 and all(
        len(arms) == 1 and sum(arms.values()) == 6 for arms in per_user.values()
    )


def test_without_users_no_id_and_no_cookies_are_sent() -> None:
    gen = LoadGenerator(None, "ml", "m", {"a": "http://127.0.0.1:1"}, rps=1, max_seconds=1, max_requests=1)
    assert gen._request_headers(None) == {}
    assert gen.user_backends == {}


def test_user_flags_are_parsed() -> None:
    base = ["--kubeconfig", "k", "--namespace", "ml", "--httproute", "r", "--backend", "a=http://127.0.0.1:1"]
    args = build_arg_parser().parse_args([*base, "--users", "200", "--cookies", "--header", "X-Tester=yes"])
    assert args.users == 200 and args.cookies and dict(args.header) == {"X-Tester": "yes"}
