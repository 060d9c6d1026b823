"""Run one test module or test id N times in a row, each run a fresh pytest process with its own
real stack, and report how many runs passed: ``make test-repeat T=... N=10 [J=2]``.

Used to show that a real-stack test holds, not only that it passed once. Every run's outcome
and wall time is printed; the run stops at the first failure unless ``--keep-going`` is given,
and its output is kept in ``.run/repeat/run-K.log``. Exit status 0 only if every run passed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.harness.procs import REPO


def _one(k: int, targets: list[str], logdir: Path) -> tuple[int, bool, float, str]:
    t0 = time.monotonic()
    log = logdir / f"run-{k}.log"
    with log.open("w") as out:
        rc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *targets],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            check=False,
        ).returncode
    lines = [ln for ln in log.read_text().splitlines() if ln.strip()]
    return k, rc == 0, time.monotonic() - t0, lines[-1] if lines else ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--count", type=int, default=10)
    ap.add_argument("--jobs", type=int, default=1, help="runs at once (each has its own stack)")
    ap.add_argument("--keep-going", action="store_true")
    ap.add_argument("targets", nargs="+")
    a = ap.parse_args(argv)
    logdir = REPO / ".run" / "repeat"
    logdir.mkdir(parents=True, exist_ok=True)
    passed = failed = 0
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:
        pending = [pool.submit(_one, k, a.targets, logdir) for k in range(1, a.count + 1)]
        for fut in pending:
            k, ok, secs, last = fut.result()
            passed, failed = passed + ok, failed + (not ok)
            print(f"run {k}/{a.count}: {'PASS' if ok else 'FAIL'} in {secs:.0f}s  {last}", flush=True)
            if not ok and not a.keep_going:
                for other in pending:
                    other.cancel()
                print(f"stopped at the first failure; its output: {logdir / f'run-{k}.log'}")
                break
    total = time.monotonic() - started
    print(f"{' '.join(a.targets)}: {passed} of {a.count} runs passed in a row, {failed} failed, {total:.0f}s")
    return 0 if failed == 0 and passed == a.count else 1


if __name__ == "__main__":
    sys.exit(main())
