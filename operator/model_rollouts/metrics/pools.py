"""Where measurements run: a small thread pool per tenant budget (provider and namespace).

The operator's handler threads never wait on a query: a due analysis is submitted here and the
object's next wake-up (half a second later) picks up the result. Each budget key has its own
pool of :data:`WORKERS` threads, so one tenant's slow or numerous queries queue behind each
other and never behind (or in front of) another tenant's, nor take the threads that move traffic.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

#: Measurements of one budget key that run at once; the rest of that key's wait in its own queue.
WORKERS = 4
#: Budget keys with a pool; beyond this the least recently used idle pool is shut down.
MAX_POOLS = 256

T = TypeVar("T")


class _Pool:
    def __init__(self, key: str) -> None:
        self.executor = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix=f"measure-{key[:40]}")
        self.pending = 0


_pools: OrderedDict[str, _Pool] = OrderedDict()
_lock = threading.Lock()


def submit(key: str, fn: Callable[[], T]) -> Future[T]:
    """Run ``fn`` in the pool of budget ``key``; its exception, if any, is the future's."""
    with _lock:
        pool = _pools.get(key)
        if pool is None:
            if len(_pools) >= MAX_POOLS:
                for old_key, old in list(_pools.items()):
                    if old.pending == 0:
                        old.executor.shutdown(wait=False)
                        del _pools[old_key]
                        break
            pool = _pools[key] = _Pool(key)
        _pools.move_to_end(key)
        pool.pending += 1

    def done(_: Future[T]) -> None:
        with _lock:
            pool.pending -= 1

    future = pool.executor.submit(fn)
    future.add_done_callback(done)
    return future


def pending(key: str) -> int:
    """Measurements of ``key`` queued or running (for tests and the log)."""
    with _lock:
        pool = _pools.get(key)
        return pool.pending if pool else 0
