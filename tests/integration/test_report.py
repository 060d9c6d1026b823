"""The decision report of real objects: a promoted and a rolled-back rollout and an experiment, each run by
the operator on the real stack (API server, Prometheus, model servers, traffic), then rendered and checked:
PNG size, the expected panels, and the HTML loaded in headless Chromium with no console error.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from PIL import Image

from model_rollouts.kube import series_store
from model_rollouts.report import write
from model_rollouts.report.data import load
from model_rollouts.report.figures import DPI, PANEL_HEIGHT_IN, WIDTH_IN
from tests.harness import objects
from tests.harness.objects import CANDIDATE, GROUP, ROUTE, STABLE, VERSION, phase, rollout, wait_none
from tests.harness.stack import Stack, httproute

pytestmark = pytest.mark.integration


#: Injected at the top of a copy of the page: records script errors, failed resource loads (capture
#: phase) and console.error calls, and after `load` writes them with the image counts into the DOM,
#: which `--dump-dom` prints.
PROBE = """<script>(function(){var errs=[];
window.addEventListener('error',function(e){var t=e.target;errs.push(t&&t!==window&&t.src?
('resource '+t.tagName+' '+String(t.src).slice(0,80)):('script '+e.message));},true);
var ce=console.error;console.error=function(){errs.push('console '+Array.prototype.join.call(arguments,' '));
ce.apply(console,arguments);};
window.addEventListener('load',function(){var im=document.images,ok=0;for(var i=0;i<im.length;i++){
if(im[i].complete&&im[i].naturalWidth>0)ok++;}var p=document.createElement('pre');p.id='report-probe';
p.textContent=JSON.stringify({errors:errs,images:im.length,loaded:ok});document.body.appendChild(p);});})();
</script>"""


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        reason = (
            "chromium is not installed (Debian: apt-get install chromium); "
            "lead: add `chromium` to .ci/run's apt-get install"
        )
        if os.environ.get("MODEL_ROLLOUTS_REQUIRE_INTEGRATION") == "1":
            pytest.fail(reason)
        print(f"\nSKIP: {reason}")
        pytest.skip(reason)
    return exe


def load_in_chromium(page: Path) -> tuple[dict[str, Any], list[str]]:
    """Load the page headless: (the probe's findings, Chromium's CONSOLE log lines for the page itself).

    The report has no script of its own, so any console line from the original page is a failure; the
    probed copy also catches images that failed to decode or load.
    """
    exe = chromium()
    flags = [exe, "--headless", "--disable-gpu", "--no-sandbox", "--enable-logging=stderr", "--v=0",
             "--virtual-time-budget=10000", "--dump-dom"]  # fmt: skip
    plain = subprocess.run([*flags, page.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert "<figure" in plain.stdout, "Chromium did not render the report"
    console = [line for line in plain.stderr.splitlines() if ":CONSOLE" in line]
    probed = page.with_name(page.stem + ".probe.html")
    probed.write_text(page.read_text().replace("<head>", "<head>" + PROBE, 1))
    run = subprocess.run([*flags, probed.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    m = re.search(r'<pre id="report-probe">(.*?)</pre>', run.stdout, re.S)
    assert m is not None, f"the probe did not run: {run.stderr[-2000:]}"
    return json.loads(m.group(1)), console


def experiment(name: str, prom: str) -> dict[str, Any]:
    """control (stable) vs treatment (candidate): a guardrail breach needs two failures."""
    return objects.experiment(
        name,
        prom,
        [
            {"name": "control", "service": STABLE, "control": True},
            {"name": "treatment", "service": CANDIDATE},
        ],
        ROUTE,
        guardrails=[objects.guardrail(failure_limit=2)],
        stoppingRules={"minSamplesPerVariant": 100},
    )


@pytest.fixture(scope="module")
def stack(real_components: None) -> Iterator[Stack]:
    chromium()  # skip before starting anything when the browser is missing
    variants = {
        STABLE: {"error_rate": 0.0, "positive_rate": 0.5},
        CANDIDATE: {"error_rate": 0.0, "positive_rate": 0.5},
    }
    with Stack(variants=variants, route=ROUTE, rps=50, max_seconds=900) as s:
        s.start_operator()
        yield s


def reset(stack: Stack, plural: str, name: str) -> None:
    client.CustomObjectsApi(stack.api).delete_namespaced_custom_object(
        GROUP, VERSION, stack.namespace, plural, name
    )
    wait_none(stack, plural)
    stack.servers[CANDIDATE].set(error_rate=0.0, positive_rate=0.5)
    stack.apply(httproute(ROUTE, stack.namespace, {STABLE: 100, CANDIDATE: 0}))


def check_png(path: Path, panels: int) -> None:
    with Image.open(path) as im:
        assert im.format == "PNG"
        width, height = im.size
    assert width == pytest.approx(WIDTH_IN * DPI, abs=2)
    assert height == pytest.approx((PANEL_HEIGHT_IN * panels + 0.6) * DPI, abs=2)


def check_html(path: Path, titles: list[str]) -> str:
    text = path.read_text()
    captions = re.findall(r"<figcaption>Figure \d+\. <b>([^<]+)</b>", text)
    assert captions == titles
    probe, console = load_in_chromium(path)
    assert console == [], console
    assert probe == {"errors": [], "images": len(titles), "loaded": len(titles)}, probe
    return text


def render(stack: Stack, obj: dict[str, Any], out: Path) -> tuple[list[str], str]:
    """All three formats; returns the panel titles and the HTML."""
    png = write(obj, "png", out / f"{obj['metadata']['name']}.png")
    check_png(png.path, len(png.panels))
    md = write(obj, "md", out / "md" / f"{obj['metadata']['name']}.md")
    assert len(md.images) == len(md.panels) and all(f"]({i.name})" in md.path.read_text() for i in md.images)
    html = write(obj, "html", out / f"{obj['metadata']['name']}.html")
    return html.panels, check_html(html.path, html.panels)


ROLLOUT_PANELS = [
    f"Traffic: candidate {CANDIDATE} vs stable {STABLE}",
    "Comparison positive-feedback: candidate - stable (nonInferiority, higher is better)",
    "Guardrail error-rate: must stay at most 0.05",
]


def test_report_of_a_promoted_rollout_from_the_cluster(stack: Stack, tmp_path: Path) -> None:
    assert stack.prom is not None
    stack.apply(rollout("good", stack.prom.url, [{"setWeight": 20}, {"analysis": {"duration": "10s"}},
                                                 {"setWeight": 60}]))  # fmt: skip
    obj = stack.wait_for("modelrollouts", "good", lambda o: phase(o) == "Promoted", 180)
    # Every analysis: status.series keeps the last 5, the series ConfigMaps the rest.
    series = load(obj, series_store.read(stack.api, obj)).series
    assert [p["weight"] for p in series][-1] == 100 and {20, 60} <= {p["weight"] for p in series}
    assert any(v["kind"] == "comparison" and "ciLow" in v for p in series for v in p["values"])
    # The plugin's path: read from the API server with a kubeconfig, as a user would.
    cmd = [sys.executable, "-m", "model_rollouts.report", "good", "-n", stack.namespace,
           "--kubeconfig", str(stack.cluster.kubeconfig), "-o", "html", "--out", str(tmp_path)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    page = Path(res.stdout.split()[0])
    assert page == tmp_path / "good-report.html"
    text = check_html(page, ROLLOUT_PANELS)
    assert "(Promoted)" in text and "AnalysisPassed" in text
    panels, _ = render(stack, obj, tmp_path)
    assert panels == ROLLOUT_PANELS
    reset(stack, "modelrollouts", "good")


def test_report_of_a_rolled_back_rollout(stack: Stack, tmp_path: Path) -> None:
    assert stack.prom is not None
    stack.apply(rollout("bad", stack.prom.url, [{"setWeight": 30}, {"pause": {"duration": "10m"}}]))
    stack.wait_for(
        "modelrollouts", "bad", lambda o: len((o.get("status") or {}).get("series") or []) >= 1, 90
    )
    stack.servers[CANDIDATE].set(error_rate=0.5)
    obj = stack.wait_for("modelrollouts", "bad", lambda o: phase(o) == "RolledBack", 120)
    last = obj["status"]["series"][-1]
    assert last["weight"] == 0
    assert any(v["name"] == "error-rate" and v["verdict"] == "fail" for v in last["values"])
    panels, text = render(stack, obj, tmp_path)
    assert panels == ROLLOUT_PANELS
    assert "(RolledBack)" in text and "GuardrailFailed" in text and "operator: analysis" in text
    reset(stack, "modelrollouts", "bad")


def test_report_of_an_experiment(stack: Stack, tmp_path: Path) -> None:
    assert stack.prom is not None
    stack.apply(httproute(ROUTE, stack.namespace, {STABLE: 50, CANDIDATE: 50}))
    stack.servers[CANDIDATE].set(positive_rate=0.7)
    time.sleep(2)
    stack.apply(experiment("exp", stack.prom.url))

    def enough(o: dict[str, Any]) -> bool:
        st = o.get("status") or {}
        compared = [
            p for p in st.get("series") or [] if any(v.get("estimate") is not None for v in p["variants"])
        ]
        return len(compared) >= 4 or phase(o) in ("Concluded", "RolledBack", "Aborted")

    obj = stack.wait_for("modelexperiments", "exp", enough, 240)
    panels, text = render(stack, obj, tmp_path)
    assert panels == [
        "Traffic allocation by variant (fixed split)",
        "Primary metric positive-feedback: estimate per variant",
        "Difference from the control control with its sequential interval",
        "Holm-adjusted p-values vs the control",
        "Sample-ratio mismatch (SRM) test",
        "Guardrail error-rate: must stay at most 0.05",
    ]
    assert "Holm-adjusted p" in text and "treatment" in text
    reset(stack, "modelexperiments", "exp")
