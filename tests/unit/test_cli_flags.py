"""The plugin speaks kubectl: its connection and auth flags reach the API server as kubectl sends
them, `version` shows the package version, and `completion bash|zsh` gives working scripts.

A loopback HTTP server stands in for the API server and records what each request carried.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from model_rollouts import __version__
from model_rollouts.cli import app
from model_rollouts.cli.kube import CliError, Kube, parse_request_timeout

OBJ = {
    "apiVersion": "mlrollouts.io/v1alpha1",
    "kind": "ModelRollout",
    "metadata": {"name": "fraud", "namespace": "team-b"},
    "spec": {"steps": [{"setWeight": 10}]},
    "status": {"phase": "Promoted", "weight": 100},
}


class Recorder(BaseHTTPRequestHandler):
    seen: list[tuple[str, list[tuple[str, str]]]] = []
    delay = 0.0

    def do_GET(self) -> None:
        type(self).seen.append((self.path, [(k.lower(), v) for k, v in self.headers.items()]))
        time.sleep(type(self).delay)
        found = self.path.endswith("/modelrollouts/fraud")
        body = json.dumps(OBJ if found else {"kind": "Status", "code": 404}).encode()
        self.send_response(200 if found else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


class Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that gave up (the timeout test) is expected, not news on stderr


@pytest.fixture()
def server() -> Iterator[str]:
    Recorder.seen, Recorder.delay = [], 0.0
    httpd = Server(("127.0.0.1", 0), Recorder)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def run(*args: str) -> Any:
    return CliRunner().invoke(app.cli, list(args))


def test_server_token_and_impersonation_reach_the_api_server_as_kubectl_sends_them(
    server: str, tmp_path: Path
) -> None:
    res = run(
        "get", "fraud", "-o", "json", "--server", server, "--token", "s3cret", "-n", "team-b",
        "--as", "alice", "--as-group", "ml-team", "--as-group", "oncall",
        "--kubeconfig", str(tmp_path / "none"),  # no kubeconfig at all: the flags are enough
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["phase"] == "Promoted"
    path, headers = next(x for x in Recorder.seen if "/modelrollouts/" in x[0])
    assert path.startswith("/apis/mlrollouts.io/v1alpha1/namespaces/team-b/modelrollouts/fraud")
    assert ("authorization", "Bearer s3cret") in headers
    assert ("impersonate-user", "alice") in headers
    assert [v for k, v in headers if k == "impersonate-group"] == ["ml-team", "oncall"]


def test_flags_override_the_kubeconfig(server: str, tmp_path: Path) -> None:
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],  # nothing listens
        "users": [{"name": "u", "user": {"token": "from-kubeconfig"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u", "namespace": "team-b"}}],
        "current-context": "c",
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(cfg))
    for _ in range(2):  # the kubeconfig is reloaded before each request: the flag still wins
        res = run("get", "fraud", "-o", "json", "--kubeconfig", str(path), "--server", server)
        assert res.exit_code == 0, res.output
    assert ("authorization", "Bearer from-kubeconfig") in Recorder.seen[-1][1]  # the context's namespace too
    assert not any(k.startswith("impersonate") for k, _ in Recorder.seen[-1][1])
    ca = tmp_path / "ca.crt"
    ca.write_text("not used by this test")
    kube = Kube.connect(str(path), certificate_authority=str(ca), request_timeout="0")
    assert kube.api.configuration.ssl_ca_cert == str(ca) and kube.timeout is None
    kube = Kube.connect(str(path), insecure_skip_tls_verify=True, request_timeout="2m")
    assert kube.api.configuration.verify_ssl is False and kube.timeout == 120
    with pytest.raises(CliError, match="--as-group needs --as"):
        Kube.connect(str(path), as_group=("g",))


def test_request_timeout_gives_up_on_a_slow_api_server(server: str) -> None:
    Recorder.delay = 3.0
    t0 = time.monotonic()
    res = run("get", "fraud", "--server", server, "--token", "t", "--request-timeout", "500ms", "-n", "x")
    assert time.monotonic() - t0 < 2.5
    assert res.exit_code == 1 and "cannot reach the Kubernetes API server" in res.output, res.output


@pytest.mark.parametrize(
    ("text", "seconds"), [("0", None), ("15", 15.0), ("30s", 30.0), ("1m30s", 90.0), ("250ms", 0.25)]
)
def test_request_timeout_reads_like_kubectl(text: str, seconds: float | None) -> None:
    assert parse_request_timeout(text) == seconds


def test_a_bad_request_timeout_is_named() -> None:
    res = run("list", "--request-timeout", "soon", "--server", "http://127.0.0.1:1")
    assert res.exit_code == 1 and "--request-timeout: invalid duration 'soon'" in res.output


def test_every_cluster_command_takes_kubectl_s_flags() -> None:
    flags = ("--kubeconfig", "--context", "--namespace", "--server", "--token", "--certificate-authority",
             "--insecure-skip-tls-verify", "--as", "--as-group", "--request-timeout")  # fmt: skip
    for name in ("list", "get", "status", "promote", "abort", "retry", "pause", "resume", "report"):
        opts = {o for p in app.cli.commands[name].params for o in p.opts}
        assert set(flags) <= opts, (name, set(flags) - opts)
        assert "-n" in opts


def test_version() -> None:
    assert run("version").output.strip() == f"kubectl-mlrollouts {__version__}"
    assert json.loads(run("version", "-o", "json").output) == {
        "plugin": "kubectl-mlrollouts",
        "version": __version__,
    }
    assert run("--version").output.strip() == f"kubectl-mlrollouts {__version__}"


BASH = shutil.which("bash")
ZSH = shutil.which("zsh")


@pytest.mark.skipif(BASH is None, reason="bash is not installed")
def test_bash_completion_completes_commands_and_flags() -> None:
    script = run("completion", "bash").output
    assert "_KUBECTL_MLROLLOUTS_COMPLETE" in script and "complete " in script
    exe = Path(sys.executable).parent / "kubectl-mlrollouts"
    # Source the script in a real bash and ask its completion function, as <TAB> does.
    probe = f"""
source <({exe} completion bash)
ask() {{
  COMPREPLY=(); COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1))
  _kubectl_mlrollouts_completion {exe}; echo "${{COMPREPLY[*]}}"
}}
ask kubectl-mlrollouts pro
ask kubectl-mlrollouts promote --fu
ask kubectl-mlrollouts completion ''""
"""
    out = subprocess.run([BASH, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["promote"], out.stdout + out.stderr
    assert lines[1].split() == ["--full"]
    assert sorted(lines[2].split()) == ["bash", "zsh"]


def test_zsh_completion_script() -> None:
    script = run("completion", "zsh").output
    assert (
        script.startswith("#compdef kubectl-mlrollouts")
        and "_KUBECTL_MLROLLOUTS_COMPLETE=zsh_complete" in script
    )
    if ZSH is not None:
        check = subprocess.run([ZSH, "-n"], input=script, capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stderr
    assert run("completion", "fish").exit_code == 2  # bash and zsh only


def test_kubectl_plugin_completion_protocol() -> None:
    exe = Path(sys.executable).parent / "kubectl_complete-mlrollouts"
    out = subprocess.run([str(exe), "promote", "x", "--fu"], capture_output=True, text=True, timeout=60)
    lines = out.stdout.splitlines()
    assert lines[-1] == ":4" and lines[0].startswith("--full")


def test_the_real_kubectl_completes_the_plugin(tmp_path: Path) -> None:
    from tests.harness.cluster import CACHE, KUBE_VERSION

    kubectl = CACHE / "kube" / KUBE_VERSION / "bin" / "kubectl"
    if not kubectl.exists():
        pytest.skip(f"no kubectl at {kubectl} (make kube-bins)")
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "KUBECONFIG": str(tmp_path / "none")}
    out = subprocess.run(
        [str(kubectl), "__complete", "mlrollouts", "promote", "x", "--f"],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )  # fmt: skip
    assert out.stdout.splitlines()[0].startswith("--full\t"), out.stdout + out.stderr
    assert out.stdout.splitlines()[-1] == ":4"
