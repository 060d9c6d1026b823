"""The decision report rendered from objects whose status the real engines produced (no cluster)."""

from __future__ import annotations

import base64
import io
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from model_rollouts.api.common import dump
from model_rollouts.api.experiment import ModelExperimentSpec, ModelExperimentStatus
from model_rollouts.api.rollout import ModelRolloutSpec
from model_rollouts.engine import experiment as xeng
from model_rollouts.engine import rollout as eng
from model_rollouts.report import write
from model_rollouts.report.command import report
from model_rollouts.report.data import ReportError, load
from model_rollouts.report.figures import DPI, PANEL_HEIGHT_IN, WIDTH_IN, panels_of, render_all
from tests.unit.test_report_series import T0, drive_rollout, experiment_obs, rollout_spec


def rollout_obj(name: str, spec: ModelRolloutSpec, status: Any, **meta: Any) -> dict[str, Any]:
    return {
        "apiVersion": "mlrollouts.io/v1alpha1",
        "kind": "ModelRollout",
        "metadata": {"name": name, "namespace": "ml", **meta},
        "spec": dump(spec),
        "status": dump(status),
    }


@pytest.fixture(scope="module")
def promoted() -> dict[str, Any]:
    spec = rollout_spec()
    status, _ = drive_rollout(spec, [0.01, 0.02, 0.015])
    assert status.phase == "Promoted"
    return rollout_obj("promoted", spec, status)


@pytest.fixture(scope="module")
def rolled_back() -> dict[str, Any]:
    spec = rollout_spec()
    status, _ = drive_rollout(spec, [0.01, 0.2, 0.3])
    assert status.phase == "RolledBack"
    return rollout_obj("rolled-back", spec, status)


@pytest.fixture(scope="module")
def promoted_by_hand() -> dict[str, Any]:
    spec = rollout_spec()
    status, _ = drive_rollout(spec, [0.01], ticks=3)
    assert status.phase == "Progressing" and len(status.series) == 2
    ann = {"mlrollouts.io/promote-full": "oncall-42"}
    d = eng.reconcile(spec, status, now=T0 + timedelta(minutes=1), generation=1, annotations=ann)
    assert d.status.phase == "Promoted"
    return rollout_obj("by-hand", spec, d.status, annotations={"mlrollouts.io/promote-full": "oncall-42"})


def thompson_spec() -> ModelExperimentSpec:
    return ModelExperimentSpec.model_validate(
        {
            "variants": [
                {"name": "control", "service": "svc-0", "control": True},
                {"name": "better", "service": "svc-1"},
                {"name": "same", "service": "svc-2"},
            ],
            "trafficRouting": {"gatewayAPI": {"httpRoute": "model"}},
            "allocation": {"strategy": "thompson", "minWeight": 5},
            "primaryMetric": {"name": "ctr", "type": "proportion", "successes": "s", "trials": "t"},
            "guardrails": [{"name": "error-rate", "query": "q", "max": 0.05}],
            "successCriteria": {"minimumDetectableEffect": 0.02, "alpha": 0.05},
            "stoppingRules": {"minSamplesPerVariant": 500},
            "analysis": {"interval": "5s", "prometheus": {"address": "http://prom:9090"}},
        }
    )


@pytest.fixture(scope="module")
def experiment() -> dict[str, Any]:
    spec = thompson_spec()
    status, now = ModelExperimentStatus(), T0
    rates = {"control": 0.10, "better": 0.16, "same": 0.10}
    for i in range(30):
        obs = experiment_obs(spec, i, rates) if i else None
        status = xeng.reconcile(spec, status, now=now, generation=1, observations=obs).status
        now += timedelta(seconds=5)
        if status.phase not in ("Running", "Pending"):
            break
    assert len(status.series) >= 5
    return {"kind": "ModelExperiment", "metadata": {"name": "exp", "namespace": "ml"}, "spec": dump(spec),
            "status": dump(status)}  # fmt: skip


def titles(fig: Any) -> list[str]:
    return [ax.get_title(loc="left") for ax in fig.axes]


def legend_texts(ax: Any) -> list[str]:
    leg = ax.get_legend()
    return [t.get_text() for t in leg.get_texts()] if leg else []


def test_png_has_one_panel_per_plot_at_the_stated_size(promoted: dict[str, Any], tmp_path: Path) -> None:
    w = write(promoted, "png", tmp_path / "r.png")
    assert w.panels == [
        "Traffic: candidate v2 vs stable v1",
        "Comparison accuracy: candidate - stable (nonInferiority, higher is better)",
        "Guardrail errors: must stay at most 0.05",
    ]
    with Image.open(w.path) as im:
        assert im.format == "PNG"
        width, height = im.size
    assert width == pytest.approx(WIDTH_IN * DPI, abs=2)
    assert height == pytest.approx((PANEL_HEIGHT_IN * 3 + 0.6) * DPI, abs=2)


def test_rollout_panels_show_weights_interval_thresholds_and_decisions(rolled_back: dict[str, Any]) -> None:
    r = load(rolled_back)
    fig = render_all(panels_of(r), "t")
    weights, comparison, guardrail = fig.axes
    # The weight line ends at 0 (rolled back) and the decision is marked and named on the axes.
    line = weights.get_lines()[0]
    assert list(line.get_ydata())[-1] == 0
    assert max(line.get_ydata()) == 20
    notes = [t.get_text() for t in weights.texts]
    assert "GuardrailFailed" in notes
    # The guardrail's max is drawn where the spec puts it, and the breaches are marked.
    assert "max 0.05" in legend_texts(guardrail)
    assert any(list(ln.get_ydata()) == [0.05, 0.05] for ln in guardrail.get_lines())
    assert "breach" in legend_texts(guardrail)
    # The comparison: an interval band, the estimate and the zero line, in percentage points.
    assert "confidence sequence" in legend_texts(comparison)
    assert "percentage points" in comparison.get_ylabel()
    assert "non-inferiority margin -2" in legend_texts(comparison)
    for ax in fig.axes:
        assert ax.get_xlabel().startswith("time (UTC")


def test_html_embeds_every_figure_with_caption_and_the_decision_table(
    promoted_by_hand: dict[str, Any], tmp_path: Path
) -> None:
    w = write(promoted_by_hand, "html", tmp_path / "r.html")
    text = w.path.read_text()
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(images) == len(w.panels) == 3
    for data in images:
        with Image.open(io.BytesIO(base64.b64decode(data))) as im:
            assert im.size == (round(WIDTH_IN * DPI), round(PANEL_HEIGHT_IN * DPI))
    captions = re.findall(r"<figcaption>Figure (\d+)\. <b>([^<]+)</b>", text)
    assert [c[1] for c in captions] == [t.replace("&", "&amp;") for t in w.panels]
    # Who promoted it: the annotation, named as the trigger, and its token.
    assert "PromoteFullRequested" in text and "user: annotation mlrollouts.io/promote-full" in text
    assert "mlrollouts.io/promote-full=oncall-42" in text
    assert "(Promoted)" in text


def test_markdown_references_the_pngs_written_beside_it(rolled_back: dict[str, Any], tmp_path: Path) -> None:
    w = write(rolled_back, "md", tmp_path / "out" / "rb.md")
    md = w.path.read_text()
    assert len(w.images) == 3
    for img in w.images:
        assert img.parent == w.path.parent and img.stat().st_size > 10_000
        assert f"]({img.name})" in md
    assert "| time (UTC) | event | reason | triggered by |" in md
    assert "GuardrailFailed" in md and "operator: analysis" in md


def test_experiment_report_has_allocation_estimates_holm_srm_and_guardrails(
    experiment: dict[str, Any],
) -> None:
    r = load(experiment)
    fig = render_all(panels_of(r), "t")
    got = titles(fig)
    assert got == [
        "Traffic allocation by variant (Thompson-sampling bandit)",
        "Primary metric ctr: estimate per variant",
        "Difference from the control control with its sequential interval",
        "Holm-adjusted p-values vs the control",
        "Sample-ratio mismatch (SRM) test",
        "Guardrail error-rate: must stay at most 0.05",
    ]
    alloc, estimates, diffs, pvals, srm, guard = fig.axes
    # The bandit moved traffic: the allocation stack is not constant over time.
    weights = [[v["weight"] for v in p["variants"]] for p in experiment["status"]["series"]]
    assert len({tuple(w) for w in weights}) > 1
    assert len(alloc.collections) >= 3  # one band per variant
    assert pvals.get_yscale() == "log" and "alpha 0.05" in legend_texts(pvals)
    assert {"better", "same"} <= set(legend_texts(pvals))
    assert "srmAlpha 0.001" in legend_texts(srm)
    assert {"control (control)", "better", "same"} <= set(legend_texts(estimates))
    assert "better - control" in legend_texts(diffs)
    assert {"control", "better", "same", "max 0.05"} <= set(legend_texts(guard))


def test_report_command_renders_a_saved_object(rolled_back: dict[str, Any], tmp_path: Path) -> None:
    saved = tmp_path / "obj.yaml"
    saved.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": [rolled_back]}))
    res = CliRunner().invoke(
        report, ["rolled-back", "--from-file", str(saved), "-o", "md", "--out", str(tmp_path / "o")]
    )
    assert res.exit_code == 0, res.output
    paths = [Path(p) for p in res.output.split()]
    assert paths[0] == tmp_path / "o" / "rolled-back-report.md" and paths[0].exists()
    assert all(p.exists() and p.suffix == ".png" for p in paths[1:]) and len(paths) == 4
    res = CliRunner().invoke(report, ["other", "--from-file", str(saved)])
    assert res.exit_code == 2 and "expected one object named 'other', found 0" in res.output


def test_a_pending_object_without_analyses_still_renders(tmp_path: Path) -> None:
    spec = rollout_spec()
    obj = rollout_obj("new", spec, eng.reconcile(spec, eng.ModelRolloutStatus(), now=T0, generation=1).status)
    obj["status"]["series"] = []
    w = write(obj, "png", tmp_path / "new.png")
    assert w.path.stat().st_size > 5_000


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        ({"kind": "Deployment", "metadata": {"name": "x"}}, "kind"),
        ({"kind": "ModelRollout", "metadata": {}}, "metadata.name"),
        (
            {"kind": "ModelRollout", "metadata": {"name": "x"}, "status": {"series": [{"weight": 1}]}},
            "status.series[0].time",
        ),
    ],
)
def test_errors_name_the_field(obj: dict[str, Any], field: str) -> None:
    with pytest.raises(ReportError, match=re.escape(field)):
        load(obj)


def test_the_plugin_has_the_report_command(promoted: dict[str, Any], tmp_path: Path) -> None:
    from model_rollouts.cli.app import cli

    saved = tmp_path / "obj.yaml"
    saved.write_text(yaml.safe_dump(promoted))
    res = CliRunner().invoke(cli, ["report", "--from-file", str(saved), "-o", "png", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    with Image.open(tmp_path / "promoted-report.png") as im:
        assert im.format == "PNG" and im.size[0] == round(WIDTH_IN * DPI)


def test_a_report_after_a_new_revision_shows_only_that_revision(promoted: dict[str, Any]) -> None:
    """A promotion and the next revision's start in the same second: the old Promoted (weight 100)
    is not drawn as the new candidate's traffic, and every panel shares the revision's time range."""
    obj = yaml.safe_load(yaml.safe_dump(promoted))
    history = obj["status"]["history"]
    same_second = history[-1]["time"]
    history.append(
        {"time": same_second, "event": "NewRevision", "phase": "Progressing", "weight": 0,
         "reason": "NewRevision", "message": "candidate changed"}
    )  # fmt: skip
    obj["status"]["revisionStartedAt"] = same_second
    obj["status"]["series"] = []
    r = load(obj)
    assert [d.event for d in r.decisions] == ["NewRevision"]
    fig = render_all(panels_of(r), r.title)
    assert len({tuple(ax.get_xlim()) for ax in fig.axes}) == 1
