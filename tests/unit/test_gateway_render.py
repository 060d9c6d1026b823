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


# ---- VirtualService, matches, mirrors, response headers (issue 19) -------------------------------


def vs(http: list[dict[str, Any]], rv: str = "21") -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "model", "namespace": "ml", "resourceVersion": rv},
        "spec": {"hosts": ["model"], "http": http},
    }


def dest(host: str, weight: int | None = None, **extra: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"destination": {"host": host}, **extra}
    if weight is not None:
        d["weight"] = weight
    return d


STICKY_VS = vs(
    [
        {
            "name": "sticky-v2",
            "match": [{"headers": {"cookie": {"regex": "(.*;\\s*)?arm=v2(;.*)?"}}}],
            "route": [dest("v2")],
        },
        {
            "name": "testers",
            "match": [
                {"headers": {"x-canary": {"exact": "1"}, "x-team": {"prefix": "ml"}}},
                {"headers": {"x-beta": {"exact": "yes"}}},
            ],
            "route": [dest("v2")],
        },
        {
            "name": "primary",
            "route": [
                dest(
                    "v1.ml.svc.cluster.local",
                    70,
                    headers={"response": {"add": {"set-cookie": "arm=v1; Path=/"}}},
                ),
                dest("v2", 30, headers={"response": {"add": {"set-cookie": "arm=v2; Path=/"}}}),
            ],
            "mirror": {"host": "v3"},
            "mirrorPercentage": {"value": 12.5},
        },
    ]
)


def test_virtualservice_plan_keeps_route_order_or_conditions_and_names_destinations() -> None:
    plan = plan_route(STICKY_VS, "primary")
    assert plan.weights == {"v1": 70, "v2": 30}  # host in long form is the same Service
    assert [(len(c), r) for c, r in plan.matches] == [(1, 0), (2, 1), (1, 1), (0, 2)]
    assert plan.default_rule == 2
    assert plan.rules[2].mirror == ("v3", 12.5)
    assert plan.rules[2].response_headers == {
        "v1": (("set-cookie", "arm=v1; Path=/"),),
        "v2": (("set-cookie", "arm=v2; Path=/"),),
    }
    assert plan.backends == ["v2", "v1", "v3"]
    assert plan_route(STICKY_VS, 0).weights == {"v2": 100}  # a lone destination carries everything


def test_httproute_more_header_matches_come_first_and_filters_are_read() -> None:
    r = route([{"name": "v1", "weight": 9}, {"name": "v2", "weight": 1}])
    r["spec"]["rules"] = [
        {
            "backendRefs": r["spec"]["rules"][0]["backendRefs"],
            "filters": [
                {
                    "type": "RequestMirror",
                    "requestMirror": {
                        "backendRef": {"name": "v3"},
                        "fraction": {"numerator": 1, "denominator": 8},
                    },
                }
            ],
        },
        {"matches": [{"headers": [{"name": "x-tester", "value": "1"}]}], "backendRefs": [{"name": "v2"}]},
    ]
    plan = plan_route(r)
    assert plan.weights == {"v1": 9, "v2": 1}
    # The rule with a header match wins over the catch-all listed before it (Gateway API precedence).
    assert [(len(c), rule) for c, rule in plan.matches] == [(1, 1), (0, 0)]
    assert plan.rules[0].mirror == ("v3", 12.5)


def test_matches_render_in_evaluation_order_with_anchored_patterns(tmp_path: Path) -> None:
    conf = render_nginx(STICKY_VS, settings(tmp_path), "primary")
    rule = block(conf, 'map "x$gw_m0$gw_m1$gw_m2" $gw_rule')
    assert rule.split("\n") == [
        '        "~^x1" 0;',
        '        "~^x01" 1;',
        '        "~^x001" 1;',
        "        default 2;",
    ]
    # Exact is anchored at both ends, prefix at the start, regex matches whole values.
    assert '"~^1$" 1;' in block(conf, "map $http_x_canary $gw_c1_0")
    assert '"~^ml" 1;' in block(conf, "map $http_x_team $gw_c1_1")
    assert '"~^(?:(.*;\\\\s*)?arm=v2(;.*)?)$" 1;' in block(conf, "map $http_cookie $gw_c0_0")
    assert '"11" 1;' in block(conf, 'map "$gw_c1_0$gw_c1_1" $gw_m1')  # both conditions of a match
    route_map = block(conf, "map $gw_rule $gw_route")
    assert "default gw_weighted;" in route_map and '"0" gw_rule_0;' in route_map
    assert "proxy_pass http://$gw_route;" in conf


def test_mirror_renders_a_random_share_whose_answers_are_dropped(tmp_path: Path) -> None:
    conf = render_nginx(STICKY_VS, settings(tmp_path), "primary")
    assert block(conf, 'split_clients "$request_id" $gw_mroll_2').split("\n") == [
        "        12.50% gw_mirror_2;",
        '        * "";',
    ]
    assert "server 127.0.0.1:8003 max_fails=0;" in block(conf, "upstream gw_mirror_2")
    assert "mirror /__gw_mirror;" in block(conf, "location /")
    mirror = conf.split("location = /__gw_mirror {")[1].split("        }\n    }")[0]
    assert "internal;" in mirror and "proxy_pass http://$gw_mirror_to$request_uri;" in mirror


def test_response_headers_are_set_per_rule_and_backend(tmp_path: Path) -> None:
    conf = render_nginx(STICKY_VS, settings(tmp_path), "primary")
    cookies = block(conf, 'map "$gw_rule|$upstream_addr" $gw_rh0')
    assert '"2|127.0.0.1:8001" "arm=v1; Path=/";' in cookies
    assert '"2|127.0.0.1:8002" "arm=v2; Path=/";' in cookies
    assert "add_header set-cookie $gw_rh0 always;" in conf


def test_a_rule_with_no_positive_weight_answers_503_and_no_catch_all_answers_404(tmp_path: Path) -> None:
    doc = vs(
        [
            {
                "name": "t",
                "match": [{"headers": {"x-t": {"exact": "1"}}}],
                "route": [dest("v1", 0), dest("v2", 0)],
            }
        ]
    )
    conf = render_nginx(doc, settings(tmp_path), "t")
    route_map = block(conf, "map $gw_rule $gw_route")
    assert "default gw_nomatch;" in route_map and '"0" gw_empty;' in route_map
    assert "return 404" in conf and "return 503" in conf


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (vs([{"route": [dest("v1", headers={"response": {"add": {"x-a": "$evil"}}})]}]), "plain string"),
        (vs([{"route": [dest("v1", headers={"response": {"add": {"x a": "1"}}})]}]), "plain header name"),
        (vs([{"match": [{"headers": {"x-a": {"regex": "("}}}], "route": [dest("v1")]}]), "regex"),
        (vs([{"match": [{"headers": {"x-a": {}}}], "route": [dest("v1")]}]), "exact, prefix, regex"),
        (
            vs([{"route": [dest("v1")], "mirror": {"host": "v2"}, "mirrorPercentage": {"value": 101}}]),
            "mirror",
        ),
        (vs([{"name": "a", "route": [dest("v1")]}]), "no rule named"),
    ],
)
def test_bad_virtualservice_input_is_refused(tmp_path: Path, doc: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        render_nginx(doc, settings(tmp_path), "primary" if message == "no rule named" else 0)


def test_real_nginx_accepts_the_match_mirror_and_header_shapes(tmp_path: Path) -> None:
    try:
        nginx = find_nginx()
    except MissingComponent as e:
        pytest.skip(str(e))
    mirror_all = vs([{"route": [dest("v1")], "mirror": {"host": "v3"}}])
    no_default = vs([{"match": [{"headers": {"x-t": {"exact": "1"}}}], "route": [dest("v2")]}])
    for i, (doc, rule, key) in enumerate(
        [
            (STICKY_VS, "primary", None),
            (STICKY_VS, "primary", "$http_x_user_id"),
            (mirror_all, 0, None),
            (no_default, 0, None),
        ]
    ):
        d = tmp_path / str(i)
        prepare_prefix(d)
        conf = d / "nginx.conf"
        conf.write_text(render_nginx(doc, settings(d, user_key=key), rule))
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
