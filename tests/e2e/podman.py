"""Run a chart-rendered Deployment's operator container under podman, as a kubelet would.

Everything the pod spec says is carried over: image, args (with ``$(VAR)`` expanded from the
container's env), env (values and the Downward API fields the chart uses), the user and group,
``readOnlyRootFilesystem``, dropped capabilities, no privilege escalation, the emptyDir mounts
(as tmpfs) and the ServiceAccount token, CA and namespace at the path every Kubernetes client
reads them from, with KUBERNETES_SERVICE_HOST/PORT pointing at the API server. Only the network
differs: the container shares the host's loopback, where the local control plane, Prometheus
and model servers listen.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from tests.install.tools import PODMAN, PODMAN_RUN_FLAGS, run

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def _env(container: dict[str, Any], pod_meta: dict[str, str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for e in container.get("env") or []:
        if "value" in e:
            env[e["name"]] = str(e["value"])
        else:
            path = e["valueFrom"]["fieldRef"]["fieldPath"]
            if path not in pod_meta:
                raise AssertionError(f"env {e['name']}: fieldRef {path} is not emulated here")
            env[e["name"]] = pod_meta[path]
    return env


def _expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in args ($$ escapes)."""
    return re.sub(
        r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
        lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)),
        arg,
    )


def podman_argv(
    deployment: dict[str, Any], *, name: str, server: str, token: str, ca: Path, workdir: Path
) -> list[str]:
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    namespace = deployment["metadata"]["namespace"]
    pod_meta = {"metadata.namespace": namespace, "metadata.name": f"{deployment['metadata']['name']}-e2e"}
    env = _env(container, pod_meta)
    psc, csc = pod.get("securityContext") or {}, container.get("securityContext") or {}
    user = csc.get("runAsUser", psc.get("runAsUser"))
    group = csc.get("runAsGroup", psc.get("runAsGroup"))
    assert user is not None and int(user) != 0, "the chart must run the operator as a non-root numeric user"
    # The kubelet ignores an image's HEALTHCHECK (the pod's livenessProbe is what counts); so does this.
    argv = [*PODMAN, "run", "--detach", "--replace", "--name", name, *PODMAN_RUN_FLAGS, "--pull", "never"]
    argv.append("--no-healthcheck")
    argv += ["--user", f"{user}:{group if group is not None else user}"]
    if psc.get("fsGroup") is not None:
        argv += ["--group-add", str(psc["fsGroup"])]
    if csc.get("readOnlyRootFilesystem"):
        argv.append("--read-only")
    for cap in (csc.get("capabilities") or {}).get("drop") or []:
        argv += ["--cap-drop", cap]
    if csc.get("allowPrivilegeEscalation") is False:
        argv += ["--security-opt", "no-new-privileges"]
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    for m in container.get("volumeMounts") or []:
        vol = volumes[m["name"]]
        assert "emptyDir" in vol, f"volume {m['name']}: only emptyDir is emulated"
        argv += ["--tmpfs", f"{m['mountPath']}:rw,mode=1777"]
    if pod.get("automountServiceAccountToken", True):
        sa = workdir / "serviceaccount"
        sa.mkdir(parents=True, exist_ok=True)
        (sa / "token").write_text(token)
        (sa / "ca.crt").write_bytes(ca.read_bytes())
        (sa / "namespace").write_text(namespace)
        for f in sa.iterdir():
            f.chmod(0o644)
        argv += ["--volume", f"{sa}:{SA_DIR}:ro,Z"]
    u = urlparse(server)
    env |= {"KUBERNETES_SERVICE_HOST": u.hostname or "", "KUBERNETES_SERVICE_PORT": str(u.port or 443)}
    for k, v in env.items():
        argv += ["--env", f"{k}={v}"]
    if container.get("command"):
        argv += ["--entrypoint", container["command"][0]]
    argv.append(container["image"])
    argv += [_expand(a, env) for a in container.get("args") or []]
    return argv


def logs(name: str) -> str:
    proc = subprocess.run([*PODMAN, "logs", name], capture_output=True, text=True)
    return proc.stdout + proc.stderr


def remove(name: str) -> None:
    subprocess.run([*PODMAN, "rm", "--force", "--time", "10", name], capture_output=True)


def inspect(name: str) -> dict[str, Any]:
    import json

    out: list[dict[str, Any]] = json.loads(run([*PODMAN, "inspect", name]).stdout)
    return out[0]
