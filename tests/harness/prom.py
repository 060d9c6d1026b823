"""The real Prometheus server (Debian package ``prometheus``) on loopback, for tests and the demo.

A generated config scrapes the model servers (labelled by variant, service and namespace)
and optionally the operator's own metrics, every second, into a fresh TSDB per run.
It can be stopped and started again on the same port and data, to test "no data" handling.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness.cluster import MissingComponent
from tests.harness.procs import LOOPBACK, free_port, spawn, stop_proc, wait_until


@dataclass(frozen=True)
class Target:
    job: str
    address: str  # host:port
    labels: dict[str, str] = field(default_factory=dict)
    #: This job's scrape interval (None: the Prometheus's own, 1 s in tests).
    scrape_interval: str | None = None


def find_prometheus() -> Path:
    found = shutil.which("prometheus") or (
        "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None
    )
    if not found:
        raise MissingComponent("prometheus not found on PATH: `apt-get install prometheus` (Debian package)")
    return Path(found)


def _seconds(duration: str) -> float:
    """Seconds of a Prometheus duration such as "1s", "30s", "2m"."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    for unit in ("ms", "s", "m", "h"):
        if duration.endswith(unit) and duration[: -len(unit)].replace(".", "", 1).isdigit():
            return float(duration[: -len(unit)]) * units[unit]
    raise ValueError(f"not a duration: {duration!r}")


def render_config(targets: list[Target], scrape_interval: str = "1s", rule_files: Sequence[Path] = ()) -> str:
    jobs: dict[str, list[Target]] = {}
    for t in targets:
        jobs.setdefault(t.job, []).append(t)
    cfg = {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "rule_files": [str(f) for f in rule_files],
        "scrape_configs": [
            {
                "job_name": job,
                "scrape_interval": ts[0].scrape_interval or scrape_interval,
                "scrape_timeout": min(
                    ts[0].scrape_interval or scrape_interval, scrape_interval, key=_seconds
                ),
                "static_configs": [{"targets": [t.address], "labels": t.labels} for t in ts],
            }
            for job, ts in jobs.items()
        ],
    }
    return json.dumps(cfg, indent=2)  # JSON is valid YAML


@dataclass
class Prometheus:
    targets: list[Target]
    workdir: Path | None = None
    port: int = 0
    scrape_interval: str = "1s"
    #: Rules files (recording and alerting rules) Prometheus loads and evaluates every scrape_interval.
    rule_files: list[Path] = field(default_factory=list)
    _proc: subprocess.Popen[bytes] | None = None
    _own: bool = False

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self, timeout: float = 30.0) -> Prometheus:
        binary = find_prometheus()
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="mr-prom-"))
            self._own = True
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port()
        cfg = self.workdir / "prometheus.yml"
        cfg.write_text(render_config(self.targets, self.scrape_interval, self.rule_files))
        log = self.workdir / "prometheus.log"
        self._proc = spawn(
            [
                str(binary),
                f"--config.file={cfg}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address={LOOPBACK}:{self.port}",
                "--web.enable-lifecycle",
                "--storage.tsdb.retention.time=1d",
                "--log.level=warn",
            ],
            log,
        )

        def ready() -> bool:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                return bool(r.status == 200)

        wait_until(ready, timeout, "prometheus", self._proc, log)
        return self

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        stop_proc(self._proc)
        self._proc = None

    def close(self) -> None:
        self.stop()
        if self._own and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Prometheus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def query(self, promql: str) -> list[dict]:  # type: ignore[type-arg]
        from prometheus_api_client import PrometheusConnect

        return list(PrometheusConnect(url=self.url, disable_ssl=True).custom_query(promql))
