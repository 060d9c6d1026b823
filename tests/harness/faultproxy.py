"""A TLS-terminating HTTP proxy in front of the real kube-apiserver that injects faults for real.

The operator is pointed at the proxy (a kubeconfig whose server is the proxy); the proxy forwards
every request to the API server and, by the rules set at run time, answers instead with a 5xx or a
409, adds latency, or drops the connection. Watches are streamed through untouched (unless
dropped), so Kopf keeps working. It serves the API server's own certificate (issued for
127.0.0.1), so clients verify it with the cluster CA as usual. Listens on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
import ssl
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web

from tests.harness.procs import free_port

_HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}


@dataclass
class Faults:
    """Probabilities per request; ``writes`` limits 5xx/409 to PATCH/PUT (the decision writes)."""

    error5xx: float = 0.0
    conflict409: float = 0.0
    latency: float = 0.0
    latency_seconds: float = 1.0
    drop: float = 0.0
    writes_only: bool = True
    #: Inject each fault with a probability > 0 at the first request it can apply to, then by chance:
    #: a test that asserts each fault happened does not depend on how many writes the operator makes.
    ensure_each: bool = False


@dataclass
class FaultProxy:
    upstream: str
    pki: Path
    seed: int = 7
    faults: Faults = field(default_factory=Faults)
    injected: Counter[str] = field(default_factory=Counter)
    port: int = 0
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        self.port = free_port()
        self._rng = random.Random(self.seed)
        started = threading.Event()
        self._loop = asyncio.new_event_loop()

        def run() -> None:
            assert self._loop is not None
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self._serve())
            started.set()
            self._loop.run_forever()
            # Finish every handler here, on this thread. Left pending, they would be finalised later by
            # the garbage collector inside some other test, which on CPython 3.11 can break pytest's own
            # traceback rendering (an ast.parse re-entered from a finaliser raises SystemError).
            pending = asyncio.all_tasks(self._loop)
            for task in pending:
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

        self._thread = threading.Thread(target=run, name="fault-proxy", daemon=True)
        self._thread.start()
        if not started.wait(15):
            raise RuntimeError("fault proxy did not start")
        return self

    async def _serve(self) -> None:
        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_ctx.load_cert_chain(self.pki / "server.crt", self.pki / "server.key")
        self._client_ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_read=None), auto_decompress=False
        )
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=server_ctx).start()

    def _roll(self, p: float, kind: str = "") -> bool:
        if p > 0 and self.faults.ensure_each and kind and not self.injected[kind]:
            return True
        return p > 0 and self._rng.random() < p

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        f = self.faults
        is_write = request.method in ("PATCH", "PUT", "POST", "DELETE")
        is_watch = request.query.get("watch") in ("true", "1")
        eligible = (is_write or not f.writes_only) and not is_watch
        body = await request.read()
        if not is_watch and self._roll(f.latency):
            self.injected["latency"] += 1
            await asyncio.sleep(f.latency_seconds)
        if eligible and self._roll(f.drop, "drop"):
            self.injected["drop"] += 1
            if request.transport is not None:
                request.transport.close()
            raise web.HTTPInternalServerError()  # never reaches the client: the connection is gone
        if eligible and self._roll(f.error5xx, "5xx"):
            self.injected["5xx"] += 1
            return _status(503, "ServiceUnavailable", "injected by the fault proxy")
        if eligible and request.method in ("PATCH", "PUT") and self._roll(f.conflict409, "409"):
            self.injected["409"] += 1
            return _status(409, "Conflict", "injected by the fault proxy: the object has been modified")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        async with self._session.request(
            request.method,
            self.upstream + request.path_qs,
            headers=headers,
            data=body or None,
            ssl=self._client_ctx,
            skip_auto_headers=("Content-Type", "User-Agent", "Accept-Encoding"),  # forward exactly what came
        ) as upstream:
            out = web.StreamResponse(status=upstream.status)
            for k, v in upstream.headers.items():
                if k.lower() not in _HOP:
                    out.headers[k] = v
            try:
                await out.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await out.write(chunk)
                await out.write_eof()
            except (ConnectionError, aiohttp.ClientError):
                pass  # the client went away (a watch closed): nothing to forward to
            return out

    def stop(self) -> None:
        if self._loop is None:
            return

        async def shutdown() -> None:
            if self._runner is not None:
                await self._runner.cleanup()
            await self._session.close()

        with contextlib.suppress(Exception):  # open watches may keep the cleanup waiting: stop anyway
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._loop = None
        gc.collect()  # anything left is finalised now, not in the middle of a later test


def _status(code: int, reason: str, message: str) -> web.Response:
    return web.json_response(
        {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "reason": reason}
        | {"code": code},
        status=code,
    )
