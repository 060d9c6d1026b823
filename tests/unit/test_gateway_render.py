"""The harness gateway's pure rendering: HTTPRoute dict -> nginx configuration text."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.harness.cluster import MissingComponent
from tests.harness.gateway import (
    NginxSettings,
    find_nginx,
    plan_route,
    prepare_prefix,
    render_nginx,
    split_percentages,
)

A, B, C = "http://127.0.0.1:8001", "http://127.0.0.1:8002", "http://127.0.0.1:8003"


def route(refs: list[dict[str, Any]], rv: str = "17") -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "model", "namespace": "ml", "resourceVersion": rv},
        "spec": {"rules": [{"backendRefs": refs}]},
    }


def settings(tmp: Path, backends: dict[str, str] | None = None, user_key: str | None = None) -> NginxSettings:
    return NginxSettings(
        listen_port=18080,
        prefix=tmp,
        backends=backends if backends is not None else {"v1": A, "v2": B, "v3": C},
        user_key=user_key,
    )


def block(conf: str, header: str) -> str:
    m = re.search(re.escape(header) + r" \{\n(.*?)\n    \}", conf, re.S)
    assert m, f"no block {header!r} in:\n{conf}"
    return m.group(1)


def weighted_servers(conf: str) -> dict[str, int]:
    """address -> weight of the weighted round-robin upstream."""
    body = block(conf, "upstream gw_weighted")
    return {addr: int(w) for addr, w in re.findall(r"server (\S+) weight=(\d+) max_fails=0;", body)}


def test_weights_become_exact_round_robin_weights_reduced(tmp_path: Path) -> None:
    conf = render_nginx(
        route([{"name": "v1", "weight": 70}, {"name": "v2", "weight": 30}]), settings(tmp_path)
    )
    assert weighted_servers(conf) == {"127.0.0.1:8001": 7, "127.0.0.1:8002": 3}
    assert "proxy_pass http://gw_weighted;" in conf
    # Never retried elsewhere, never marked down: the servers' counters see the split itself.
    assert "proxy_next_upstream off;" in conf
    assert "worker_processes 1;" in conf


def test_version_endpoint_and_headers_carry_the_resource_version(tmp_path: Path) -> None:
    conf = render_nginx(route([{"name": "v1", "weight": 1}], rv="98765"), settings(tmp_path))
    version = block(conf, "location = /__gateway_version")
    assert 'return 200 "98765";' in version
    assert 'add_header X-Gateway-Version "98765" always;' in conf
    backends = block(conf, "map $upstream_addr $gw_backend")
    assert '"127.0.0.1:8001" "v1";' in backends


def test_weight_zero_gets_no_server_and_missing_weight_is_one(tmp_path: Path) -> None:
    conf = render_nginx(
        route([{"name": "v1", "weight": 0}, {"name": "v2"}, {"name": "v3", "weight": 3}]), settings(tmp_path)
    )
    assert weighted_servers(conf) == {"127.0.0.1:8002": 1, "127.0.0.1:8003": 3}


@pytest.mark.parametrize("refs", [[{"name": "v1", "weight": 0}, {"name": "v2", "weight": 0}], []])
def test_no_positive_weight_answers_503(tmp_path: Path, refs: list[dict[str, Any]]) -> None:
    conf = render_nginx(route(refs), settings(tmp_path))
    assert "upstream gw_weighted" not in conf
    assert "proxy_pass" not in conf
    assert "return 503" in block(conf, "location /")


def test_absent_route_answers_503_with_version_none(tmp_path: Path) -> None:
    conf = render_nginx(None, settings(tmp_path))
    assert 'return 200 "none";' in conf
    assert "return 503" in conf and "proxy_pass" not in conf


def test_backend_without_server_answers_500_for_its_share(tmp_path: Path) -> None:
    conf = render_nginx(
        route([{"name": "v1", "weight": 1}, {"name": "ghost", "weight": 1}]), settings(tmp_path, {"v1": A})
    )
    sock = f"unix:{tmp_path / 'unresolved-ghost.sock'}"
    assert weighted_servers(conf) == {"127.0.0.1:8001": 1, sock: 1}
    assert f"listen {sock};" in conf
    assert 'return 500 "backend ghost has no server\\n";' in conf


def test_user_key_splits_sticky_by_percent_and_keeps_round_robin_without_it(tmp_path: Path) -> None:
    conf = render_nginx(
        route([{"name": "v1", "weight": 1}, {"name": "v2", "weight": 0}, {"name": "v3", "weight": 2}]),
        settings(tmp_path, user_key="$cookie_uid"),
    )
    split = block(conf, 'split_clients "$cookie_uid" $gw_sticky')
    assert split.split("\n") == ["        33.33% gw_backend_0;", "        * gw_backend_2;"]
    target = block(conf, "map $cookie_uid $gw_target")
    assert '"" gw_weighted;' in target and "default $gw_sticky;" in target
    assert "proxy_pass http://$gw_target;" in conf
    assert "gw_backend_1" not in conf  # weight 0: no upstream at all


def test_split_percentages_floor_to_hundredths_and_last_takes_the_rest() -> None:
    assert split_percentages({"a": 1, "b": 1, "c": 1}) == [("a", "33.33%"), ("b", "33.33%"), ("c", "*")]
    assert split_percentages({"a": 70, "z": 0, "b": 30}) == [("a", "70.00%"), ("b", "*")]
    assert split_percentages({"a": 5}) == [("a", "*")]
    assert split_percentages({}) == []


def test_rendering_is_a_pure_function(tmp_path: Path) -> None:
    r = route([{"name": "v1", "weight": 5}, {"name": "v2", "weight": 95}])
    assert render_nginx(r, settings(tmp_path)) == render_nginx(r, settings(tmp_path))
    assert plan_route(r).weights == {"v1": 5, "v2": 95}
    assert plan_route(r).active == {"v1": 5, "v2": 95}


@pytest.mark.parametrize(
    ("doc", "s", "message"),
    [
        (route([{"name": "v1"}], rv='1"; evil'), {}, "resourceVersion"),
        (route([{"name": "v1", "weight": -1}]), {}, "weight"),
        (route([{"name": "v1"}]), {"user_key": "$request_body"}, "user_key"),
        (
            route([{"name": "v1"}, {"name": "v2"}]),
            {"backends": {"v1": A, "v2": A + "/"}},
            "share the address",
        ),
        (route([{"name": "v1"}]), {"backends": {"v1": "https://x:1"}}, "http://host:port"),
    ],
)
def test_bad_input_is_refused_with_the_field_named(
    tmp_path: Path, doc: dict[str, Any], s: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        render_nginx(doc, settings(tmp_path, **s))


def test_real_nginx_accepts_every_shape(tmp_path: Path) -> None:
    try:
        nginx = find_nginx()
    except MissingComponent as e:
        pytest.skip(str(e))
    shapes = [
        (route([{"name": "v1", "weight": 70}, {"name": "v2", "weight": 30}]), None, None),
        (route([{"name": "v1", "weight": 0}, {"name": "ghost", "weight": 2}]), None, None),
        (route([{"name": "v1", "weight": 1}, {"name": "v3", "weight": 2}]), "$http_x_user_id", None),
        (route([{"name": "v1", "weight": 0}]), None, None),
        (None, "$cookie_uid", None),
    ]
    for i, (doc, key, _) in enumerate(shapes):
        d = tmp_path / str(i)
        prepare_prefix(d)
        conf = d / "nginx.conf"
        conf.write_text(render_nginx(doc, settings(d, user_key=key)))
        out = subprocess.run(
            [
                str(nginx),
                "-t",
                "-q",
                "-p",
                str(d),
                "-c",
                str(conf),
                "-e",
                str(d / "error.log"),
                "-g",
                f"pid {d / 'nginx.pid'};",
            ],
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert out.returncode == 0, f"shape {i}: {out.stderr}\n{conf.read_text()}"
